"""Offline data (collect -> RLlib episode dataset -> read) and behaviour cloning with VLAModule."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

from vla_ray.cli import main
from vla_ray.data import DataError, check_episodes, collect, read_episodes, read_meta
from vla_ray.train import resolve, train

LANGREACH = "vla_ray/LangReach-v0"


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "demos"
    summary = collect(LANGREACH, "expert", 6, path, seed=10, progress=False)
    return path, summary


def test_collect_roundtrip_reproduces_the_rollouts(demos):
    path, summary = demos
    assert summary["episodes"] == 6 and summary["success_rate"] == 1.0
    meta = read_meta(path)
    assert meta["format"] == "rllib" and meta["episodes"] == 6 and meta["env"] == LANGREACH
    episodes = read_episodes(path)
    assert len(episodes) == 6 and sum(len(e) for e in episodes) == meta["steps"]
    # replaying the stored actions from the same seed gives the stored observations and rewards
    env = gym.make(LANGREACH)
    for i, ep in enumerate(episodes):
        obs, _ = env.reset(seed=10 + i)
        np.testing.assert_array_equal(ep.get_observations(0)["image"], obs["image"])
        for t, action in enumerate(ep.get_actions()):
            obs, reward, term, trunc, info = env.step(action)
            np.testing.assert_array_equal(ep.get_observations(t + 1)["image"], obs["image"])
            np.testing.assert_allclose(ep.get_rewards(t), reward, rtol=1e-6)
        assert ep.is_terminated and info["is_success"]
    check_episodes(episodes, env.observation_space, env.action_space)
    env.close()


def test_collect_random_prob_replaces_that_share_of_expert_actions(demos, tmp_path):
    """``random_prob`` (epsilon-greedy data): stored actions are the expert's except for about
    that share of steps (a little more: random steps make episodes longer); replayed from the
    same seeds, the expert is asked at every state."""
    from vla_ray.envs.experts import get_expert

    def expert_share(path, seed: int) -> tuple[float, int]:
        env, expert = gym.make(LANGREACH), get_expert(LANGREACH)
        same = total = 0
        for i, ep in enumerate(read_episodes(path)):
            env.reset(seed=seed + i)
            for action in ep.get_actions():
                wanted = np.clip(expert(env), env.action_space.low, env.action_space.high)
                same += bool(np.allclose(action, wanted, atol=1e-6))
                total += 1
                env.step(action)
        env.close()
        return same / total, total

    assert expert_share(demos[0], seed=10)[0] == 1.0
    summary = collect(
        LANGREACH, "expert", 4, tmp_path / "eps", seed=10, random_prob=0.5, progress=False
    )
    share, steps = expert_share(tmp_path / "eps", seed=10)
    assert steps > 40 and 0.3 < share < 0.7
    assert read_meta(tmp_path / "eps")["random_prob"] == 0.5 and summary["episodes"] == 4
    with pytest.raises(ValueError, match=r"--random-prob: must be in \[0, 1\], got 1.5"):
        collect(LANGREACH, "expert", 1, tmp_path / "x", random_prob=1.5, progress=False)


def test_bad_data_raises_naming_the_problem(demos, tmp_path):
    path, _ = demos
    with pytest.raises(DataError, match="does not exist"):
        read_episodes(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .parquet files"):
        read_episodes(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    part = next(path.glob("*.parquet")).read_bytes()
    (bad / "part-000000.parquet").write_bytes(part[: len(part) // 2])  # truncated file
    with pytest.raises(DataError, match="part-000000.parquet"):
        read_episodes(bad)
    episodes = read_episodes(path)
    env = gym.make(LANGREACH, image_size=32)  # the data's images are 64x64
    with pytest.raises(DataError, match=r"'image' has shape \(64, 64, 3\).*\(32, 32, 3\)"):
        check_episodes(episodes, env.observation_space, env.action_space)
    env.close()
    with pytest.raises(ValueError, match="--format"):
        collect(LANGREACH, "expert", 1, tmp_path / "x", fmt="hdf5", progress=False)
    with pytest.raises(ValueError, match="--policy"):
        collect(LANGREACH, "nobody", 1, tmp_path / "x", progress=False)


def test_bc_needs_data_and_online_algorithms_refuse_it(demos):
    with pytest.raises(ValueError, match="--data"):
        resolve("langreach-bc")
    with pytest.raises(ValueError, match="--data"):
        resolve("langreach-ppo", data=str(demos[0]))
    from vla_ray.train import build_algorithm_config

    # chunked heads: the env takes chunks (ExecuteChunk) and the data are windowed
    chunked = {"model": {"chunk_size": 4}}
    for spec in (
        resolve("langreach-bc", chunked, data=str(demos[0])),
        resolve("langreach-dagger", chunked),
    ):
        assert spec.settings["env_config"]["action_chunk"] == {"size": 4}
        build_algorithm_config(spec)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["gaussian", "flow_matching"])
def test_bc_trains_from_collected_demos_and_exports(ray_session, demos, tmp_path, head):
    path, _ = demos
    spec = resolve(
        "langreach-bc",
        {
            "model": {"head": head},
            "training": {"train_batch_size_per_learner": 32},
            "eval_every": 2,
            "eval_episodes": 2,
            # flow_matching: 2 of the 6 episodes held out, scored at iterations 1, 2 and 4
            "val_fraction": 0.0 if head == "gaussian" else 0.34,
        },
        data=str(path),
    )
    assert spec.settings["model"]["head"] == head
    resumed = head == "gaussian"  # an offline run continues with --resume (RLlib's restore
    # syncs an env_runner_group that offline algorithms lack: see restore_algorithm)
    summary = train(spec, tmp_path / "run", stop_iters=3 if resumed else 4, progress=False)
    if resumed:
        summary = train(spec, tmp_path / "run", stop_iters=4, progress=False, resume=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    losses = [r["learner"]["total_loss"] for r in rows]
    assert len(rows) == 4 and all(np.isfinite(losses))
    assert rows[0]["success_rate"] is None and rows[1]["success_rate"] is not None  # evaluated
    scored = [r["iteration"] for r in rows if "val_action_mse" in r]
    assert scored == ([] if head == "gaussian" else [1, 2, 4])
    assert all(np.isfinite(r["val_action_mse"]) for r in rows if "val_action_mse" in r)
    ckpt = tmp_path / "run" / "checkpoints" / "last"
    js = tmp_path / "eval.json"
    assert (
        main(["eval", "--checkpoint", str(ckpt / "vla"), "--episodes", "2", "--json", str(js)]) == 0
    )
    assert json.loads(js.read_text())["mean_length"] >= 1
    assert summary["iteration"] == 4


def test_expert_mixing_and_dagger_relabelling():
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    from vla_ray.algorithms.dagger import beta_at, relabel
    from vla_ray.envs.experts import ExpertMixing

    assert [beta_at(i, 1.0, 0.5) for i in range(3)] == [1.0, 0.5, 0.25]
    env = ExpertMixing(gym.make(LANGREACH), expert_beta=1.0, seed=0)
    obs, info = env.reset(seed=3)
    ep = SingleAgentEpisode(observation_space=env.observation_space, action_space=env.action_space)
    ep.add_env_reset(observation=obs, infos=info)
    labels = [info["expert_action"]]
    for _ in range(4):  # the agent asks for (0, 0); the expert acts instead
        obs, r, term, trunc, info = env.step(np.zeros(2, np.float32))
        assert info["expert_acted"]
        ep.add_env_step(
            obs, np.zeros(2, np.float32), r, infos=info, terminated=term, truncated=trunc
        )
        labels.append(info["expert_action"])
    assert np.linalg.norm(info["agent_position"] - ep.get_infos(0)["agent_position"]) > 0.1
    env.set_wrapper_attr("expert_beta", 0.0)  # what DAgger's schedule does between iterations
    assert not env.step(np.zeros(2, np.float32))[4]["expert_acted"]
    ep.to_numpy()
    out = relabel(ep)
    assert len(out) == len(ep) == 4
    np.testing.assert_allclose(out.get_actions(), np.stack(labels[:4]))  # expert label per state
    np.testing.assert_array_equal(out.get_observations()["image"], ep.get_observations()["image"])
    with pytest.raises(ValueError, match="expert_beta"):
        ExpertMixing(gym.make(LANGREACH), expert_beta=2.0)
    env.close()


@pytest.mark.slow
def test_dagger_two_iterations_with_two_env_runners(ray_session, tmp_path):
    spec = resolve(
        "langreach-dagger",
        {
            "training": {"rollout_steps": 200, "updates_per_iteration": 2},
            "env_runners": {"num_envs_per_env_runner": 2},
            "eval_episodes": 2,
        },
    )
    assert spec.settings["env_runners"]["num_env_runners"] == 2
    summary = train(spec, tmp_path / "run", stop_iters=2, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all(r["success_rate"] is not None for r in rows)  # evaluation episodes every iteration
    assert rows[1]["env_steps"] >= 400 and np.isfinite(rows[1]["learner"]["total_loss"])
    assert summary["last_checkpoint"].endswith("last")
    # the checkpoint's env_config carries expert_beta: evaluation runs the policy alone
    from vla_ray.evaluate import evaluate, load_policy

    result = evaluate(load_policy(summary["last_checkpoint"]), episodes=1, progress=False)
    assert result["episodes"] == 1
