"""RLlib algorithms configured for the VLA module (imported as ``vla_ray.algorithms``).

One file per algorithm; each exposes ``NAME``, ``HEADS``, ``TRAINING_DEFAULTS``,
``MODEL_DEFAULTS`` and ``make_config()``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

ALGORITHMS = (
    "ppo",
    "appo",
    "bc",
    "dagger",
    "grpo",
    "sac",
    "cql",
    "iql",
    "marwil",
    "td3bc",
    "dt",
    "gail",
    "ppo_lag",
)


def get_algorithm(name: str) -> ModuleType:
    """The algorithm module for ``name``; ValueError listing the valid names otherwise."""
    if name not in ALGORITHMS:
        raise ValueError(
            f"algorithm: unknown name {name!r}; valid names are {', '.join(ALGORITHMS)}"
        )
    return importlib.import_module(f"vla_ray.algorithms.{name}")
