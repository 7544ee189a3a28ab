"""Offline RL and imitation algorithms: MARWIL, filtered/weighted BC, TD3+BC, Decision
Transformer, GAIL (loss and data unit tests; 2-iteration runs from collected datasets)."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import assert_no_new_stream_threads, live_stream_threads
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from vla_ray.data import collect, read_episodes
from vla_ray.data.stream import MAX_STREAM_BLOCKS, MIN_STREAM_EPISODES, close_offline_data
from vla_ray.train import build_algorithm_config, resolve, train

HOPPER = "vla_ray/Hopper-v5"
LANGREACH = "vla_ray/LangReach-v0"
# a small state-only VLA and tiny batches: these tests check plumbing, not learning
TINY = {"llm_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}}


@pytest.fixture(scope="session")
def hopper_data(tmp_path_factory):
    """Random-policy Hopper episodes (short: the hopper falls within ~10-100 steps)."""
    path = tmp_path_factory.mktemp("offline") / "hopper"
    collect(HOPPER, "random", 5, path, seed=0, progress=False)
    return path


@pytest.fixture(scope="session")
def langreach_demos(tmp_path_factory):
    path = tmp_path_factory.mktemp("offline") / "langreach"
    collect(LANGREACH, "expert", 3, path, seed=0, progress=False)
    return path


def _draws(
    data, preset: str, n: int, seed: int = 0, stream: list | None = None
) -> list[np.ndarray]:
    """``state`` rows of ``n`` successive training batches (64 steps or windows each); the
    stream's (blocks, episodes) are appended to ``stream`` when given."""
    overrides = {"seed": seed, "training": {"train_batch_size_per_learner": 64}}
    before = live_stream_threads()
    algo = build_algorithm_config(resolve(preset, overrides, data=data)).build_algo()
    try:
        if stream is not None:
            stream.append((algo.offline_data.data.num_blocks(), algo.offline_data.stream_episodes))
        out = []
        for _ in range(n):
            batch = algo.offline_data.sample(num_samples=64, num_shards=0)
            state = np.asarray(batch.policy_batches["default_policy"]["obs"]["state"])
            out.append(state.reshape(-1, state.shape[-1]).round(5))
    finally:
        close_offline_data(algo.offline_data)
        algo.stop()
    assert_no_new_stream_threads(before)
    return out


@pytest.fixture(scope="module")
def bc_draws(ray_session, hopper_data) -> tuple[list[np.ndarray], list]:
    """``hopper-bc``'s batches with seed 0 (3 per episode of the dataset) and its stream's
    (blocks, episodes): shared by the fresh-draw and the seeding checks."""
    stream: list = []
    n = 3 * len(read_episodes(hopper_data))
    return _draws(hopper_data, "hopper-bc", n, seed=0, stream=stream), stream


@pytest.mark.parametrize("preset", ["hopper-bc", "hopper-iql", "hopper-dt"])
def test_offline_batches_are_fresh_draws_from_the_whole_dataset(
    ray_session, hopper_data, preset, request
):
    """Each iteration's batch is a new sample over every episode read so far, not one batch
    replayed (RLlib's BC default maps a small dataset once into a single batch)."""
    episodes = read_episodes(hopper_data)
    owner = {
        row.round(5).tobytes(): i
        for i, ep in enumerate(episodes)
        for row in np.asarray(ep.get_observations()["state"])[:-1]
    }
    if preset == "hopper-bc":
        draws, stream = request.getfixturevalue("bc_draws")
    else:
        stream = []
        draws = _draws(hopper_data, preset, 3 * len(episodes), stream=stream)
    # the dataset repeated: long enough not to restart every few iterations, in few blocks
    blocks, streamed = stream[0]
    assert blocks <= MAX_STREAM_BLOCKS
    assert streamed == blocks * len(episodes) >= min(MIN_STREAM_EPISODES, 100 * len(episodes))
    assert not any(np.array_equal(draws[0], d) for d in draws[1:])
    hit = {owner.get(row.tobytes()) for d in draws for row in d} - {None}
    assert hit == set(range(len(episodes)))  # every episode of the dataset was drawn from


def test_offline_batches_are_seeded(ray_session, hopper_data, bc_draws):
    first, _ = bc_draws  # seed 0
    again = _draws(hopper_data, "hopper-bc", 3, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, first[:3], strict=True))
    assert not np.array_equal(first[2], _draws(hopper_data, "hopper-bc", 3, seed=6)[-1])


