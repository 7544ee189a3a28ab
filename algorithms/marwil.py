"""MARWIL (Wang et al., 2018) with the VLA module: RLlib's own MARWIL algorithm and learner.

Monotonic advantage re-weighted imitation learning: behaviour cloning whose per-step
log-likelihood is weighted by ``exp(beta * advantage / c)``, with advantages from a value
function trained on the dataset's discounted returns (``beta=0`` is plain BC). RLlib's
MARWIL learner needs the ``ValueFunctionAPI`` (``value="shared"`` or ``"separate"``) and a
stochastic head for log-likelihoods (``gaussian`` or ``tanh_gaussian``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from ray.rllib.algorithms.marwil import MARWILConfig

from vla_ray.algorithm_spec import OfflineVLAAlgorithmConfig


class VLAMARWILConfig(OfflineVLAAlgorithmConfig, MARWILConfig):
    """RLlib's MARWILConfig with vla-ray's defaults; the caller adds env (for spaces and
    evaluation), module and data."""

    NAME: ClassVar[str] = "marwil"
    HEADS: ClassVar[tuple[str, ...]] = ("gaussian", "tanh_gaussian")
    MODEL_DEFAULTS: ClassVar[dict[str, Any]] = dict(head="gaussian", value="shared")

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class)
        self.set_training_defaults(
            lr=1e-3,
            train_batch_size_per_learner=256,
            grad_clip=1.0,
            beta=1.0,
            vf_coeff=1.0,
        )
