"""Soft Actor-Critic with the VLA policy: RLlib's own SAC (loss, replay, target updates).

``VLASACModule`` (``vla_ray/sac_module.py``) gives RLlib's SAC learner the contract it reads: the
VLA with a tanh-squashed Gaussian head as the actor, twin Q networks on their own VLA trunks and
Polyak target copies. Nothing of the loss is rewritten here: this file is the algorithm's
config (its defaults and module). Works with any env of the Dict observation contract and
a 1-D Box action space (state-only or pixels).
"""

from __future__ import annotations

from typing import Any, ClassVar

from ray.rllib.algorithms.sac import SACConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from vla_ray.algorithm_spec import VLAAlgorithmConfig
from vla_ray.sac_module import VLASACModule


class VLASACConfig(VLAAlgorithmConfig, SACConfig):
    """RLlib's SACConfig with vla-ray's defaults and ``VLASACModule``.

    Actions stay in the env's bounds end to end (the module's squashed Gaussian maps onto
    them), so RLlib's action normalisation is off.
    """

    NAME: ClassVar[str] = "sac"
    # The squashed Gaussian SAC's entropy-regularised loss needs.
    HEADS: ClassVar[tuple[str, ...]] = ("tanh_gaussian",)
    MODEL_DEFAULTS: ClassVar[dict[str, Any]] = dict(head="tanh_gaussian", q_hidden=256)
    # ``model.chunk_size`` K > 1: a chunk is one macro-action, Q(s, chunk) with the chunk's
    # reward (``vla_ray.envs.chunking``)
    ACTION_CHUNKS: ClassVar[bool] = True

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class)
        self.normalize_actions = False
        self.clip_actions = False
        # Haarnoja et al. (2018) / SB3 zoo settings for MuJoCo, uniform replay; presets override
        self.set_training_defaults(
            actor_lr=3e-4,
            critic_lr=3e-4,
            alpha_lr=3e-4,
            gamma=0.99,
            tau=0.005,
            initial_alpha=1.0,
            target_entropy="auto",
            twin_q=True,
            train_batch_size_per_learner=256,
            num_steps_sampled_before_learning_starts=1000,
            replay_buffer_config={"type": "EpisodeReplayBuffer", "capacity": 1_000_000},
        )

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=VLASACModule)
