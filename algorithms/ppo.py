"""PPO with the VLA module.

RLlib's own PPO (clipped surrogate, GAE, value loss, entropy bonus) drives ``VLAModule``, which
supplies the Gaussian action distribution and the value function (``ValueFunctionAPI``). Nothing
of the loss is rewritten here: this file is the algorithm's defaults and the config it starts from.
"""

from __future__ import annotations

from typing import Any

from ray.rllib.algorithms.ppo import PPOConfig

NAME = "ppo"
# Heads that give the log-probabilities PPO needs.
HEADS = ("gaussian",)
# Defaults for VLA policies from pixels; presets and ``--set training.X=...`` override them.
TRAINING_DEFAULTS: dict[str, Any] = dict(
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
MODEL_DEFAULTS: dict[str, Any] = dict(head="gaussian", value="shared")


def make_config() -> PPOConfig:
    """A fresh PPO config; the caller adds env, module, runners and training settings."""
    return PPOConfig()
