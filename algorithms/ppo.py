"""PPO with the VLA module.

RLlib's own PPO (clipped surrogate, GAE, value loss, entropy bonus) drives ``VLAModule``, which
supplies the Gaussian action distribution and the value function (``ValueFunctionAPI``). Nothing
of RLlib's loss is rewritten here: this file is the algorithm's config (its defaults, module and
learner) and a learner that adds the module's auxiliary loss when the module has one.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner

from vla_ray.algorithm_spec import VLAAlgorithmConfig
from vla_ray.learner import TrainableParametersMixin
from vla_ray.rl_module import with_aux_loss


class VLAPPOLearner(TrainableParametersMixin, PPOTorchLearner):
    """RLlib's PPO loss plus the module's auxiliary loss when it has one (``AUX_LOSS`` in the
    forward output: the keypoint reconstruction of ``vision_config.recon_coeff``). Only trainable
    parameters are optimised (with ``model.lora``: the adapters, not the LM's base weights)."""

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        total = super().compute_loss_for_module(
            module_id=module_id, config=config, batch=batch, fwd_out=fwd_out
        )
        return with_aux_loss(self, module_id, total, fwd_out)


class VLAPPOConfig(VLAAlgorithmConfig, PPOConfig):
    """RLlib's PPOConfig with vla-ray's defaults and learner; the module is ``VLAModule``."""

    NAME: ClassVar[str] = "ppo"
    # Heads that give the log-probabilities PPO needs.
    HEADS: ClassVar[tuple[str, ...]] = ("gaussian",)
    MODEL_DEFAULTS: ClassVar[dict[str, Any]] = dict(head="gaussian", value="shared")
    # ``model.chunk_size`` K > 1: a chunk is one macro-action (``vla_ray.envs.chunking``)
    ACTION_CHUNKS: ClassVar[bool] = True
    # ``model.temporal``: RLlib's PPO trains stateful modules on zero-padded sequences
    TEMPORAL: ClassVar[bool] = True

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class)
        # defaults for VLA policies from pixels; presets and ``--set training.X=...`` override
        self.set_training_defaults(
            lr=3e-4,
            gamma=0.99,
            lambda_=0.95,
            clip_param=0.2,
            vf_clip_param=10.0,
            vf_loss_coeff=0.5,
            entropy_coeff=0.0,
            kl_coeff=0.0,
            grad_clip=0.5,
            train_batch_size_per_learner=2048,
            minibatch_size=256,
            num_epochs=4,
        )

    def get_default_learner_class(self) -> type:
        return VLAPPOLearner
