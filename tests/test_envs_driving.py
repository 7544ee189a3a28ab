"""PushT, highway-env and CARLA envs: observation contract, reward, info, documented errors."""

from __future__ import annotations

import os
import socket
import time

import gymnasium as gym
import numpy as np
import pytest

import vla_ray.envs  # noqa: F401  (registers the ids)
from vla_ray.tokenizer import load_tokenizer

pytest.importorskip("gym_pusht")
pytest.importorskip("highway_env")

CONTRACT_KEYS = {"image", "state", "instruction", "instruction_mask"}


def _instruction(obs) -> str:
    return load_tokenizer().decode(obs["instruction"][obs["instruction_mask"] == 1].tolist())


def _check_steps(env, n: int, info_keys: set[str]):
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert info_keys <= set(info)
    for _ in range(n):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)
        assert np.isfinite(reward)
        assert info_keys <= set(info)
        if terminated or truncated:
            obs, info = env.reset()
    return obs, info


# -- PushT --------------------------------------------------------------------------------------
def test_pusht_contract_and_coverage_info():
    env = gym.make("vla_ray/PushT-v0", image_size=32)
    assert set(env.observation_space.spaces) == CONTRACT_KEYS
    assert env.observation_space["image"].shape == (32, 32, 3)
    assert env.observation_space["state"].shape == (2,)
    assert env.action_space.shape == (2,) and env.action_space.high.max() == 1.0
    obs, info = _check_steps(env, 5, {"is_success", "coverage"})
    assert _instruction(obs) == "push the t onto the target"
    assert obs["image"].std() > 0 and 0.0 <= info["coverage"] <= 1.0
    assert env.spec.max_episode_steps == 300
    env.close()


def test_pusht_success_at_full_coverage_and_action_mapping():
    env = gym.make("vla_ray/PushT-v0", image_size=32)
    inner = env.unwrapped
    np.testing.assert_allclose(inner.to_workspace(np.array([-1.0, 1.0])), [0.0, 512.0])
    np.testing.assert_allclose(inner.to_workspace(np.array([0.0, 0.0])), [256.0, 256.0])
    obs, info = env.reset(seed=0, options={"reset_to_state": [100, 100, 400, 120, 0.0]})
    np.testing.assert_allclose(obs["state"], [100 / 256 - 1, 100 / 256 - 1], atol=1e-5)
    # the block put exactly on the goal pose: coverage 1 -> success and termination
    inner._env.block.angle = np.pi / 4  # (the angle rotates about the centre of gravity: first)
    inner._env.block.position = (256.0, 256.0)
    obs, reward, terminated, _, info = env.step(np.array([100 / 256 - 1, 100 / 256 - 1]))
    assert info["coverage"] > 0.95
    assert terminated and info["is_success"] and reward == pytest.approx(1.0)
    # far from the goal: no success, reward = coverage / 0.95
    env.reset(seed=0, options={"reset_to_state": [100, 100, 400, 120, 0.0]})
    _, reward, terminated, _, info = env.step(np.zeros(2))
    assert not terminated and not info["is_success"]
    assert reward == pytest.approx(min(info["coverage"] / 0.95, 1.0))
    env.close()
    with pytest.raises(ValueError, match="image_size"):
        gym.make("vla_ray/PushT-v0", image_size=4)


# -- highway-env --------------------------------------------------------------------------------
def test_highway_contract_camera_and_info():
    env = gym.make("vla_ray/Highway-v0", image_size=[32, 48], duration=4)
    assert set(env.observation_space.spaces) == CONTRACT_KEYS
    assert env.action_space.shape == (2,)
    obs, info = _check_steps(env, 6, {"collision", "route_progress", "is_success"})
    assert obs["image"].shape == (32, 48, 3) and obs["image"].std() > 0  # a drawn road
    assert _instruction(obs) in vla_ray.envs.driving.INSTRUCTIONS
    env.close()
    state_only = gym.make("vla_ray/HighwayState-v0", observed_vehicles=3)
    assert set(state_only.observation_space.spaces) == CONTRACT_KEYS - {"image"}
    assert state_only.observation_space["state"].shape == (3 + 3 * 7,)
    state_only.close()
    with pytest.raises(ValueError, match="route_length"):
        gym.make("vla_ray/HighwayState-v0", route_length=0)


