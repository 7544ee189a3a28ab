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


def test_expert_succeeds_on_at_least_95_percent_of_episodes():
    """The default driving task's scripted expert over reset seeds 0-39 (deterministic: the
    same seeds give the same episodes), the manoeuvre drawn by the env: >= 95% success
    (measured 39/40; 97/100 over seeds 0-99 in docs/benchmarks.md)."""
    env = gym.make(LANGDRIVE_STATE_ID)
    expert = get_expert(LANGDRIVE_STATE_ID)
    successes = []
    for seed in range(40):
        env.reset(seed=seed)
        done = False
        while not done:
            _, _, terminated, truncated, info = env.step(expert(env))
            done = terminated or truncated
        successes.append(bool(info["is_success"]))
    env.close()
    assert np.mean(successes) >= 0.95, [i for i, ok in enumerate(successes) if not ok]


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


# -- driving metrics ------------------------------------------------------------------------------
def test_driving_score_carla_coefficients():
    from vla_ray.driving.metrics import aggregate, episode_metrics, infraction_penalty

    assert infraction_penalty({"collision_vehicle": 2, "red_light": 1}) == pytest.approx(
        0.6 * 0.6 * 0.7
    )
    assert infraction_penalty({"offroad": 3}) == 1.0  # no coefficient: shows in completion
    with pytest.raises(ValueError, match=r"infractions\['red_light'\]: expected a count >= 0"):
        infraction_penalty({"red_light": -1})
    assert episode_metrics({"is_success": True}) is None
    a = episode_metrics(
        dict(
            route_completion=0.5,
            collision=True,
            infractions={"collision_vehicle": 1},
            mean_speed=4.0,
            distance=400.0,
        )
    )
    b = episode_metrics(dict(route_completion=1.0, infractions={}, mean_speed=8.0, distance=600.0))
    assert a["driving_score"] == pytest.approx(0.3) and b["driving_score"] == 1.0
    agg = aggregate([a, b])
    assert agg["driving_score"] == pytest.approx(0.65)
    assert agg["collision_rate"] == 0.5 and agg["mean_speed"] == 6.0
    assert agg["infractions_per_km"] == {"collision_vehicle": pytest.approx(1.0)}


def test_eval_reports_driving_metrics_per_manoeuvre(capsys):
    """`vla-ray eval`'s evaluate(): a policy that always drives straight at cruise speed
    succeeds only on the straight episodes; driving metrics come from the env's info."""
    from vla_ray.cli import _print_eval
    from vla_ray.evaluate import Policy, evaluate

    def straight(obs):  # waypoints straight ahead, target speed ~8 m/s
        n = len(obs["state"])
        return np.tile(
            np.array([0.2, 0.0, 0.4, 0.0, 0.6, 0.0, 0.8, 0.0, 1 / 3], np.float32), (n, 1)
        )

    policy = Policy(straight, {}, "test")
    cfg = dict(action="waypoints", initial_vehicles=1, spawn_probability=0.0)
    result = evaluate(policy, LANGDRIVE_STATE_ID, cfg, episodes=4, seed=0, progress=False)
    by = result["success_by_target"]
    assert set(by) <= set(MANOEUVRES) and by.get("straight", 1.0) == 1.0
    assert by.get("left", 0.0) == 0.0 and by.get("right", 0.0) == 0.0
    driving = result["driving"]
    assert 0.0 < driving["route_completion"] <= 1.0 and 0.0 <= driving["collision_rate"] <= 1.0
    assert driving["mean_speed"] > 4.0
    _print_eval(result)
    assert "driving: route completion" in capsys.readouterr().out


def test_training_callback_logs_goal_and_driving_metrics():
    from ray.rllib.utils.metrics.metrics_logger import MetricsLogger

    from vla_ray.callbacks import SuccessRateCallback
    from vla_ray.train import summarize

    class Episode:
        def __init__(self, info):
            self.info = info

        def get_infos(self, index):
            return self.info

    logger = MetricsLogger()
    for ok, completion in ((True, 1.0), (False, 0.5)):
        info = dict(
            is_success=ok,
            goal="left",
            route_completion=completion,
            collision=not ok,
            infractions={"collision_vehicle": int(not ok)},
            mean_speed=6.0,
        )
        SuccessRateCallback().on_episode_end(episode=Episode(info), metrics_logger=logger)
    row = summarize({"env_runners": logger.reduce()})
    assert row["success_by_target"] == {"left": 0.5}
    assert row["driving"]["route_completion"] == pytest.approx(0.75)
    assert row["driving"]["driving_score"] == pytest.approx((1.0 + 0.5 * 0.6) / 2)
    assert row["driving"]["collision"] == pytest.approx(0.5)


# -- presets ------------------------------------------------------------------------------------
def test_langdrive_presets_fused_sensors_and_waypoints():
    from vla_ray.presets import get_preset

    for name in ("langdrive-bc", "langdrive-dagger", "langdrive-ppo", "langdrive-sac"):
        preset = get_preset(name)
        assert preset.env_config["action"] == "waypoints"
        assert set(preset.model["sensors"]) == {"lidar", "imu", "ego"}
        assert preset.model["fusion"] == "gated"
    assert get_preset("langdrive-dagger").env_config["expert_beta"] == 1.0


@pytest.mark.slow
def test_ppo_fused_multisensor_two_iterations_two_env_runners(ray_session, tmp_path):
    """PPO with the camera + LiDAR + IMU + ego VLA (gated fusion) in waypoint space: 2
    iterations on 2 EnvRunners (tiny batch). ~25-35 s on the 2-core CPU, most of it the
    EnvRunners' start."""
    import json

    from vla_ray.run_spec import resolve
    from vla_ray.train import train

    small = {
        "training": {"train_batch_size_per_learner": 64, "minibatch_size": 32, "num_epochs": 1},
        "env_runners": {"num_envs_per_env_runner": 1},
        "env_config": {"image_size": 32, "lidar_beams": 16, "initial_vehicles": 2},
    }
    spec = resolve("langdrive-ppo", small, num_env_runners=2)
    summary = train(spec, tmp_path / "run", stop_iters=2, progress=False)
    assert summary["iteration"] == 2 and summary["env_steps"] >= 128
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().strip().splitlines()
    assert len(rows) == 2 and "driving" in json.loads(rows[-1])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["fusion"] == "gated"
