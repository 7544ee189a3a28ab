"""Implicit Q-learning (Kostrikov et al., 2021) with the VLA policy: RLlib's own IQL.

Offline: trains from a dataset (``vla-ray train --preset hopper-iql --data PATH``); the
EnvRunners only evaluate. ``VLAIQLModule`` (``vla_ray/sac_module.py``) is RLlib's default IQL
module with the VLA as actor and VLA trunks in the twin Q networks and the value function
(``ValueFunctionAPI``); the loss (expectile value regression, TD Q loss, advantage-weighted
actor regression with temperature ``beta``) is RLlib's. Box action spaces only.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ray.rllib.algorithms.iql import IQLConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from vla_ray.algorithm_spec import OfflineVLAAlgorithmConfig
from vla_ray.sac_module import VLAIQLModule


class VLAIQLConfig(OfflineVLAAlgorithmConfig, IQLConfig):
    """RLlib's IQLConfig with vla-ray's defaults and ``VLAIQLModule``; the caller adds env
    (spaces, evaluation) and data.

    Dataset actions are the env's raw actions: the module's squashed Gaussian covers the env's
    bounds, so RLlib's action normalisation is off.
    """

    NAME: ClassVar[str] = "iql"
    HEADS: ClassVar[tuple[str, ...]] = ("tanh_gaussian",)
    MODEL_DEFAULTS: ClassVar[dict[str, Any]] = dict(head="tanh_gaussian", q_hidden=256)

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class)
        self.normalize_actions = False
        self.clip_actions = False
        # The IQL paper's MuJoCo settings (expectile 0.7, inverse temperature 3) except beta:
        # RLlib 2.60's IQL inherits MARWIL's check that beta is in [0, 1], so 1.0 is the
        # largest it accepts.
        self.set_training_defaults(
            actor_lr=3e-4,
            critic_lr=3e-4,
            value_lr=3e-4,
            gamma=0.99,
            tau=0.005,
            expectile=0.7,
            beta=1.0,
            twin_q=True,
            train_batch_size_per_learner=256,
        )

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=VLAIQLModule)