def test_highway_reward_progress_and_collision():
    env = gym.make(
        "vla_ray/HighwayState-v0", instruction="keep the lane and avoid collisions", duration=10
    )
    obs, _ = env.reset(seed=3)
    assert _instruction(obs) == "keep the lane and avoid collisions"
    progress = [0.0]
    for _ in range(3):  # straight ahead at a steady throttle: lane kept, route advances
        obs, reward, terminated, _, info = env.step(np.array([0.1, 0.0]))
        if terminated:
            break
        assert not info["collision"] and reward > 0.5
        progress.append(info["route_progress"])
    assert all(b > a for a, b in zip(progress, progress[1:], strict=False))
    assert progress[-1] <= 1.0
    # put a car right in front of the ego: collision -> penalty and termination
    inner = env.unwrapped._env
    other = next(v for v in inner.road.vehicles if v is not inner.vehicle)
    other.position = inner.vehicle.position + np.array([3.0, 0.0])
    other.heading = inner.vehicle.heading
    other.speed = 0.0
    _, reward, terminated, _, info = env.step(np.array([1.0, 0.0]))
    assert info["collision"] and terminated and not info["is_success"]
    assert reward <= 1.0 - env.unwrapped.collision_penalty
    env.close()


def test_highway_info_has_the_driving_metrics_keys():
    from vla_ray.driving.metrics import aggregate, episode_metrics

    env = gym.make("vla_ray/HighwayState-v0", duration=10)
    _, info = env.reset(seed=1)
    assert info["route_completion"] == 0.0 and info["distance"] == 0.0
    speeds = []
    for _ in range(3):
        _, _, terminated, _, info = env.step(np.array([0.0, 0.0]))
        assert not terminated
        speeds.append(info["speed"])
    assert info["route_completion"] == info["route_progress"] > 0
    assert info["distance"] == pytest.approx(info["route_progress"] * env.unwrapped.route_length)
    assert info["mean_speed"] == pytest.approx(np.mean(speeds))
    metrics = aggregate([episode_metrics(info)])
    assert metrics["route_completion"] == info["route_completion"]
    assert metrics["collision_rate"] == 0.0 and metrics["mean_speed"] == info["mean_speed"]
    env.close()


# -- CARLA --------------------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_carla_without_server_is_a_clear_error_naming_host_and_port():
    pytest.importorskip("carla")
    from vla_ray.envs.carla_env import CarlaConnectionError

    port = _closed_port()
    t0 = time.monotonic()
    with pytest.raises(CarlaConnectionError) as err:
        gym.make("vla_ray/Carla-v0", host="127.0.0.1", port=port, connect_timeout=1.0)
    assert time.monotonic() - t0 < 20  # the short client timeout, not a hang
    assert f"127.0.0.1:{port}" in str(err.value) and "CARLA_HOST" in str(err.value)


def test_carla_address_from_environment(monkeypatch):
    from vla_ray.envs.carla_env import server_address

    monkeypatch.setenv("CARLA_HOST", "sim.example")
    monkeypatch.setenv("CARLA_PORT", "2010")
    assert server_address() == ("sim.example", 2010)
    assert server_address("other", 3000) == ("other", 3000)
    monkeypatch.setenv("CARLA_PORT", "two thousand")
    with pytest.raises(ValueError, match="CARLA_PORT"):
        server_address()


needs_carla_server = pytest.mark.skipif(
    not os.environ.get("CARLA_HOST"),
    reason="needs a running CARLA server: set CARLA_HOST (and CARLA_PORT, default 2000), "
    "e.g. docker run --rm --gpus all --net=host carlasim/carla:0.9.16 bash CarlaUE4.sh "
    "-RenderOffScreen",
)


