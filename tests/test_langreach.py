"""Tests of the LangReach environment and its scripted expert."""

from __future__ import annotations

import math
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import vla_ray.envs  # noqa: E402, F401  (registers the env ids)
from vla_ray.envs import ENV_IDS, LangReachEnv, ScriptedExpert, get_expert  # noqa: E402
from vla_ray.envs.experts import rollout_expert  # noqa: E402
from vla_ray.tokenizer import load_tokenizer  # noqa: E402

ENV_ID = "vla_ray/LangReach-v0"


@pytest.fixture(scope="module")
def env():
    e = gym.make(ENV_ID)
    yield e
    e.close()


def _world_to_pixel(xy: np.ndarray, size: int) -> tuple[int, int]:
    """(row, col) of world point ``xy`` in the top-down image (camera z=2.5, fovy=45)."""
    half = 2.5 * math.tan(math.radians(45 / 2))
    col = (xy[0] + half) / (2 * half) * size
    row = (half - xy[1]) / (2 * half) * size
    return int(row), int(col)


def test_registered_and_observation_spec(env):
    assert ENV_ID in ENV_IDS and ENV_ID in gym.registry
    assert env.spec.max_episode_steps == 50
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert set(obs) == {"image", "state", "instruction", "instruction_mask"}
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert obs["state"].shape == (4,) and obs["state"].dtype == np.float32
    assert obs["instruction"].shape == (16,) and obs["instruction"].dtype == np.int64
    assert obs["instruction_mask"].dtype == np.int64
    assert env.action_space == gym.spaces.Box(-1, 1, (2,), np.float32)
    np.testing.assert_allclose(obs["state"][:2], info["agent_position"], atol=1e-6)
    for key in ("is_success", "instruction", "target_color", "target_index", "distance"):
        assert key in info
    assert info["target_positions"].shape == (3, 2)
    obs, *_ = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs)


def test_image_shows_coloured_targets(env):
    obs, info = env.reset(seed=3)
    img = obs["image"].astype(int)
    assert img.std() > 10  # not constant
    pure = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}
    for idx, rgb in pure.items():
        r, c = _world_to_pixel(info["target_positions"][idx], 64)
        patch = img[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2].reshape(-1, 3)
        dist = np.abs(patch - np.array(rgb)).sum(axis=1)
        assert dist.min() < 60, (idx, patch)
    # The red target is the only strongly red blob: about pi*r^2 pixels of it.
    red = (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)
    assert 8 <= red.sum() <= 60
    # The agent (white sphere) is visible at its position.
    r, c = _world_to_pixel(info["agent_position"], 64)
    assert img[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2].min(axis=-1).max() > 200


def test_seeded_reset_reproducible(env):
    o1, i1 = env.reset(seed=123)
    o2, i2 = env.reset(seed=123)
    assert o1["image"].tobytes() == o2["image"].tobytes()
    for key in ("state", "instruction", "instruction_mask"):
        np.testing.assert_array_equal(o1[key], o2[key])
    assert i1["instruction"] == i2["instruction"]
    np.testing.assert_array_equal(i1["target_positions"], i2["target_positions"])
    o3, i3 = env.reset(seed=124)
    assert not np.allclose(i1["target_positions"], i3["target_positions"])
    assert o1["image"].tobytes() != o3["image"].tobytes()


def test_layout_constraints_and_goal_distribution(env):
    colours, templates = [], set()
    for seed in range(200):
        _, info = env.reset(seed=seed)
        tp, agent = info["target_positions"], info["agent_position"]
        assert np.all(np.abs(tp) <= 0.8) and np.all(np.abs(agent) <= 0.8)
        assert np.linalg.norm(tp - agent, axis=1).min() >= 0.35
        pair = np.linalg.norm(tp[:, None] - tp[None], axis=-1) + np.eye(3) * 9
        assert pair.min() >= 0.4
        colours.append(info["target_index"])
        templates.add(info["instruction"].replace(info["target_color"], "{c}"))
    counts = np.bincount(colours, minlength=3)
    assert counts.min() > 40, counts
    assert len(templates) >= 6


