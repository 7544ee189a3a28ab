"""RLlib algorithms configured for the VLA module (imported as ``vla_ray.algorithms``).

One file per algorithm; each defines one RLlib ``AlgorithmConfig`` subclass that declares the
algorithm (:class:`vla_ray.algorithm_spec.VLAAlgorithmConfig`: defaults, module, learner,
capabilities, data and evaluation hooks). :func:`get_algorithm` returns that class by name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vla_ray.algorithm_spec import VLAAlgorithmConfig

# name -> the config class in ``vla_ray/algorithms/<name>.py``
_CONFIG_CLASSES = {
    "ppo": "VLAPPOConfig",
    "appo": "VLAAPPOConfig",
    "bc": "VLABCConfig",
    "dagger": "DAggerConfig",
    "grpo": "GRPOConfig",
    "sac": "VLASACConfig",
    "cql": "VLACQLConfig",
    "iql": "VLAIQLConfig",
    "marwil": "VLAMARWILConfig",
    "td3bc": "TD3BCConfig",
    "dt": "DTConfig",
    "gail": "GAILConfig",
    "ppo_lag": "PPOLagConfig",
    "dreamer": "VLADreamerConfig",
}
ALGORITHMS = tuple(_CONFIG_CLASSES)


def get_algorithm(name: str) -> type[VLAAlgorithmConfig]:
    """The config class of algorithm ``name``; ValueError listing the valid names otherwise."""
    if name not in ALGORITHMS:
        raise ValueError(
            f"algorithm: unknown name {name!r}; valid names are {', '.join(ALGORITHMS)}"
        )
    module = importlib.import_module(f"vla_ray.algorithms.{name}")
    return getattr(module, _CONFIG_CLASSES[name])