def _episode(rewards, obs_dim=2, act_dim=1, terminated=True, offset=0.0):
    """A finished episode with states ``offset + t`` and actions ``-(offset + t)``."""
    obs_space = gym.spaces.Dict({"state": gym.spaces.Box(-1e3, 1e3, (obs_dim,))})
    act_space = gym.spaces.Box(-1e3, 1e3, (act_dim,))
    ep = SingleAgentEpisode(observation_space=obs_space, action_space=act_space)
    ep.add_env_reset(observation={"state": np.full(obs_dim, offset, np.float32)})
    for t, r in enumerate(rewards):
        last = t == len(rewards) - 1
        ep.add_env_step(
            observation={"state": np.full(obs_dim, offset + t + 1, np.float32)},
            action=np.full(act_dim, -(offset + t), np.float32),
            reward=float(r),
            terminated=terminated and last,
            truncated=(not terminated) and last,
        )
    return ep.to_numpy()


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _two_iterations(preset, data, tmp_path, **overrides):
    model = {**TINY, **overrides.pop("model", {})}
    settings = {"model": model, "eval_every": 2, "eval_episodes": 1, **overrides}
    spec = resolve(preset, settings, data=str(data))
    summary = train(spec, tmp_path / "run", stop_iters=2, progress=False)
    rows = _rows(tmp_path / "run")
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[1]["episode_return_mean"] is not None  # evaluated on the env at iteration 2
    assert summary["last_checkpoint"].endswith("last")
    return rows


# -- return-to-go, windows and the DT loss --------------------------------------------------------
def test_returns_to_go_discounts_within_one_episode():
    from vla_ray.algorithms.dt import returns_to_go

    np.testing.assert_allclose(returns_to_go([1.0, 2.0, 3.0]), [6.0, 5.0, 3.0])
    np.testing.assert_allclose(returns_to_go([1.0, 2.0, 3.0], gamma=0.5), [2.75, 3.5, 3.0])
    assert returns_to_go([]).shape == (0,)


def test_windows_are_left_padded_and_never_cross_episodes():
    from vla_ray.algorithms.dt import episode_windows, window

    obs = {"state": np.arange(5, dtype=np.float32)[:, None]}
    acts = -np.arange(5, dtype=np.float32)[:, None]
    w = window(obs, acts, np.arange(5, dtype=np.float32), end=1, K=3)
    np.testing.assert_array_equal(w["mask"], [0, 1, 1])
    np.testing.assert_array_equal(w["timesteps"], [0, 0, 1])
    np.testing.assert_array_equal(w["obs"]["state"][:, 0], [0, 0, 1])
    np.testing.assert_array_equal(w["rtg"], [0, 0, 1])
    w = window(obs, acts, np.arange(5, dtype=np.float32), end=4, K=3)
    np.testing.assert_array_equal(w["timesteps"], [2, 3, 4])
    np.testing.assert_array_equal(w["mask"], [1, 1, 1])

    # two episodes: states 100+t / 200+t; every window holds one episode's steps only, and its
    # return-to-go is that episode's (rewards 1, 2, 3 and 10, 10), scaled by 1/2
    a = _episode([1.0, 2.0, 3.0], offset=100.0)
    b = _episode([10.0, 10.0], offset=200.0, terminated=False)
    w = episode_windows([a, b], 200, 4, np.random.default_rng(0), scale=2.0)
    assert w["obs"]["state"].shape == (200, 4, 2) and w["actions"].shape == (200, 4, 1)
    rtg_a = {100.0: 3.0, 101.0: 2.5, 102.0: 1.5}
    rtg_b = {200.0: 10.0, 201.0: 5.0}
    states, acts = w["obs"]["state"][:, :, 0], w["actions"][:, :, 0]
    for s, r, m, a_ in zip(states, w["rtg"], w["mask"], acts, strict=True):
        real = s[m == 1]
        assert real.max() - real.min() < 50  # one episode per window
        table = rtg_a if real[0] < 150 else rtg_b
        np.testing.assert_allclose(r[m == 1], [table[x] for x in real])
        np.testing.assert_allclose(a_[m == 1], -real)  # the action taken at that state
        assert np.all(r[m == 0] == 0) and np.all(s[m == 0] == 0)
    assert {int(x) for x in w["mask"].sum(1)} == {1, 2, 3}  # every fill (episodes < K)
    with pytest.raises(ValueError, match="sample_windows: no non-empty episodes"):
        episode_windows([], 8, 4, np.random.default_rng(0))


