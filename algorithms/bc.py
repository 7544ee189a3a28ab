"""Behaviour cloning with the VLA module, on RLlib's BC (offline data through ``ray.data``).

RLlib's BC reads episodes with its offline pipeline and calls the learner on batches of
(observation, action). Its stock loss is the action distribution's log-likelihood, which exists
only for stochastic heads; here the loss is the head's own behaviour-cloning loss instead, so
every head trains: MSE (``mlp``), Gaussian NLL (``gaussian``, ``tanh_gaussian``), noise
prediction (``diffusion``) and cross-entropy over action tokens (``transformer``).
"""

from __future__ import annotations

from typing import Any

from ray.rllib.algorithms.bc import BCConfig
from ray.rllib.algorithms.marwil.torch.marwil_torch_learner import MARWILTorchLearner
from ray.rllib.core.columns import Columns

from vla_ray.config import ACTION_HEADS

NAME = "bc"
# Every head has a behaviour-cloning loss.
HEADS = ACTION_HEADS
# Trains from a dataset (``vla-ray train --data PATH``); EnvRunners only evaluate.
OFFLINE = True
TRAINING_DEFAULTS: dict[str, Any] = dict(
    lr=1e-3,
    train_batch_size_per_learner=256,
    grad_clip=1.0,
)
MODEL_DEFAULTS: dict[str, Any] = dict(head="gaussian", value="none")


# -- loss ---------------------------------------------------------------------------------------
class VLABCLearner(MARWILTorchLearner):
    """BC learner whose loss is ``head.loss(features, actions)`` of the VLA."""

    def compute_loss_for_module(self, *, module_id, config=None, batch, fwd_out):
        module = self.module[module_id].unwrapped()
        head = module.vla.head
        actions = batch[Columns.ACTIONS].float()
        target = actions.view(actions.shape[0], head.chunk_size, head.action_dim)
        loss = head.loss(fwd_out[Columns.EMBEDDINGS], target)
        self.metrics.log_value((module_id, "bc_loss"), loss.item(), window=1)
        return loss


# -- config -------------------------------------------------------------------------------------
class VLABCConfig(BCConfig):
    """RLlib's BCConfig with the VLA learner."""

    def get_default_learner_class(self):
        return VLABCLearner


def make_config() -> VLABCConfig:
    """A fresh BC config; the caller adds env (for spaces and evaluation), module and data."""
    return VLABCConfig()
