"""Action chunks: windowed targets from episodes, masked losses, the execute-chunk wrapper,
temporal ensembling, and chunked BC / DAgger / PPO runs."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from vla_ray.algorithms.dagger import relabel
from vla_ray.config import ConfigError
from vla_ray.data.chunks import chunk_episode, split_chunk_targets, window_actions
from vla_ray.envs.chunking import ExecuteChunk, TemporalEnsemble, chunk_settings
from vla_ray.models.heads import build_head, masked_mean, masked_nll
from vla_ray.train import resolve, train

LANGREACH = "vla_ray/LangReach-v0"


# -- windowing ------------------------------------------------------------------------------------
def test_window_targets_are_the_next_k_actions_masked_past_the_end():
    actions = np.array([[0, 10], [1, 11], [2, 12], [3, 13]], np.float32)
    targets, mask = window_actions(actions, 3)
    assert targets.shape == (4, 3, 2) and mask.shape == (4, 3)
    np.testing.assert_array_equal(targets[0], [[0, 10], [1, 11], [2, 12]])
    # past the end: the last action repeated, mask 0
    np.testing.assert_array_equal(targets[2], [[2, 12], [3, 13], [3, 13]])
    np.testing.assert_array_equal(targets[3], [[3, 13], [3, 13], [3, 13]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]])
    # chunk 1 is the actions themselves
    t1, m1 = window_actions(actions, 1)
    np.testing.assert_array_equal(t1[:, 0], actions)
    assert m1.min() == 1.0
    with pytest.raises(ValueError, match="chunk_size: expected an integer >= 1, got 0"):
        window_actions(actions, 0)


def _episode(n: int, infos: list[dict] | None = None) -> SingleAgentEpisode:
    space = gym.spaces.Box(-100, 100, (2,), np.float32)
    return SingleAgentEpisode(
        observations=[np.full(1, t, np.float32) for t in range(n + 1)],
        actions=[np.array([t, -t], np.float32) for t in range(n)],
        rewards=[float(t) for t in range(n)],
        infos=infos or [{} for _ in range(n + 1)],
        terminated=True,
        len_lookback_buffer=0,
        observation_space=gym.spaces.Box(-100, 100, (1,), np.float32),
        action_space=space,
    ).to_numpy()


def test_chunked_episode_encodes_the_mask_and_the_learner_recovers_it():
    ep = _episode(3)
    chunked = chunk_episode(ep, 2)
    assert chunked.id_ == ep.id_ and len(chunked) == 3 and chunked.is_terminated
    assert chunked.action_space.shape == (4,)
    acts = chunked.get_actions()
    np.testing.assert_array_equal(acts[0], [0, 0, 1, -1])
    np.testing.assert_array_equal(acts[2][:2], [2, -2])
    assert np.isnan(acts[2][2:]).all()  # the slot past the end
    np.testing.assert_array_equal(chunked.get_rewards(), [0, 1, 2])
    targets, mask = split_chunk_targets(torch.as_tensor(acts), 2, 2)
    torch.testing.assert_close(mask, torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]))
    # the padded slot repeats the last real action (the heads see in-range inputs)
    torch.testing.assert_close(targets[2], torch.tensor([[2.0, -2.0], [2.0, -2.0]]))
    torch.testing.assert_close(targets[1], torch.tensor([[1.0, -1.0], [2.0, -2.0]]))


def test_masked_reductions_exact_values():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])  # K=2, A=2
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert masked_mean(values, mask, 2).item() == pytest.approx((1 + 2 + 5 + 6 + 7 + 8) / 6)
    assert masked_mean(values, None, 2).item() == pytest.approx(4.5)
    # NLL: per-sample sums over the real slots, averaged over the batch
    assert masked_nll(values, mask, 2).item() == pytest.approx(-((1 + 2) + 26) / 2)


@pytest.mark.parametrize(
    "name", ["mlp", "gaussian", "tanh_gaussian", "diffusion", "flow_matching", "transformer"]
)
def test_every_head_masks_the_padded_slots(name):
    torch.manual_seed(0)
    head = build_head(name, 8, action_dim=2, chunk_size=3, low=-1.0, high=1.0)
    feats = torch.randn(4, 8)
    target = torch.rand(4, 3, 2) * 1.6 - 0.8
    ones = torch.ones(4, 3)

    def loss(t, m):
        torch.manual_seed(1)  # the same noise / times for the sampling losses
        return head.loss(feats, t, m)

    # an all-ones mask is the unmasked loss
    torch.testing.assert_close(loss(target, ones), loss(target, None))
    mask = ones.clone()
    mask[:, 2] = 0.0
    changed = target.clone()
    changed[:, 2] = -changed[:, 2]
    if head.takes_noise:  # the denoiser sees the whole chunk: only the loss weights are checked
        assert not torch.allclose(loss(target, mask), loss(target, None))
    else:  # the padded slot's value no longer counts
        torch.testing.assert_close(loss(target, mask), loss(changed, mask))
        assert not torch.allclose(loss(target, None), loss(changed, None))


# -- executing chunks -------------------------------------------------------------------------------
class CountingEnv(gym.Env):
    """Reward t + 1 at step t; success at step 3; terminates after 5 steps; the expert's label of
    a state is its step count."""

    observation_space = gym.spaces.Box(0, 100, (1,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.actions = 0, []
        return np.zeros(1, np.float32), {"expert_action": [0.0], "is_success": False}

    def step(self, action):
        self.actions.append(float(action[0]))
        self.t += 1
        info = {"expert_action": [float(self.t)], "is_success": self.t == 3, "target_color": "red"}
        return np.full(1, self.t, np.float32), float(self.t), self.t >= 5, False, info


def test_execute_chunk_reward_termination_and_infos():
    env = ExecuteChunk(CountingEnv(), size=3, gamma=0.5)
    assert env.action_space.shape == (3,)
    env.reset(seed=0)
    obs, reward, term, trunc, info = env.step(np.array([0.1, 0.2, 0.3], np.float32))
    assert env.unwrapped.actions == pytest.approx([0.1, 0.2, 0.3])  # open loop, in order
    assert reward == pytest.approx(1 + 0.5 * 2 + 0.25 * 3) and not term
    assert info["chunk_steps"] == 3 and info["chunk_return"] == 6.0 and obs[0] == 3
    assert info["is_success"] and info["target_color"] == "red"
    np.testing.assert_array_equal(info["expert_action_chunk"], [[0], [1], [2]])
    np.testing.assert_array_equal(info["expert_action_chunk_mask"], [1, 1, 1])
    # the episode terminates after the 2nd action of this chunk: the 3rd is not executed
    obs, reward, term, trunc, info = env.step(np.array([0.4, 0.5, 0.6], np.float32))
    assert term and not trunc and info["chunk_steps"] == 2 and obs[0] == 5
    assert env.unwrapped.actions == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert reward == pytest.approx(4 + 0.5 * 5) and info["chunk_return"] == 9.0
    assert not info["is_success"]  # neither executed step of this chunk succeeded
    np.testing.assert_array_equal(info["expert_action_chunk"], [[3], [4], [4]])
    np.testing.assert_array_equal(info["expert_action_chunk_mask"], [1, 1, 0])


def test_receding_horizon_executes_the_first_m_and_truncation_stops_a_chunk():
    env = ExecuteChunk(gym.wrappers.TimeLimit(CountingEnv(), 3), size=4, execute=2)
    env.reset(seed=0)
    _, reward, term, trunc, info = env.step(np.arange(4, dtype=np.float32) / 10)
    assert env.unwrapped.actions == pytest.approx([0.0, 0.1]) and reward == 3.0  # gamma 1
    _, reward, term, trunc, info = env.step(np.ones(4, np.float32))
    assert trunc and not term and info["chunk_steps"] == 1 and reward == 3.0
    assert chunk_settings({"size": 8}) == {"size": 8, "execute": 8, "gamma": 1.0}
    with pytest.raises(ConfigError, match=r"env.action_chunk.execute: expected .* 1..4.*got 5"):
        chunk_settings({"size": 4, "execute": 5})
    with pytest.raises(ConfigError, match=r"env.action_chunk: unknown key\(s\) \['horizon'\]"):
        chunk_settings({"size": 4, "horizon": 2})


def test_temporal_ensemble_weights_older_predictions_exponentially():
    ens = TemporalEnsemble(size=3, coeff=0.5)
    c0 = np.array([[0.0], [1.0], [2.0]])
    c1 = np.array([[10.0], [11.0], [12.0]])
    c2 = np.array([[20.0], [21.0], [22.0]])
    c3 = np.array([[30.0], [31.0], [32.0]])
    np.testing.assert_allclose(ens.step(c0), [0.0])
    w = np.exp(-0.5 * np.arange(3))
    # step 1: c0's slot 1 (oldest, weight 1) and c1's slot 0 (weight e^-0.5)
    np.testing.assert_allclose(ens.step(c1), [(1.0 * w[0] + 10.0 * w[1]) / w[:2].sum()])
    np.testing.assert_allclose(ens.step(c2), [(2.0 * w[0] + 11 * w[1] + 20 * w[2]) / w.sum()])
    # step 3: c0 no longer covers it
    np.testing.assert_allclose(ens.step(c3), [(12.0 * w[0] + 21 * w[1] + 30 * w[2]) / w.sum()])
    ens.reset()
    np.testing.assert_allclose(ens.step(c3), [30.0])
    np.testing.assert_allclose(TemporalEnsemble(3, 0.0).step(c0), [0.0])


# -- algorithms -----------------------------------------------------------------------------------
def test_dagger_relabels_a_chunked_rollout_with_the_expert_labels_along_each_chunk():
    infos = [
        {"expert_action": [0.0, 0.0]},
        {"expert_action_chunk": np.array([[1, 1], [2, 2]]), "expert_action_chunk_mask": [1, 1]},
        {"expert_action_chunk": np.array([[3, 3], [3, 3]]), "expert_action_chunk_mask": [1, 0]},
    ]
    ep = _episode(2, infos)
    out = relabel(ep)
    acts = out.get_actions()
    np.testing.assert_array_equal(acts[0], [1, 1, 2, 2])
    np.testing.assert_array_equal(acts[1][:2], [3, 3])
    assert np.isnan(acts[1][2:]).all()


def test_algorithms_without_chunks_refuse_them_by_name(tmp_path):
    spec = resolve("langreach-ppo", {"model": {"chunk_size": 4}})
    assert spec.settings["env_config"]["action_chunk"] == {"size": 4}
    for preset in ("hopper-marwil", "hopper-iql", "hopper-cql", "hopper-td3bc", "hopper-dt"):
        with pytest.raises(ConfigError, match=r"model.chunk_size: \w+ learns single-step actions"):
            resolve(preset, {"model": {"chunk_size": 2}}, data=str(tmp_path))
    with pytest.raises(ConfigError, match="env.action_chunk.size: must equal model.chunk_size=4"):
        resolve(
            "langreach-ppo",
            {"model": {"chunk_size": 4}, "env_config": {"action_chunk": {"size": 2}}},
        )


def test_ppo_with_chunk_4_runs_two_iterations_and_evaluates(ray_session, tmp_path):
    from vla_ray.evaluate import evaluate, load_policy

    spec = resolve(
        "langreach-ppo",
        {
            "model": {"chunk_size": 4},
            "env_config": {"image_size": 32},
            "training": {
                "train_batch_size_per_learner": 128,
                "minibatch_size": 64,
                "num_epochs": 1,
            },
            "env_runners": {"num_envs_per_env_runner": 2},
        },
        local=True,
    )
    summary = train(spec, tmp_path / "run", stop_iters=2, progress=False)
    assert summary["iteration"] == 2 and summary["env_steps"] >= 256
    # RLlib counts macro-steps: a 50-step episode is 13 chunks of 4 (RLlib's mean over episodes
    # split across sampling rounds comes out a little above that), far below 50
    assert 1 <= summary["episode_len_mean"] < 20
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["env_config"]["action_chunk"] == {"size": 4}
    policy = load_policy(tmp_path / "run" / "checkpoints" / "last")
    assert policy.model.config.chunk_size == 4
    result = evaluate(policy, episodes=1, progress=False)
    assert result["mean_length"] > 13  # counted in env steps
    ensembled = evaluate(policy, episodes=1, temporal_ensemble=0.01, progress=False)
    assert ensembled["episodes"] == 1
    with pytest.raises(ValueError, match="--chunk-execute: not with --temporal-ensemble"):
        evaluate(policy, episodes=1, chunk_execute=2, temporal_ensemble=0.01, progress=False)


def test_dagger_with_chunk_4_trains_on_windowed_demos_and_chunked_rollouts(ray_session, tmp_path):
    from vla_ray.algorithms.dagger import DAgger
    from vla_ray.data import collect
    from vla_ray.evaluate import load_policy

    easy = {"num_targets": 1, "image_size": 32, "max_episode_steps": 20}
    collect(LANGREACH, "expert", 2, tmp_path / "demos", seed=0, env_config=easy, progress=False)
    spec = resolve(
        "langreach-dagger",
        {
            "model": {"chunk_size": 4},
            "env_config": easy,
            "training": {
                "rollout_steps": 10,
                "updates_per_iteration": 2,
                "train_batch_size_per_learner": 16,
            },
            "env_runners": {"num_env_runners": 0, "num_envs_per_env_runner": 1},
            "eval_every": 10**6,
        },
        data=str(tmp_path / "demos"),
    )
    seen = []
    add = DAgger._train

    def spy(self, updates):  # the aggregate's chunked actions at each training round
        eps = self._dataset.sample(num_items=64, n_step=1, sample_episodes=True, to_numpy=True)
        seen.append(np.concatenate([np.asarray(e.get_actions()) for e in eps]))
        return add(self, updates)

    DAgger._train = spy
    try:
        summary = train(spec, tmp_path / "run", stop_iters=1, progress=False)
    finally:
        DAgger._train = add
    assert summary["iteration"] == 1 and len(seen) == 2  # demos first, then demos + rollouts
    for actions in seen:
        assert actions.shape[1] == 8  # 4 actions of 2 dims
        assert np.isfinite(actions[:, :2]).all()  # the first slot is always a real label
    assert np.isnan(seen[0]).any()  # windows past a demo's end
    assert load_policy(tmp_path / "run" / "checkpoints" / "last").model.config.chunk_size == 4


@pytest.mark.slow  # ~55 s on the shared 2-core machine (Ray Data's offline pipeline)
def test_bc_with_chunk_4_learns_from_windows_masked_at_episode_ends(ray_session, tmp_path):
    from vla_ray.algorithms import bc
    from vla_ray.data import collect

    easy = {"num_targets": 1, "image_size": 32, "max_episode_steps": 20}
    collect(LANGREACH, "expert", 3, tmp_path / "demos", seed=0, env_config=easy, progress=False)
    spec = resolve(
        "langreach-bc-chunk",
        {
            "model": {"chunk_size": 4},
            "env_config": easy,
            "training": {"train_batch_size_per_learner": 64},
            "eval_every": 2,
            "eval_episodes": 1,
        },
        data=str(tmp_path / "demos"),
        local=True,  # the learner runs here, where the spy sees its batches
    )
    seen, losses = [], []
    loss_fn = bc.VLABCLearner.compute_loss_for_module

    def spy(self, *, module_id, config=None, batch, fwd_out):
        seen.append(batch["actions"].detach().cpu().numpy())
        losses.append(
            loss_fn(self, module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        )
        return losses[-1]

    bc.VLABCLearner.compute_loss_for_module = spy
    try:
        summary = train(spec, tmp_path / "run", stop_iters=2, progress=False)
    finally:
        bc.VLABCLearner.compute_loss_for_module = loss_fn
    assert summary["iteration"] == 2 and summary["success_rate"] is not None
    actions = np.concatenate(seen)
    assert actions.shape[1] == 8 and np.isfinite(actions[:, :2]).all()
    # ~8-step demos: many windows run past the end (NaN slots), and the loss stays finite
    assert np.isnan(actions[:, 2:]).any() and all(torch.isfinite(x) for x in losses)


@pytest.mark.parametrize(
    ("preset", "head"),
    [
        ("langreach-bc-chunk", "gaussian"),
        ("pusht-diffusion", "diffusion"),
        ("pusht-flow", "flow_matching"),
    ],
)
def test_chunk_presets_build_a_chunk_8_module_on_the_wrapped_env(preset, head):
    from vla_ray.rl_module import VLAModule
    from vla_ray.train import _EnvCreator

    spec = resolve(preset, data="unused")
    env = _EnvCreator(spec.env)(spec.settings["env_config"])
    try:
        assert isinstance(env, ExecuteChunk) and env.size == env.execute == 8
        dim = env.env.action_space.shape[0]
        assert env.action_space.shape == (8 * dim,)
        module = VLAModule(
            observation_space=env.observation_space,
            action_space=env.action_space,
            model_config=spec.settings["model"],
        )
        assert module.vla.config.chunk_size == 8 and module.vla.config.action_dim == dim
        assert module.vla.config.head == head
    finally:
        env.close()