@needs_carla_server
def test_carla_server_contract_and_cleanup():
    pytest.importorskip("carla")
    from vla_ray.envs.carla_env import EGO_ROLE

    env = gym.make("vla_ray/Carla-v0", image_size=32, lidar=True, max_steps=20)
    inner = env.unwrapped
    assert inner.world.get_settings().synchronous_mode
    obs, _ = _check_steps(env, 10, {"collision", "route_progress", "is_success"})
    assert obs["image"].shape == (32, 32, 3)
    assert obs["state"].shape == (5 + 2 * 3 + 32,)
    world = inner.world
    ours = [a for a in world.get_actors() if a.attributes.get("role_name") == EGO_ROLE]
    assert len(ours) == 1
    env.close()
    assert not world.get_settings().synchronous_mode  # the original (asynchronous) settings
    world.wait_for_tick(5.0)
    ours = [a for a in world.get_actors() if a.attributes.get("role_name") == EGO_ROLE]
    assert ours == []


# -- many CARLA servers per run (no server needed) -----------------------------------------------
def test_carla_server_list_from_list_or_base_port():
    from vla_ray.envs.carla_env import server_list

    given = server_list("sim-a:2000, sim-b:2100", traffic_manager_port=9000)
    assert [(s.host, s.port, s.tm_port) for s in given] == [
        ("sim-a", 2000, 9000),
        ("sim-b", 2100, 9001),
    ]
    ranged = server_list(host="node", base_port=2000, num_servers=3, port_stride=4)
    assert [s.address for s in ranged] == ["node:2000", "node:2004", "node:2008"]
    assert [s.tm_port for s in ranged] == [8000, 8001, 8002]  # one Traffic Manager each
    assert server_list() is None  # one server: host/port
    with pytest.raises(ValueError, match=r"servers\[1\]: expected host:port"):
        server_list(["a:2000", "b"])
    with pytest.raises(ValueError, match="base_port/num_servers: give both"):
        server_list(base_port=2000)
    with pytest.raises(ValueError, match="not both"):
        server_list("a:2000", base_port=2000, num_servers=1)


def test_carla_fewer_servers_than_sub_envs_is_a_named_error():
    from vla_ray.envs.carla_env import TooFewServersError, check_server_count

    check_server_count({"base_port": 2000, "num_servers": 8}, 4, 2)  # 8 sub-envs, 8 servers
    with pytest.raises(TooFewServersError) as err:
        check_server_count({"servers": "a:2000,a:2003,a:2006"}, 2, 2)
    msg = str(err.value)
    assert "need 4 servers" in msg and "got 3" in msg and "env.servers" in msg
    assert "--num-env-runners" in msg
    with pytest.raises(TooFewServersError, match=r"need 2 servers .* got 1 \(one server"):
        check_server_count({}, 0, 2)  # the driver's runner samples 2 sub-envs


def test_carla_runner_slots_are_disjoint_and_cover_the_servers():
    from vla_ray.envs.carla_env import runner_slots

    assert runner_slots(0, 0, 3) == [0, 1, 2]  # local sampling: the driver takes them all
    slots = [runner_slots(w, 3, 7) for w in (1, 2, 3)]
    assert slots == [[0, 3, 6], [1, 4], [2, 5]]
    flat = sorted(i for s in slots for i in s)
    assert flat == list(range(7))


def test_carla_sub_envs_claim_distinct_servers_and_give_them_back(tmp_path, monkeypatch):
    from vla_ray.envs import carla_env

    monkeypatch.setattr(carla_env.tempfile, "gettempdir", lambda: str(tmp_path))
    pool = carla_env.server_list(host="h", base_port=2000, num_servers=4)
    # runner 1 of 2 owns servers 0 and 2; its two sub-envs take one each
    a, lock_a = carla_env.assign_server(pool, "by_index", worker_index=1, num_workers=2)
    b, lock_b = carla_env.assign_server(pool, "by_index", worker_index=1, num_workers=2)
    c, lock_c = carla_env.assign_server(pool, "by_index", worker_index=2, num_workers=2)
    assert (a.port, b.port, c.port) == (2000, 2006, 2003)
    assert len({a.tm_port, b.tm_port, c.tm_port}) == 3
    with pytest.raises(carla_env.TooFewServersError, match="h:2000, h:2006"):
        carla_env.assign_server(pool, "by_index", worker_index=1, num_workers=2)
    lock_a.close()  # a closed sub-env gives its server back
    again, lock = carla_env.assign_server(pool, "by_index", worker_index=1, num_workers=2)
    assert again == a
    free, lock_f = carla_env.assign_server(pool, "first_free", worker_index=0, num_workers=0)
    assert free.port == 2009  # the only one nobody holds
    with pytest.raises(ValueError, match="server_assignment: unknown name 'random'"):
        carla_env.assign_server(pool, "random", 0, 0)
    for handle in (lock, lock_b, lock_c, lock_f):
        handle.close()


