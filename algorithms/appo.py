"""APPO with the VLA module.

RLlib's own APPO (asynchronous sampling, V-trace off-policy correction, PPO-style clipped
surrogate against a target policy) drives ``VLAAPPOModule``: ``VLAModule`` plus the target
network APPO's loss reads (``TargetNetworkAPI``: a frozen copy of the whole VLA, trunk and head,
that RLlib's learner updates every ``target_network_update_freq`` steps). Nothing of RLlib's
loss is rewritten; the learner adds the module's auxiliary loss when it has one, as PPO's does.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ray.rllib.algorithms.appo import APPOConfig
from ray.rllib.algorithms.appo.torch.appo_torch_learner import APPOTorchLearner
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import TARGET_NETWORK_ACTION_DIST_INPUTS, TargetNetworkAPI
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override

from vla_ray.algorithm_spec import VLAAlgorithmConfig
from vla_ray.rl_module import VLAModule, with_aux_loss


class VLAAPPOModule(VLAModule, TargetNetworkAPI):
    """``VLAModule`` with APPO's target policy: a frozen copy of the VLA (learner only)."""

    @override(TargetNetworkAPI)
    def make_target_networks(self) -> None:
        self._old_vla = make_target_network(self.vla)

    @override(TargetNetworkAPI)
    def get_target_network_pairs(self) -> list[tuple[Any, Any]]:
        return [(self.vla, self._old_vla)]

    @override(TargetNetworkAPI)
    def forward_target(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        features, _ = self._features(batch, self._old_vla)  # with the target's own memory
        dist_inputs = self._per_row(self._old_vla.head.dist_inputs, features)
        return {TARGET_NETWORK_ACTION_DIST_INPUTS: dist_inputs}

    @override(VLAModule)
    def get_non_inference_attributes(self) -> list[str]:
        return [*super().get_non_inference_attributes(), "_old_vla"]


class VLAAPPOLearner(APPOTorchLearner):
    """RLlib's APPO loss plus the module's auxiliary loss when it has one (``AUX_LOSS``)."""

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        total = super().compute_loss_for_module(
            module_id=module_id, config=config, batch=batch, fwd_out=fwd_out
        )
        return with_aux_loss(self, module_id, total, fwd_out)


class VLAAPPOConfig(VLAAlgorithmConfig, APPOConfig):
    """RLlib's APPOConfig with vla-ray's defaults, learner and module (``VLAAPPOModule``).

    The learner runs in the driver like vla-ray's other algorithms (RLlib's APPO starts one
    remote learner); ``--set learners.num_learners=1`` gives RLlib's asynchronous updates."""

    NAME: ClassVar[str] = "appo"
    # Heads that give the log-probabilities APPO needs.
    # ``model.temporal``: RLlib's APPO trains stateful modules on zero-padded sequences
    TEMPORAL: ClassVar[bool] = True
    HEADS: ClassVar[tuple[str, ...]] = ("gaussian",)
    MODEL_DEFAULTS: ClassVar[dict[str, Any]] = dict(head="gaussian", value="shared")

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class)
        self.num_learners = 0
        # defaults for VLA policies from pixels; presets and ``--set training.X=...`` override
        self.set_training_defaults(
            lr=3e-4,
            gamma=0.99,
            clip_param=0.2,
            vf_loss_coeff=0.5,
            entropy_coeff=0.0,
            grad_clip=0.5,
            train_batch_size_per_learner=512,
        )

    def get_default_learner_class(self) -> type:
        return VLAAPPOLearner

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=VLAAPPOModule)