def test_dt_eval_runner_builds_the_envrunner_context_window():
    """`vla-ray eval`'s ContextRunner feeds the module the window DTContext builds on the
    EnvRunners for the same episode so far, and forgets it at reset."""
    import gymnasium as gym
    from ray.rllib.core.columns import Columns

    from vla_ray.algorithms.dt import MASK, PREV_ACTIONS, RTG, TIMESTEPS, ContextRunner, DTContext

    K, target, scale = 3, 10.0, 2.0
    space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    class Recorder:  # stands in for the DTModule: records each batch, answers a fixed action
        act_dim = 2

        def __init__(self):
            self.batches = []

        def forward_inference(self, batch):
            self.batches.append(batch)
            n = len(self.batches)
            return {Columns.ACTIONS: torch.tensor([[0.1 * n, -0.1 * n]])}

    module = Recorder()
    runner = ContextRunner(module, K, target, scale)
    states = [np.full(4, i, np.float32) for i in range(5)]
    rewards = [1.0, 2.0, 0.5, 3.0]
    for i, state in enumerate(states):
        runner({"state": state[None]})
        if i < len(rewards):
            runner.observe(rewards[i])
    # the same episode as the EnvRunners hold it when the 5th action is due
    ep = SingleAgentEpisode(
        observations=[{"state": s} for s in states],
        actions=[np.array([0.1 * n, -0.1 * n], np.float32) for n in range(1, 5)],
        rewards=rewards,
        observation_space=gym.spaces.Dict({"state": gym.spaces.Box(-9, 9, (4,), np.float32)}),
        action_space=space,
        len_lookback_buffer=0,
    )
    batch = DTContext(context_length=K, target_return=target, return_scale=scale)(
        rl_module=None, batch={}, episodes=[ep]
    )
    fed = module.batches[-1]
    for col in (PREV_ACTIONS, RTG, TIMESTEPS, MASK):
        want = next(iter(batch[col].values()))[0]
        np.testing.assert_allclose(fed[col][0].numpy(), want, rtol=1e-6)
    want_obs = next(iter(batch[Columns.OBS].values()))[0]["state"]
    np.testing.assert_allclose(fed[Columns.OBS]["state"][0].numpy(), want_obs)
    np.testing.assert_array_equal(fed[TIMESTEPS][0].numpy(), [2, 3, 4])
    assert fed[RTG][0, -1].item() == pytest.approx((target - sum(rewards)) / scale)
    # a new episode: the context starts again (one real step, full return to go)
    runner.reset()
    runner({"state": states[0][None]})
    np.testing.assert_array_equal(module.batches[-1][MASK][0].numpy(), [0, 0, 1])
    assert module.batches[-1][RTG][0, -1].item() == pytest.approx(target / scale)