def test_carla_env_connects_to_its_claimed_server(tmp_path, monkeypatch):
    """Construction picks the sub-env's server (and Traffic Manager port) before connecting."""
    pytest.importorskip("carla")
    from vla_ray.envs import carla_env

    monkeypatch.setattr(carla_env.tempfile, "gettempdir", lambda: str(tmp_path))
    tried = []

    def refuse(host, port, timeout):
        tried.append((host, port))
        raise carla_env.CarlaConnectionError(f"{host}:{port}")

    monkeypatch.setattr(carla_env, "connect", refuse)
    kwargs = dict(servers="s0:2000,s1:2000,s2:2000,s3:2000", worker_index=2, num_workers=2)
    with pytest.raises(carla_env.CarlaConnectionError):
        carla_env.CarlaDrivingEnv(**kwargs)
    with pytest.raises(carla_env.CarlaConnectionError):
        carla_env.CarlaDrivingEnv(**kwargs)  # the failed env gave s1 back: it is tried again
    assert tried == [("s1", 2000), ("s1", 2000)]
    with pytest.raises(ValueError, match="port: not used with servers"):
        carla_env.CarlaDrivingEnv(port=2000, **kwargs)


def test_env_creator_passes_the_env_runner_index_to_carla(monkeypatch):
    """RLlib's EnvContext reaches the CARLA env as worker_index/num_workers; other envs see none."""
    from ray.rllib.env.env_context import EnvContext

    from vla_ray import train

    made = []
    monkeypatch.setattr(gym, "make", lambda env_id, **kw: made.append((env_id, kw)))
    ctx = EnvContext({"servers": "a:1,b:1"}, worker_index=3, num_workers=4)
    train._EnvCreator("vla_ray/Carla-v0")(ctx)
    train._EnvCreator("vla_ray/LangReach-v0")(EnvContext({}, worker_index=3, num_workers=4))
    assert made[0] == (
        "vla_ray/Carla-v0",
        {"servers": "a:1,b:1", "worker_index": 3, "num_workers": 4},
    )
    assert made[1] == ("vla_ray/LangReach-v0", {})


def test_carla_server_helper_commands():
    from vla_ray.envs.carla_servers import main, server_commands, servers_setting

    cmds = server_commands(3, 2000, gpus=["0", "1"])
    assert [c[c.index("--gpus") + 1] for c in cmds] == ["device=0", "device=1", "device=0"]
    assert [c[-1] for c in cmds] == [f"-carla-rpc-port={p}" for p in (2000, 2003, 2006)]
    assert len({c[c.index("--name") + 1] for c in cmds}) == 3
    assert servers_setting(2, 2000) == "env.servers=localhost:2000,localhost:2003"
    assert main(["--n", "2", "--base-port", "65534", "--dry-run"]) == 2  # 65537: not a port


def test_carla_run_with_too_few_servers_stops_before_any_env_runner():
    """`vla-ray train --preset carla-ppo` with 2 x 2 sub-envs and 3 servers: the named error
    comes from building the algorithm config (no Ray, no server)."""
    from vla_ray.envs.carla_env import TooFewServersError
    from vla_ray.train import build_algorithm_config, parse_overrides, resolve

    overrides = parse_overrides(["env.servers=sim:2000,sim:2003,sim:2006"])
    spec = resolve("carla-ppo", overrides, num_env_runners=2, num_envs_per_env_runner=2)
    with pytest.raises(TooFewServersError, match=r"2 EnvRunner\(s\) x 2 sub-env\(s\) each need 4"):
        build_algorithm_config(spec)
    spec = resolve("carla-ppo", overrides, num_env_runners=3, num_envs_per_env_runner=1)
    assert build_algorithm_config(spec).env_config["servers"] == "sim:2000,sim:2003,sim:2006"