def test_instruction_names_goal_and_decodes(env):
    tok = load_tokenizer()
    for seed in range(10):
        obs, info = env.reset(seed=seed)
        assert info["target_color"] in info["instruction"].split()
        assert info["target_color"] == ("red", "green", "blue")[info["target_index"]]
        ids = obs["instruction"][obs["instruction_mask"] == 1]
        assert tok.decode(ids.tolist()) == info["instruction"]
        assert np.all(obs["instruction"][obs["instruction_mask"] == 0] == tok.pad_token_id)
        # Constant within an episode.
        obs2, *_ = env.step(np.zeros(2, np.float32))
        np.testing.assert_array_equal(obs["instruction"], obs2["instruction"])


def test_blind_mode_constant_instruction():
    env = gym.make(ENV_ID, instruction_mode="blind")
    tok = load_tokenizer()
    ids, colours = set(), set()
    for seed in range(20):
        obs, info = env.reset(seed=seed)
        ids.add(obs["instruction"].tobytes())
        colours.add(info["target_color"])
        assert info["instruction"] == "reach the target"
        assert tok.decode(obs["instruction"][obs["instruction_mask"] == 1].tolist()) == (
            "reach the target"
        )
    env.close()
    assert len(ids) == 1
    assert len(colours) == 3  # the goal is still a random colour


def test_expert_success_rate():
    env = gym.make(ENV_ID)
    stats = rollout_expert(env, get_expert(ENV_ID), episodes=100, seed=0)
    env.close()
    print(f"\nexpert over 100 episodes: {stats}")
    assert stats["success_rate"] >= 0.95
    assert stats["mean_length"] < 50


def test_noisy_expert_still_good_and_clipped(env):
    expert = ScriptedExpert(noise=0.3, seed=0)
    env.reset(seed=0)
    for _ in range(20):
        a = expert(env)
        assert a.shape == (2,) and a.dtype == np.float32 and np.all(np.abs(a) <= 1)
    stats = rollout_expert(env, expert, episodes=20, seed=1000)
    assert stats["success_rate"] >= 0.9


def test_random_policy_low_success():
    env = gym.make(ENV_ID)
    env.action_space.seed(0)
    successes = []
    for seed in range(100):
        env.reset(seed=seed)
        done = False
        while not done:
            _, _, terminated, truncated, info = env.step(env.action_space.sample())
            done = terminated or truncated
        successes.append(info["is_success"])
    env.close()
    rate = float(np.mean(successes))
    print(f"\nrandom policy success over 100 episodes: {rate:.2f}")
    assert rate < 0.4


def test_get_expert_unknown_id():
    with pytest.raises(ValueError, match="vla_ray/LangReach-v0"):
        get_expert("CartPole-v1")


def test_reward_shaping_bonus_and_termination():
    env = LangReachEnv()
    _, info = env.reset(seed=7)
    d0 = info["distance"]
    obs, reward, terminated, truncated, info = env.step(env.expert_action())
    assert reward > 0 and info["distance"] < d0
    assert reward == pytest.approx(10 * (d0 - info["distance"]))
    # Moving away is penalised.
    _, reward_away, *_ = env.step(-env.expert_action())
    assert reward_away < 0

    _, info = env.reset(seed=7)
    rewards, d_start = [], info["distance"]
    terminated = False
    while not terminated:
        _, r, terminated, truncated, info = env.step(env.expert_action())
        rewards.append(r)
        assert not truncated
    assert info["is_success"] and info["distance"] <= env.success_radius
    assert rewards[-1] > 4.0 and all(r < 4.0 for r in rewards[:-1])
    assert sum(rewards) == pytest.approx(10 * (d_start - info["distance"]) + 5.0)
    # The bonus fires only once even if stepped past termination.
    _, r, terminated, _, info = env.step(np.zeros(2, np.float32))
    assert r < 4.0 and terminated and info["is_success"]
    env.close()


