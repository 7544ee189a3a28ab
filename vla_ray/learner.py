"""What the torch learners of vla-ray's RL algorithms share."""

from __future__ import annotations

from collections.abc import Sequence

from ray.rllib.core.rl_module.rl_module import RLModule
from torch import nn


class TrainableParametersMixin:
    """Put only the module's trainable parameters (``requires_grad``) in the optimizer.

    RLlib's ``TorchLearner`` hands every parameter to the optimizer; with LoRA or a frozen part
    that is the whole frozen backbone. Frozen parameters get no gradient either way; here they are
    not in the optimizer at all (no optimizer state, no weight decay, nothing clipped), so they
    stay bit-identical through updates. Place before the RLlib learner in the bases.
    """

    def get_parameters(self, module: RLModule) -> Sequence[nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad]
