"""Shared fixtures: one Ray instance per test session, LangReach spaces, sample observations."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import vla_ray.envs  # noqa: E402, F401  (registers env ids)

LANGREACH = "vla_ray/LangReach-v0"


@pytest.fixture(scope="session")
def ray_session():
    """Ray started once for the whole session (2 CPUs, no dashboard)."""
    import ray

    from vla_ray.train import init_ray

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
