"""MARWIL (Wang et al., 2018) with the VLA module: RLlib's own MARWIL algorithm and learner.

Monotonic advantage re-weighted imitation learning: behaviour cloning whose per-step
log-likelihood is weighted by ``exp(beta * advantage / c)``, with advantages from a value
function trained on the dataset's discounted returns (``beta=0`` is plain BC). RLlib's
MARWIL learner needs the ``ValueFunctionAPI`` (``value="shared"`` or ``"separate"``) and a
stochastic head for log-likelihoods (``gaussian`` or ``tanh_gaussian``).
"""

from __future__ import annotations

from typing import Any

from ray.rllib.algorithms.marwil import MARWILConfig

NAME = "marwil"
HEADS = ("gaussian", "tanh_gaussian")
# Trains from a dataset (``vla-ray train --data PATH``); EnvRunners only evaluate.
OFFLINE = True
TRAINING_DEFAULTS: dict[str, Any] = dict(
    lr=1e-3,
    train_batch_size_per_learner=256,
    grad_clip=1.0,
    beta=1.0,
    vf_coeff=1.0,
)
MODEL_DEFAULTS: dict[str, Any] = dict(head="gaussian", value="shared")


def make_config() -> MARWILConfig:
    """A fresh MARWIL config; the caller adds env (for spaces and evaluation), module and data."""
    return MARWILConfig()
