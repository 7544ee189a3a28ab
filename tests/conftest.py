"""Shared fixtures: one Ray instance per test process (each pytest-xdist worker), LangReach spaces,
sample observations."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
# One torch thread in the test process and the subprocesses it starts (Ray's workers get one
# from vla_ray.train.init_ray): on 2 cores a second thread waits on the first whenever anything
# else runs. Measured 2026-12-07 (the PPO learning test of test_rl_module at load ~10: over
# 900 s with torch's default of 2 threads, 158 s with 1; quiet: the SmolVLM PPO test 203 s -> 150 s,
# the SAC one 78 s -> 76 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Serve gives its HTTP proxy 5-10 s to report ready; on a loaded 2-core machine that is not
# always enough. Read by the Serve controller, which inherits this environment.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import vla_ray.envs  # noqa: E402, F401  (registers env ids)

if os.environ["OMP_NUM_THREADS"] == "1":  # also when torch was imported before this file
    import torch  # noqa: E402

    torch.set_num_threads(1)

LANGREACH = "vla_ray/LangReach-v0"


@pytest.fixture(scope="session")
def ray_session():
    """Ray started once per test process (2 CPUs, no dashboard)."""
    import ray

    from vla_ray.train import init_ray

    # Ray gives a starting node 30 s (hard-coded) to register; on a 2-core machine loaded by other
    # jobs it can take longer: one more try, not a session of errors
    try:
        init_ray(num_cpus=2)
    except Exception as e:  # ray raises a bare Exception
        if "timed out during startup" not in str(e):
            raise
        ray.shutdown()
        init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def langreach_spaces():
    env = gym.make(LANGREACH)
    spaces = (env.observation_space, env.action_space)
    env.close()
    return spaces


@pytest.fixture(scope="session")
def langreach_obs_batch():
    """8 real LangReach observations (different seeds), stacked as numpy arrays."""
    env = gym.make(LANGREACH)
    obs = [env.reset(seed=s)[0] for s in range(8)]
    env.close()
    return {k: np.stack([o[k] for o in obs]) for k in obs[0]}


@pytest.fixture(scope="session")
def tiny_vla(langreach_spaces):
    """An untrained LangReach VLA of the langreach-ppo model config, built from the env's spaces
    like RLlib builds it. The Gaussian head's output layer is re-drawn at unit scale so the
    actions are O(1) (some beyond the [-1, 1] bounds): parity and clamping are then visible."""
    import torch

    from vla_ray.presets import get_preset
    from vla_ray.rl_module import VLAModule

    torch.manual_seed(0)
    obs_space, act_space = langreach_spaces
    module = VLAModule(
        observation_space=obs_space,
        action_space=act_space,
        model_config=get_preset("langreach-ppo").model,
        inference_only=True,
    )
    vla = module.vla.eval()
    last = vla.head.net[-1]
    with torch.no_grad():
        last.weight.normal_(0.0, 8.0 / last.in_features**0.5)
        # a fixed offset past the bound on the first dimension: some actions need the clamp
        # whatever the random trunk gives (the second dimension stays mostly inside)
        last.bias.copy_(torch.tensor([1.2, -0.2]))
    return vla


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The directory ``name`` that ``build(path)`` writes, built once per test run: the
    pytest-xdist workers share it (the first to ask builds it under a file lock, the others wait
    and reuse it). Only for outputs that do not depend on the worker (seeded builds)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's base directory, above the workers' own
    out = root / name
    with FileLock(f"{out}.lock"):
        if not out.exists():
            tmp = root / f".{name}.tmp-{os.getpid()}"
            build(tmp)
            os.replace(tmp, out)
    return out


@pytest.fixture(scope="session")
def tiny_vla_dir(tiny_vla, tmp_path_factory):
    """``tiny_vla`` as a save_pretrained directory (one per test run)."""
    return built_once(tmp_path_factory, "tiny_vla", tiny_vla.save_pretrained)


@pytest.fixture(scope="session")
def tiny_export(tiny_vla_dir, tmp_path_factory):
    """``tiny_vla`` exported to every format (openvino when the package is installed), once per
    test run."""
    import importlib.util

    from vla_ray.export import EXPORT_FORMATS, export

    formats = [f for f in EXPORT_FORMATS if f != "openvino" or importlib.util.find_spec("openvino")]
    return built_once(
        tmp_path_factory,
        "tiny_export",
        lambda out: export(tiny_vla_dir, formats, out, progress=None),
    )


# one-target LangReach: no colour to ground, small images, short episodes (the PPO learning tests)
EASY_LANGREACH = {"num_targets": 1, "image_size": 32, "max_episode_steps": 20}


def ppo_one_target_returns(preset: str, run_dir, iters: int) -> tuple[float, float]:
    """Mean eval return (32 episodes) of ``preset``'s PPO on one-target LangReach after one
    iteration (close to the initial policy) and after ``iters``, of one run (its kept
    iteration-1 checkpoint and its last); 2 EnvRunners x 4 envs."""
    from vla_ray.checkpoint import CHECKPOINTS_DIR, LAST, kept_name
    from vla_ray.evaluate import evaluate, load_policy
    from vla_ray.train import resolve, train

    spec = resolve(
        preset,
        {
            "env_config": EASY_LANGREACH,
            "training": {"train_batch_size_per_learner": 1024, "minibatch_size": 256},
            "env_runners": {"num_envs_per_env_runner": 4},
            "checkpoint_every": 1,
            "keep_checkpoints": True,
        },
        num_env_runners=2,
    )

    def score(name: str) -> float:
        policy = load_policy(run_dir / CHECKPOINTS_DIR / name)
        return evaluate(policy, env_config=EASY_LANGREACH, episodes=32, progress=False)[
            "mean_return"
        ]

    train(spec, run_dir, stop_iters=iters, progress=False)
    return score(kept_name(1)), score(LAST)


def live_stream_threads() -> set:
    """The live worker threads of Ray Data batch streams (``DataIterator.iter_batches``): each
    calls into Ray, and one still running at ``ray.shutdown()`` ends the process with status 1."""
    import threading

    return {t for t in threading.enumerate() if t.name == "iter_threaded"}


def assert_no_new_stream_threads(before: set, wait_s: float = 2.0) -> None:
    """No stream thread started after ``before`` (a ``live_stream_threads()``) is still running
    ``wait_s`` seconds from now (a closed stream's threads end within ~0.1 s)."""
    import time

    deadline = time.monotonic() + wait_s
    while (left := live_stream_threads() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"Ray Data stream threads left running: {sorted(t.name for t in left)}"
