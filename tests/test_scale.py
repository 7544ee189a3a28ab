"""Scale and robustness: presets of issue 3, CLI scale flags, PPO with 2 EnvRunners on PushT and
highway-env (async vectorisation), and training that survives a killed EnvRunner."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest

from vla_ray.algorithms import ALGORITHMS
from vla_ray.cli import main
from vla_ray.presets import PRESETS
from vla_ray.scale import (
    FAULT_TOLERANCE_DEFAULTS,
    apply_scale_flags,
    fault_tolerance_settings,
    resolve_gpus,
)
from vla_ray.train import build_algorithm_config, parse_overrides, resolve

ISSUE_PRESETS = (
    "hopper-ppo",
    "halfcheetah-ppo",
    "humanoid-ppo",
    "pusht-ppo",
    "highway-ppo",
    "highway-sac",
    "carla-ppo",
)


def test_issue_presets_are_listed_and_fault_tolerant(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ISSUE_PRESETS:
        assert name in out
        ft = PRESETS[name].fault_tolerance
        assert ft["restart_failed_env_runners"] and ft["restart_failed_sub_environments"]
    assert "vla_ray/PushT-v0" in out and "vla_ray/Highway-v0" in out and "vla_ray/Carla-v0" in out


def test_state_only_ppo_presets_use_mujoco_settings():
    for name, batch in (("hopper-ppo", 2048), ("halfcheetah-ppo", 2048), ("humanoid-ppo", 4096)):
        spec = resolve(name)
        t = spec.settings["training"]
        assert (t["gamma"], t["lambda_"], t["lr"], t["num_epochs"]) == (0.99, 0.95, 3e-4, 10)
        assert t["train_batch_size_per_learner"] == batch and 64 <= t["minibatch_size"] <= 256
        assert spec.settings["model"]["vision"] == "none"


def test_scale_flags_reach_the_rllib_config():
    spec = resolve(
        "hopper-ppo",
        parse_overrides(["fault_tolerance.max_num_env_runner_restarts=7"]),
        num_env_runners=3,
        num_envs_per_env_runner=5,
        vectorize="async",
        num_gpus_per_learner="auto",
        num_gpus_per_env_runner=0.25,
    )
    cfg = build_algorithm_config(spec)
    assert (cfg.num_env_runners, cfg.num_envs_per_env_runner) == (3, 5)
    assert cfg.gym_env_vectorize_mode == "async"
    assert cfg.num_gpus_per_env_runner == 0.25
    assert cfg.num_gpus_per_learner == 0  # auto, and this machine has no GPU
    assert cfg.restart_failed_env_runners and cfg.restart_failed_sub_environments
    assert cfg.max_num_env_runner_restarts == 7
    # preset value wins over the default; defaults fill the rest
    assert FAULT_TOLERANCE_DEFAULTS["max_num_env_runner_restarts"] == 1000


def test_gpu_auto_and_bad_scale_values(monkeypatch):
    import vla_ray.scale as scale

    monkeypatch.setattr(scale, "available_gpus", lambda: 2.0)
    learners, _ = resolve_gpus({"num_gpus_per_learner": "auto"}, {})
    assert learners["num_gpus_per_learner"] == 1
    assert resolve_gpus({}, {})[0]["num_gpus_per_learner"] == 1  # auto is the default
    monkeypatch.setattr(scale, "available_gpus", lambda: 0.0)
    assert resolve_gpus({}, {})[0]["num_gpus_per_learner"] == 0
    with pytest.raises(ValueError, match="gym_env_vectorize_mode: expected one of sync, async"):
        apply_scale_flags({}, vectorize="threads")
    with pytest.raises(ValueError, match="num_gpus_per_learner: expected a number >= 0 or 'auto'"):
        apply_scale_flags({}, num_gpus_per_learner="many")
    # an override is refused by resolve (did-you-mean); a preset's own section when it is used
    with pytest.raises(ValueError, match="fault_tolerance takes no key 'restart_all'"):
        resolve("hopper-ppo", {"fault_tolerance": {"restart_all": True}})
    with pytest.raises(ValueError, match="fault_tolerance: unknown key"):
        fault_tolerance_settings({"fault_tolerance": {"restart_all": True}})


def test_cli_scale_flags(capsys):
    with pytest.raises(SystemExit):  # argparse: not one of sync/async
        main(["train", "--preset", "hopper-ppo", "--vectorize", "threads", "--stop-iters", "1"])
    assert "--vectorize" in capsys.readouterr().err
    code = main(["train", "--preset", "hopper-ppo", "--num-gpus-per-learner", "many"])
    assert code == 2 and "num_gpus_per_learner" in capsys.readouterr().err


def test_highway_sac_preset():
    assert "sac" in ALGORITHMS
    spec = resolve("highway-sac")
    assert spec.algorithm == "sac" and spec.env == "vla_ray/HighwayState-v0"
    build_algorithm_config(spec)


def _tiny(env_config: dict, envs_per_runner: int = 1, **runners) -> dict:
    return {
        "env_config": env_config,
        "env_runners": {
            "num_env_runners": 2,
            "num_envs_per_env_runner": envs_per_runner,
            **runners,
        },
        "training": {
            "train_batch_size_per_learner": 64,
            "minibatch_size": 32,
            "num_epochs": 1,
        },
    }


def _check_iterations(results: list[dict]) -> None:
    assert [r["training_iteration"] for r in results] == [1, 2]
    assert results[-1]["num_env_steps_sampled_lifetime"] >= 128
    assert results[-1]["env_runners"]["num_env_steps_sampled"] > 0
    stats = results[-1]["learners"]["default_policy"]
    assert math.isfinite(stats["total_loss"]) and math.isfinite(stats["vf_loss"])


@pytest.mark.slow
def test_pusht_ppo_two_iterations_two_env_runners_async_envs(ray_session):
    pytest.importorskip("gym_pusht")
    # gymnasium's AsyncVectorEnv (a subprocess per env) inside each of the 2 EnvRunners
    overrides = _tiny({"image_size": 32}, envs_per_runner=2, gym_env_vectorize_mode="async")
    algo = build_algorithm_config(resolve("pusht-ppo", overrides)).build_algo()
    try:
        _check_iterations([algo.train() for _ in range(2)])
    finally:
        algo.stop()


@pytest.mark.slow
def test_highway_ppo_trains_on_after_an_env_runner_is_killed(ray_session):
    """highway-ppo, 2 EnvRunners: 2 iterations, then one EnvRunner process is killed (SIGKILL)
    mid-training; training goes on and RLlib brings the runner back as a new process."""
    pytest.importorskip("highway_env")
    overrides = _tiny({"image_size": [32, 32], "duration": 4, "vehicles_count": 8})
    algo = build_algorithm_config(resolve("highway-ppo", overrides)).build_algo()
    group = algo.env_runner_group
    try:
        first = [algo.train() for _ in range(2)]
        _check_iterations(first)
        pids = group.foreach_env_runner(lambda r: os.getpid(), local_env_runner=False)
        assert len(pids) == 2 and len(set(pids)) == 2
        os.kill(pids[0], signal.SIGKILL)
        steps = first[-1]["num_env_steps_sampled_lifetime"]
        results = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            results.append(algo.train())
            if group.num_healthy_remote_workers() == 2:
                break
        # more iterations completed and sampled, and the killed runner is back (a new process)
        assert results[-1]["training_iteration"] == 2 + len(results)
        assert results[-1]["num_env_steps_sampled_lifetime"] > steps
        assert group.num_healthy_remote_workers() == 2
        new_pids = group.foreach_env_runner(lambda r: os.getpid(), local_env_runner=False)
        assert pids[0] not in new_pids and pids[1] in new_pids
        assert algo.train()["training_iteration"] == 3 + len(results)  # both runners sample
    finally:
        algo.stop()