def test_dt_loss_is_masked_mse():
    from vla_ray.algorithms.dt import dt_loss

    pred = torch.tensor([[[1.0, 1.0], [3.0, 0.0]]])  # B=1, K=2, A=2
    target = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    assert dt_loss(pred, target, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(6 / 4)
    assert dt_loss(pred, target, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(4 / 2)
    assert dt_loss(pred, target, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(2 / 2)


# -- TD3+BC losses --------------------------------------------------------------------------------
def test_td3_target_takes_the_smaller_twin_and_stops_at_termination():
    from vla_ray.algorithms.td3bc import td3_target

    y = td3_target(
        torch.tensor([1.0, 1.0, 0.0]),
        torch.tensor([False, True, False]),
        torch.tensor([10.0, 10.0, -2.0]),
        torch.tensor([4.0, 4.0, 3.0]),
        gamma=0.5,
    )
    np.testing.assert_allclose(y, [1.0 + 0.5 * 4.0, 1.0, 0.5 * -2.0])


def test_td3bc_actor_loss_normalises_q_by_its_mean_magnitude():
    from vla_ray.algorithms.td3bc import td3bc_actor_loss

    q = torch.tensor([2.0, -4.0], requires_grad=True)  # mean |Q| = 3, mean Q = -1
    pi = torch.tensor([[0.5], [0.0]], requires_grad=True)
    a = torch.tensor([[0.0], [1.0]])  # mse = (0.25 + 1) / 2 = 0.625
    loss, lam = td3bc_actor_loss(q, pi, a, alpha=2.5)
    assert lam.item() == pytest.approx(2.5 / 3)
    assert loss.item() == pytest.approx(-(2.5 / 3) * -1.0 + 0.625)
    loss.backward()
    # lambda is a constant: d loss / d Q_i = -lambda / B
    np.testing.assert_allclose(q.grad, [-(2.5 / 3) / 2] * 2, rtol=1e-6)
    np.testing.assert_allclose(pi.grad, [[0.5], [-1.0]], rtol=1e-6)  # 2 (pi - a) / B


def test_squashed_mlp_head_is_in_bounds_saved_and_exported(tmp_path):
    """TD3+BC's actor as a plain VLA: the mlp head's ``squash`` survives save_pretrained and the
    ONNX export (whose parity check compares it with the module)."""
    from vla_ray.config import VLAConfig
    from vla_ray.export import export, load_runner, random_inputs, reference_actions
    from vla_ray.models.vla import VLA

    torch.manual_seed(0)
    vla = VLA(VLAConfig(head="mlp", head_config={"squash": True})).eval()
    last = vla.head.net[-1]
    with torch.no_grad():
        last.weight.mul_(100.0)  # far past the bounds before the tanh
    inputs = random_inputs(vla.config, len(vla.tokenizer), batch=4)
    loaded = VLA.from_pretrained(vla.save_pretrained(tmp_path / "vla")).eval()
    want = reference_actions(vla, inputs)
    assert np.abs(want).max() <= 1.0 and np.abs(want).max() > 0.99  # squashed, saturated
    np.testing.assert_allclose(reference_actions(loaded, inputs), want, atol=1e-6)
    export(tmp_path / "vla", "onnx", tmp_path / "export", prefix_cache=False, progress=None)
    export_actions = load_runner(tmp_path / "export" / "onnx")(inputs)
    np.testing.assert_allclose(export_actions, want, atol=1e-4)


# -- filtered and weighted BC ---------------------------------------------------------------------
def test_filtered_and_weighted_bc_select_by_return(ray_session, hopper_data):
    from vla_ray.algorithms.bc import admit, selection_probabilities
    from vla_ray.data import read_episodes
    from vla_ray.data.stats import episode_stats, top_percent_threshold

    returns = np.array([1.0, 5.0, 3.0, 10.0])
    assert top_percent_threshold(returns, 50) == 5.0  # the top 2 of 4
    assert top_percent_threshold(returns, 1) == 10.0  # at least one episode
    with pytest.raises(ValueError, match="filter_top_percent"):
        top_percent_threshold(returns, 0)
    np.testing.assert_array_equal(selection_probabilities(returns, threshold=5.0), [0, 1, 0, 1])
    p = selection_probabilities(returns, temperature=2.0)
    np.testing.assert_allclose(p, np.exp((returns - 10.0) / 2.0))
    # sampling in proportion to exp(R / T): the ratio of two episodes' probabilities
    assert p[3] / p[1] == pytest.approx(np.exp(5.0 / 2.0))
    p = selection_probabilities(returns, threshold=5.0, temperature=2.0, max_return=12.0)
    np.testing.assert_allclose(p, [0, np.exp(-3.5), 0, np.exp(-1.0)])

    rng = np.random.default_rng(0)
    eps = ["a", "b", "c", "d"]
    assert admit(eps, np.array([0, 1, 0, 1.0]), rng, need_one=False) == ["b", "d"]
    assert admit(eps, np.zeros(4), rng, need_one=False) == []
    assert admit(eps, np.array([0, 1e-9, 0, 0]), rng, need_one=True) == ["b"]
    counts = np.zeros(2)
    for _ in range(4000):
        counts += [len(admit(["x"], np.array([p_])[:1], rng, False)) for p_ in (0.2, 0.8)]
    np.testing.assert_allclose(counts / 4000, [0.2, 0.8], atol=0.03)

    # the statistics pass over a real dataset (ray.data): the returns of the stored episodes
    stats = episode_stats(hopper_data)
    stored = [float(np.sum(ep.get_rewards())) for ep in read_episodes(hopper_data)]
    np.testing.assert_allclose(stats["returns"], stored, rtol=1e-6)
    assert len(stats["state_mean"]) == 11 and min(stats["state_std"]) > 0


@pytest.mark.slow
def test_filtered_weighted_bc_two_iterations(ray_session, hopper_data, tmp_path):
    training = {
        "train_batch_size_per_learner": 16,
        "filter_top_percent": 40,
        "return_weight_temperature": 5.0,
    }
    rows = _two_iterations("hopper-bc", hopper_data, tmp_path, training=training)
    assert np.isfinite(rows[1]["learner"]["total_loss"])
    with pytest.raises(ValueError, match="filter_top_percent"):
        from vla_ray.train import build_algorithm_config

        bad = resolve("hopper-bc", {"training": {"filter_top_percent": 150}}, data=hopper_data)
        build_algorithm_config(bad).validate()


# -- 2-iteration runs -----------------------------------------------------------------------------
@pytest.mark.slow
def test_marwil_two_iterations(ray_session, hopper_data, tmp_path):
    rows = _two_iterations(
        "hopper-marwil", hopper_data, tmp_path, training={"train_batch_size_per_learner": 16}
    )
    stats = rows[1]["learner"]
    assert np.isfinite(stats["policy_loss"]) and np.isfinite(stats["vf_loss"])


@pytest.mark.slow
def test_td3bc_two_iterations(ray_session, hopper_data, tmp_path):
    from ray.rllib.core.rl_module.rl_module import RLModule

    from vla_ray.train import MODULE_SUBDIR

    rows = _two_iterations(
        "hopper-td3bc",
        hopper_data,
        tmp_path,
        training={"train_batch_size_per_learner": 16, "policy_delay": 2},
        model={"q_hidden": 32},
    )
    # update 1 trains actor + critic, update 2 the critic only (policy_delay=2)
    assert "actor_loss" in rows[0]["learner"] and "critic_loss" in rows[1]["learner"]
    assert "actor_loss" not in rows[1]["learner"]
    ckpt = tmp_path / "run" / "checkpoints" / "last"
    assert (ckpt / "vla" / "vla_ray_meta.json").is_file()  # the policy folder, as for others
    module = RLModule.from_checkpoint(ckpt / MODULE_SUBDIR)
    stats = json.loads((ckpt / "vla_ray_meta.json").read_text())
    assert stats["iteration"] == 2
    # the dataset's state statistics are in the VLA's config; every trunk applies them
    assert len(module.vla.config.state_mean) == 11
    assert module.vla.trunk.state_mean.shape == module.qf_trunk.state_std.shape == (11,)
    obs = gym.make(HOPPER).reset(seed=0)[0]
    batch = {"obs": {k: torch.as_tensor(v)[None] for k, v in obs.items()}}
    action = module.forward_inference(batch)["actions"]
    assert action.shape == (1, 3) and float(action.abs().max()) <= 1.0
    # `vla-ray eval --checkpoint` runs it (the module's forward, normalisation included); the
    # `vla/` folder alone is the same policy: squashed into the bounds, states normalised
    from vla_ray.evaluate import evaluate, load_policy

    vla_policy = load_policy(ckpt / "vla")
    assert vla_policy.model.config.head_config["squash"] is True
    np.testing.assert_allclose(
        vla_policy({k: np.asarray(v)[None] for k, v in obs.items()}), action.numpy(), atol=1e-6
    )
    results = [evaluate(load_policy(p), episodes=1, progress=False) for p in (ckpt, ckpt / "vla")]
    assert results[0]["episodes"] == 1 and results[0] == results[1]


@pytest.mark.slow
def test_decision_transformer_two_iterations(ray_session, hopper_data, tmp_path):
    rows = _two_iterations(
        "hopper-dt",
        hopper_data,
        tmp_path,
        training={"train_batch_size_per_learner": 8, "context_length": 4},
        model={"dt_hidden": 32, "dt_layers": 1, "dt_heads": 2},
    )
    assert np.isfinite(rows[1]["learner"]["action_mse"])
    assert rows[1]["episode_len_mean"] >= 1  # evaluated on the env with the context connector
    # `vla-ray eval` runs it too: the window settings come from the checkpoint
    from vla_ray.evaluate import evaluate, load_policy

    ckpt = tmp_path / "run" / "checkpoints" / "last"
    meta = json.loads((ckpt / "vla_ray_meta.json").read_text())
    assert meta["training"]["context_length"] == 4
    policy = load_policy(ckpt)
    assert policy.context.K == 4 and policy.context.target == meta["training"]["target_return"]
    both = evaluate(policy, episodes=2, seed=7, progress=False)
    assert both["episodes"] == 2 and both["mean_length"] >= 1
    # the context is the episode's own: two episodes in a row score as each one alone
    alone = [evaluate(policy, episodes=1, seed=s, progress=False) for s in (7, 8)]
    assert both["mean_return"] == pytest.approx(np.mean([r["mean_return"] for r in alone]))
    assert both["mean_length"] == pytest.approx(np.mean([r["mean_length"] for r in alone]))
    # and exports: the window graph, checked over an episode against the eager module
    from vla_ray.export import export

    summary = export(ckpt, "torchscript", tmp_path / "export", progress=None)
    assert summary["context"]["context_length"] == 4
    assert summary["formats"]["torchscript"]["max_abs_diff"] <= 1e-4


@pytest.mark.slow
def test_gail_two_iterations(ray_session, langreach_demos, tmp_path):
    rows = _two_iterations(
        "langreach-gail",
        langreach_demos,
        tmp_path,
        training={"train_batch_size_per_learner": 64, "minibatch_size": 32, "num_epochs": 1},
        env_runners={"num_env_runners": 0, "num_envs_per_env_runner": 2},
        model={"disc_hidden": 32},
    )
    stats = rows[1]["learner"]
    assert np.isfinite(stats["disc_loss"]) and 0.0 <= stats["disc_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="--data"):
        resolve("langreach-gail")


def test_pusht_bc_preset_uses_the_diffusion_head():
    from vla_ray.presets import get_preset

    preset = get_preset("pusht-bc")
    assert preset.algorithm == "bc" and preset.model["head"] == "diffusion"
    assert preset.env in gym.registry
    spec = resolve("pusht-bc", data="unused")
    assert spec.settings["model"]["head"] == "diffusion"


def test_repeated_blocks_equal_from_arrow_refs_of_the_same_order(ray_session):
    """The stream built with each distinct block's metadata computed once is the dataset
    ``ray.data.from_arrow_refs`` makes of the same block order."""
    import pyarrow as pa
    import ray

    from vla_ray.data.stream import repeated_blocks

    refs = [ray.put(pa.table({"x": [i, 10 + i], "y": [f"e{i}"] * 2})) for i in range(3)]
    order = [2, 0, 1, 1, 0, 2, 2]
    got = repeated_blocks(refs, order)
    expected = ray.data.from_arrow_refs([refs[i] for i in order])
    assert got.num_blocks() == expected.num_blocks() == len(order)
    assert got.count() == expected.count() == 2 * len(order)
    assert got.schema() == expected.schema()
    tables = [ray.get(r) for r in got.to_arrow_refs()]
    assert tables == [ray.get(r) for r in expected.to_arrow_refs()]
    assert [t["x"][0].as_py() for t in tables] == order


def test_dataset_statistics_read_in_the_driver_equal_ray_datas(
    ray_session, hopper_data, monkeypatch
):
    """Small local datasets are read in the driver; the statistics are those of the Ray Data
    path (``LOCAL_READ_BYTES`` 0 forces it)."""
    from vla_ray.data import stats

    local = stats.episode_stats(hopper_data)
    local_actions = stats.dataset_action_statistics(hopper_data)
    episodes = read_episodes(hopper_data)
    np.testing.assert_allclose(local["returns"], [float(np.sum(e.get_rewards())) for e in episodes])
    assert local["lengths"].tolist() == [len(e) for e in episodes]
    monkeypatch.setattr(stats, "LOCAL_READ_BYTES", 0)
    remote = stats.episode_stats(hopper_data)
    np.testing.assert_allclose(sorted(remote["returns"]), sorted(local["returns"]))
    for key in ("state_mean", "state_std"):
        np.testing.assert_allclose(remote[key], local[key], rtol=1e-6)
    remote_actions = stats.dataset_action_statistics(hopper_data)
    for key in ("mean", "std", "min", "max", "q01", "q99", "count"):
        np.testing.assert_allclose(remote_actions[key], local_actions[key], rtol=1e-6)
