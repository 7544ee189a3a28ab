"""LangDrive (language-routed intersection driving): observation contract, routing, expert,
waypoint actions, errors that name the field."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import vla_ray.envs  # noqa: F401  (registers the ids)
from vla_ray.envs import LANGDRIVE_ID, LANGDRIVE_STATE_ID, get_expert
from vla_ray.tokenizer import load_tokenizer

pytest.importorskip("highway_env")

from vla_ray.envs.langdrive import BLIND_INSTRUCTION, MANOEUVRES, TEMPLATES  # noqa: E402


def _text(obs) -> str:
    return load_tokenizer().decode(obs["instruction"][obs["instruction_mask"] == 1].tolist())


def _run(env, expert, seed: int, manoeuvre: str):
    obs, info = env.reset(seed=seed, options={"manoeuvre": manoeuvre})
    done = False
    while not done:
        obs, _, terminated, truncated, info = env.step(expert(env))
        done = terminated or truncated
    return obs, info


def test_contract_sensors_and_info():
    env = gym.make(LANGDRIVE_ID, image_size=32, lidar_beams=16, imu_window=4, observed_vehicles=3)
    space = env.observation_space
    assert space["image"].shape == (32, 32, 3) and space["image"].dtype == np.uint8
    assert space["state"].shape == (6 + 5 * 3,)
    assert space["ego"].shape == (6,)
    assert space["imu"].shape == (4, 6)
    assert space["lidar"].shape == (16, 4) and space["lidar_mask"].shape == (16,)
    obs, info = env.reset(seed=3)
    assert space.contains(obs)
    text, manoeuvre = _text(obs), info["manoeuvre"]
    assert env.unwrapped.instruction in TEMPLATES[manoeuvre] and info["goal"] == manoeuvre
    assert ("left" in text) == (manoeuvre == "left") and ("right" in text) == (manoeuvre == "right")
    for key in ("is_success", "collision", "route_completion", "distance", "speed", "infractions"):
        assert key in info
    for _ in range(5):
        obs, reward, *_, info = env.step(np.array([0.5, 0.0], np.float32))
        assert space.contains(obs) and np.isfinite(reward)
    # LiDAR: hits within range with mask 1, misses at the range with intensity 0
    hit = obs["lidar_mask"] == 1
    dist = np.linalg.norm(obs["lidar"][:, :2], axis=1)
    np.testing.assert_allclose(dist[~hit], 40.0, rtol=1e-4)
    assert (dist[hit] < 40.0).all() and (obs["lidar"][hit, 3] == 1).all()
    # IMU: forward acceleration under throttle 0.5 (2.5 m/s^2), no yaw with steer 0
    assert obs["imu"][-1, 0] == pytest.approx(2.5, abs=0.3)
    assert abs(obs["imu"][-1, 5]) < 1e-3
    assert info["distance"] > 0 and 0 < info["route_completion"] < 1
    env.close()


def test_blind_instruction_and_paraphrases():
    env = gym.make(LANGDRIVE_STATE_ID, instruction_mode="blind")
    obs, info = env.reset(seed=0)
    assert _text(obs) == BLIND_INSTRUCTION and info["manoeuvre"] in MANOEUVRES
    env.close()
    env = gym.make(LANGDRIVE_STATE_ID)
    seen = {(env.reset(seed=s)[1]["manoeuvre"], env.unwrapped.instruction) for s in range(15)}
    assert {m for m, _ in seen} == set(MANOEUVRES)
    assert len(seen) > 6  # several paraphrases per manoeuvre
    env.close()


def test_expert_reaches_the_named_exit():
    """One episode per manoeuvre: the expert ends in the named exit (left: west, straight:
    north, right: east as drawn)."""
    env = gym.make(LANGDRIVE_STATE_ID)
    expert = get_expert(LANGDRIVE_STATE_ID)
    for manoeuvre, seed in (("left", 1), ("straight", 2), ("right", 3)):
        _, info = _run(env, expert, seed, manoeuvre)
        assert info["is_success"] and not info["collision"], (manoeuvre, info)
        assert info["route_completion"] == 1.0
        x, y = env.unwrapped.ego.position
        assert {"left": x < -10, "straight": y < -10, "right": x > 10}[manoeuvre]
    env.close()


def test_wrong_exit_fails():
    """The expert's route to the left exit while the episode names the right one."""
    env = gym.make(LANGDRIVE_STATE_ID)
    expert = get_expert(LANGDRIVE_STATE_ID)
    env.reset(seed=1, options={"manoeuvre": "right"})
    inner = env.unwrapped
    right_exit = inner._exit_lane
    inner.manoeuvre = "left"
    inner._build_route()  # the expert follows the left route ...
    inner._exit_lane = right_exit  # ... the episode still asks for the right exit
    done = False
    while not done:
        _, reward, terminated, truncated, info = env.step(expert(env))
        done = terminated or truncated
    assert terminated and info["wrong_exit"] and not info["is_success"]
    assert info["infractions"]["route_deviation"] == 1
    env.close()


def test_waypoint_actions():
    env = gym.make(LANGDRIVE_STATE_ID, action="waypoints", waypoints=3)
    assert env.action_space.shape == (7,)
    inner = env.unwrapped
    env.reset(seed=0)
    ahead = np.array([0.25, 0.0, 0.5, 0.0, 0.75, 0.0, 0.0], np.float32)
    assert inner.controls(ahead)[1] == pytest.approx(0.0, abs=1e-6)
    left = np.array([0.25, 0.1, 0.5, 0.3, 0.75, 0.6, 0.0], np.float32)
    assert inner.controls(left)[1] > 0.1
    obs, *_ = env.step(left)
    assert obs["imu"][-1, 5] > 0  # yaw rate: turning left
    env.close()
    env = gym.make(LANGDRIVE_STATE_ID, action="waypoints")
    _, info = _run(env, get_expert(LANGDRIVE_STATE_ID), 2, "left")
    assert info["is_success"], info
    env.close()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(lidar_beams=2), "lidar_beams"),
        (dict(action="steer"), "action"),
        (dict(manoeuvre="u-turn"), "manoeuvre"),
        (dict(spawn_probability=1.5), "spawn_probability"),
        (dict(instruction_mode="deaf"), "instruction_mode"),
        (dict(simulation_frequency=7), "simulation_frequency"),
        (dict(image_size=4), "image_size"),
    ],
)
def test_bad_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}` must be"):
        gym.make(LANGDRIVE_ID, **kwargs)
