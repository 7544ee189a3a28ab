"""VLA-Dreamer's RLlib pieces without Ray: the sequence replay's layout, the stateful module
acting on LangReach observations, and checkpoints that reproduce imagined rollouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModule

from vla_ray.algorithms import get_algorithm
from vla_ray.world_model import WorldModelInputError
from vla_ray.world_model.imagination import imagine
from vla_ray.world_model.replay import SequenceReplay

TINY_MODEL = dict(
    vision="cnn",
    vision_config={"tokens": "keypoints"},
    llm_config={"num_hidden_layers": 1},
    world_model=dict(deter=16, stoch=4, classes=4, hidden=16, horizon=3),
)


def test_replay_windows_follow_the_world_model_layout():
    replay = SequenceReplay()
    L = 4
    obs = {"state": np.arange(L + 1, dtype=np.float32)[:, None]}
    actions = 10 + np.arange(L, dtype=np.float32)[:, None]
    rewards = 100 + np.arange(L, dtype=np.float32)
    replay.add(obs, actions, rewards, terminated=True)
    rng = np.random.default_rng(0)
    b = replay.sample(8, L + 1, rng)  # the whole fragment: start 0
    assert b["obs"]["state"][0, :, 0].tolist() == [0, 1, 2, 3, 4]
    # obs t came from action t-1 and brought reward t-1; none before the first
    assert b["prev_actions"][0, :, 0].tolist() == [0, 10, 11, 12, 13]
    assert b["rewards"][0].tolist() == [0, 100, 101, 102, 103]
    assert b["continues"][0].tolist() == [1, 1, 1, 1, 0]  # the last observation is terminal
    assert b["is_first"][0].tolist() == [1, 0, 0, 0, 0] and b["mask"].min() == 1
    w = replay.sample(16, 2, rng)  # windows start anywhere; their first step restarts
    for row in range(16):
        s = int(w["obs"]["state"][row, 0, 0])
        assert w["prev_actions"][row, 1, 0] == 10 + s and w["rewards"][row, 1] == 100 + s
    long = replay.sample(2, 7, rng)  # longer than the fragment: padded, masked
    assert long["mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match=r"observations\['state'\]: expected 5 rows"):
        replay.add({"state": np.zeros((3, 1))}, actions, rewards, False)


@pytest.fixture(scope="module")
def module(langreach_spaces):
    torch.manual_seed(0)
    obs_space, act_space = langreach_spaces
    cls = get_algorithm("dreamer").module_class()
    return cls(observation_space=obs_space, action_space=act_space, model_config=TINY_MODEL)


def _batch(module, obs_batch, n=2):
    obs = {k: torch.as_tensor(v[:n]) for k, v in obs_batch.items()}
    init = module.get_initial_state()
    state = {k: v.expand(n, *v.shape) for k, v in init.items()}
    return {Columns.OBS: obs, Columns.STATE_IN: state}


def test_module_filters_and_acts_within_bounds(module, langreach_obs_batch):
    out = module.forward_exploration(_batch(module, langreach_obs_batch))
    a = out[Columns.ACTIONS]
    assert a.shape == (2, 2) and a.abs().max() <= 1.0
    st = out[Columns.STATE_OUT]
    assert st["h"].shape == (2, 16) and st["z"].shape == (2, 16)
    assert torch.equal(st["first"], torch.zeros(2, 1)) and torch.equal(st["a"], a)
    # with a time dim (RLlib's connector for stateful modules) the same shapes plus T=1
    batch = _batch(module, langreach_obs_batch)
    batch[Columns.OBS] = {k: v[:, None] for k, v in batch[Columns.OBS].items()}
    assert module.forward_inference(batch)[Columns.ACTIONS].shape == (2, 1, 2)


def test_checkpoint_round_trip_reproduces_imagined_rollouts(module, langreach_obs_batch, tmp_path):
    def rollout(m):
        out = m.forward_inference(_batch(m, langreach_obs_batch))[Columns.STATE_OUT]
        from vla_ray.world_model.rssm import RSSMState

        start = RSSMState(out["h"], out["z"].reshape(2, 4, 4))
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            r = imagine(m.world_model, m.actor, start, 5, generator=g)
        return r.features, r.rewards, m.critic(r.features), m.critic.slow_value(r.features)

    with torch.no_grad():  # make the slow critic differ from the critic: it must be saved too
        for p in module.critic.slow.parameters():
            p.add_(0.01)
    module.return_norm.update(torch.linspace(0, 5, 11))
    module.save_to_path(tmp_path / "module")
    restored = RLModule.from_checkpoint(tmp_path / "module")
    for a, b in zip(rollout(module), rollout(restored), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(module.return_norm.high, restored.return_norm.high)


def test_dataset_without_rewards_is_named_when_reward_prediction_is_on(module):
    replay = SequenceReplay()
    obs = {k: np.zeros((4, *s.shape), s.dtype) for k, s in module.observation_space.items()}
    replay.add(obs, np.zeros((3, 2)), None, False)
    b = replay.sample(1, 3, np.random.default_rng(0))
    batch = {
        "obs": {k: torch.as_tensor(v) for k, v in b["obs"].items()},
        **{k: torch.as_tensor(v) for k, v in b.items() if k != "obs"},
    }
    assert "rewards" not in batch
    with pytest.raises(WorldModelInputError, match="'rewards' is missing.*predict_reward"):
        module.world_model.loss(batch)


def test_dreamer_pretrains_offline_then_trains_two_iterations_with_two_env_runners(
    ray_session, tmp_path
):
    """``--data`` (a small collected dataset) seeds the replay and pretrains the world model,
    then 2 iterations with 2 EnvRunners; the learner's checkpoint restores a module whose
    imagined rollouts match (fixed generator)."""
    import time

    from vla_ray.data.collect import collect
    from vla_ray.data.convert import read_dataset
    from vla_ray.train import build_algorithm_config, resolve
    from vla_ray.world_model.rssm import RSSMState

    env_config = {"num_targets": 1, "image_size": 16, "max_episode_steps": 6}
    data = tmp_path / "demos"
    collect("vla_ray/LangReach-v0", "expert", 2, data, env_config=env_config, progress=False)
    spec = resolve(
        "langreach-dreamer",
        {
            "env_config": env_config,
            "model": {k: v for k, v in TINY_MODEL.items() if k != "vision_config"},
            "training": {
                "train_batch_size_per_learner": 16,
                "batch_size_B": 2,
                "batch_length_T": 4,
                "updates_per_iteration": 1,
                "pretrain_updates": 2,
            },
            "env_runners": {"num_envs_per_env_runner": 1},
        },
        num_env_runners=2,
        data=str(data),
    )
    algo = build_algorithm_config(spec).build_algo()
    try:
        n_data = sum(len(ep) for ep in read_dataset(data, spec.env, env_config))
        assert algo.replay.num_steps == n_data > 0  # the dataset's steps
        t0 = time.time()
        results = [algo.train() for _ in range(2)]
        elapsed = time.time() - t0
        learner = results[-1]["learners"]["default_policy"]
        assert {"image_mse", "reward_mae", "kl", "actor_loss", "critic_loss"} <= set(learner)
        assert results[-1]["env_runners"]["num_env_steps_sampled_lifetime"] >= 32
        assert algo.replay.num_steps >= n_data + 32
        assert elapsed < 60, elapsed  # 2 iterations: ~1.4 s on a quiet machine
        ckpt = algo.save_to_path(tmp_path / "ckpt")
        live = algo.get_module()
    finally:
        algo.stop()
    restored = RLModule.from_checkpoint(f"{ckpt}/learner_group/learner/rl_module/default_policy")

    def dream(m):
        start = RSSMState(torch.zeros(3, 16), torch.eye(4).repeat(3, 1, 1))
        with torch.no_grad():
            return imagine(m.world_model, m.actor, start, 4, generator=torch.Generator())

    torch.manual_seed(0)
    a = dream(live)
    torch.manual_seed(0)
    b = dream(restored)
    assert torch.equal(a.features, b.features) and torch.equal(a.rewards, b.rewards)


@pytest.mark.parametrize("planner", ["none", "cem", "mppi"])
def test_eval_runs_a_world_model_checkpoint_with_a_planner(module, tmp_path, planner):
    from vla_ray.evaluate import evaluate, load_policy

    module.save_to_path(tmp_path / "module")
    policy = load_policy(tmp_path / "module", planner=planner)
    if planner != "none":
        policy.context.config.iterations, policy.context.config.num_samples = 2, 16
    result = evaluate(
        policy, "vla_ray/LangReach-v0", {"max_episode_steps": 4}, episodes=1, progress=False
    )
    assert result["episodes"] == 1 and result["mean_length"] == 4


LOAD_IN_A_FRESH_PROCESS = """
import sys
from vla_ray.evaluate import load_policy