def test_truncation_at_max_episode_steps():
    env = gym.make(ENV_ID)
    env.reset(seed=0)
    for t in range(1, 51):
        _, _, terminated, truncated, info = env.step(np.zeros(2, np.float32))
        assert not terminated
        assert truncated == (t == 50)
    env.close()
    raw = LangReachEnv(max_episode_steps=5)
    raw.reset(seed=0)
    flags = [raw.step(np.zeros(2, np.float32))[3] for _ in range(5)]
    assert flags == [False] * 4 + [True]
    raw.close()


def test_agent_stays_in_arena_and_tracks_velocity():
    env = LangReachEnv()
    env.reset(seed=0)
    obs, *_ = env.step(np.array([1.0, -0.5], np.float32))
    np.testing.assert_allclose(obs["state"][2:], [1.0, -0.5], atol=0.02)
    for _ in range(40):
        obs, *_ = env.step(np.array([1.0, 1.0], np.float32))
    assert np.all(np.abs(obs["state"][:2]) <= 1.0)
    env.close()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": 64.0}, "image_size"),
        ({"num_targets": 0}, "num_targets"),
        ({"num_targets": 7}, "num_targets"),
        ({"max_episode_steps": 0}, "max_episode_steps"),
        ({"instruction_max_length": 2}, "instruction_max_length"),
        ({"instruction_mode": "audio"}, "instruction_mode"),
        ({"success_radius": -0.1}, "success_radius"),
        ({"render_mode": "human"}, "render_mode"),
        ({"tokenizer": 3}, "tokenizer"),
        ({"observation": "depth"}, "observation"),
    ],
)
def test_bad_constructor_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LangReachEnv(**kwargs)


def test_num_targets_and_image_size_options():
    env = LangReachEnv(num_targets=6, image_size=32)
    obs, info = env.reset(seed=1)
    assert obs["image"].shape == (32, 32, 3)
    assert info["target_positions"].shape == (6, 2)
    assert env.observation_space.contains(obs)
    env.close()


def test_render_and_close():
    env = gym.make(ENV_ID, render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    assert frame.std() > 10
    env.close()
    env.close()  # idempotent
    assert LangReachEnv().render() is None


STATE_ID = "vla_ray/LangReachState-v0"


def test_state_variant_puts_targets_in_the_state_and_renders_nothing():
    assert STATE_ID in ENV_IDS and STATE_ID in gym.registry
    env = gym.make(STATE_ID, num_targets=2)
    assert env.spec.max_episode_steps == 50
    obs, info = env.reset(seed=0)
    assert set(obs) == {"state", "instruction", "instruction_mask"}
    assert env.observation_space.contains(obs)
    assert obs["state"].shape == (8,) and obs["state"].dtype == np.float32
    np.testing.assert_allclose(obs["state"][:2], info["agent_position"], atol=1e-6)
    np.testing.assert_allclose(obs["state"][4:].reshape(2, 2), info["target_positions"], atol=1e-6)
    # the instruction names the goal colour, as in the pixel variant
    assert info["target_color"] in info["instruction"]
    obs, *_ = env.step(np.array([1.0, 0.0], np.float32))
    assert obs["state"][2] == pytest.approx(1.0, abs=0.02)
    assert env.unwrapped._renderer is None  # no per-step rendering
    # same layout and dynamics as the pixel variant for the same seed
    pixels = gym.make(ENV_ID, num_targets=2)
    _, pinfo = pixels.reset(seed=0)
    np.testing.assert_allclose(pinfo["target_positions"], info["target_positions"])
    pixels.close()
    stats = rollout_expert(env, get_expert(STATE_ID), episodes=10, seed=0)
    assert stats["success_rate"] == 1.0
    env.close()