for path in sys.argv[1:]:
    policy = load_policy(path)
    print(type(policy.context).__name__, "ray.rllib.algorithms.dreamerv3" in sys.modules)
"""


def test_eval_imports_the_world_model_only_for_its_checkpoints(module, langreach_spaces, tmp_path):
    """Importing RLlib's DreamerV3 builds a debugging env that prints gymnasium warnings: a VLA
    checkpoint loads without it, a world-model checkpoint still loads as one."""
    import subprocess
    import sys

    from vla_ray.presets import get_preset
    from vla_ray.rl_module import VLAModule

    obs_space, act_space = langreach_spaces
    vla = VLAModule(
        observation_space=obs_space,
        action_space=act_space,
        model_config=get_preset("langreach-ppo").model,
    )
    vla.save_to_path(tmp_path / "vla")
    module.save_to_path(tmp_path / "world_model")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_IN_A_FRESH_PROCESS,
            *(str(tmp_path / n) for n in ("vla", "world_model")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-4:] == ["NoneType", "False", "LatentPolicy", "True"]


def test_planner_needs_a_world_model_checkpoint(tiny_vla_dir):
    from vla_ray.evaluate import load_policy

    with pytest.raises(ValueError, match="--planner cem: planning needs a world-model"):
        load_policy(tiny_vla_dir, planner="cem")


def test_imagine_writes_an_open_loop_video_of_real_and_imagined_frames(module, tmp_path):
    """``vla-ray eval --imagine N``: per episode ``context`` observed + N imagined frames, each
    real | gap | decoded side by side (64x64 LangReach pixels upscaled 2x)."""
    import json

    import imageio.v2 as imageio

    from vla_ray.cli import main

    module.save_to_path(tmp_path / "module")
    video, js = tmp_path / "open_loop.mp4", tmp_path / "imagine.json"
    argv = ["eval", "--checkpoint", str(tmp_path / "module"), "--env", "vla_ray/LangReach-v0"]
    argv += ["--imagine", "4", "--imagine-context", "2", "--video", str(video), "--json", str(js)]
    assert main(argv) == 0
    out = json.loads(js.read_text())
    frames = imageio.mimread(video)
    assert out["frames"] == len(frames) == 6
    assert frames[0].shape == tuple(out["frame_shape"]) == (128, 128 + 16 + 128, 3)
    assert len(out["image_mse_by_step"]) == len(out["reward_abs_error_by_step"]) == 4
    # the strip over the decoded image: green while observed, red once imagined
    assert tuple(frames[1][0, -10]) != tuple(frames[2][0, -10])


def test_imagine_is_refused_without_a_world_model_or_an_image_decoder(
    tiny_vla_dir, langreach_spaces, tmp_path
):
    from vla_ray.evaluate import Policy, load_policy
    from vla_ray.world_model.diagnostics import imagine_video
    from vla_ray.world_model.policy import LatentPolicy

    with pytest.raises(ValueError, match="--imagine: open-loop prediction needs a world-model"):
        imagine_video(load_policy(tiny_vla_dir), tmp_path / "v.mp4", horizon=3)
    obs_space, act_space = langreach_spaces
    latent = dict(TINY_MODEL, world_model=dict(TINY_MODEL["world_model"], objective="latent"))
    cls = get_algorithm("dreamer").module_class()
    m = cls(observation_space=obs_space, action_space=act_space, model_config=latent)
    runner = LatentPolicy(m)
    policy = Policy(runner, {"env": "vla_ray/LangReach-v0"}, "rllib", context=runner)
    with pytest.raises(ValueError, match="no image decoder.*objective 'latent'"):
        imagine_video(policy, tmp_path / "v.mp4", horizon=3)
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize(
    "name, image, decoded",
    [("halfcheetah-pixels-dreamer", True, {"image"}), ("hopper-dreamer", False, {"state"})],
)
def test_locomotion_dreamer_presets_build_their_config_and_module(name, image, decoded):
    """The pixel preset decodes the image alone (no state in its observations), the Hopper one
    the state with a state-only VLA; both resolve to a dreamer AlgorithmConfig."""
    import gymnasium as gym

    from vla_ray.train import build_algorithm_config, resolve

    spec = resolve(name)
    cfg = build_algorithm_config(spec)
    assert cfg.env == spec.env and cfg.batch_length_T == 32 and cfg.updates_per_iteration == 2
    # the env's observation spaces, without rendering (pixels: 64x64 image, no state)
    tokens = {
        "instruction": gym.spaces.Box(0, 139, (16,), np.int64),
        "instruction_mask": gym.spaces.Box(0, 1, (16,), np.int64),
    }
    extra = (
        {"image": gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)}
        if image
        else {"state": gym.spaces.Box(-np.inf, np.inf, (11,), np.float32)}
    )
    assert spec.settings["env_config"].get("include_state", True) is not image
    action_dim = 6 if image else 3
    m = cfg.get_default_rl_module_spec().module_class(
        observation_space=gym.spaces.Dict({**tokens, **extra}),
        action_space=gym.spaces.Box(-1.0, 1.0, (action_dim,), np.float32),
        model_config=spec.settings["model"],
    )
    assert set(m.world_model.decoders) == decoded
    assert (m.vla_config.vision != "none") is image
    assert m.world_model.action_dim == action_dim and m.wm_config.deter == 128
