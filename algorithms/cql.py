"""Conservative Q-learning (Kumar et al., 2020) with the VLA policy: RLlib's own CQL.

Offline: trains from a dataset (``vla-ray train --preset hopper-cql --data PATH``, e.g. written
by ``vla-ray collect``); the EnvRunners only evaluate. ``VLACQLModule`` (``vla_ray/sac_module.py``)
is RLlib's default CQL module with the VLA as actor and VLA trunks in the twin Q networks; the
loss (SAC + the conservative penalty over random / policy actions, BC warm-up of the actor for
``bc_iters`` updates) is RLlib's.
"""

from __future__ import annotations

from typing import Any

from ray.rllib.algorithms.cql import CQLConfig

from vla_ray.sac_module import VLACQLModule

NAME = "cql"
HEADS = ("tanh_gaussian",)
# Trains from a dataset (``--data PATH``); EnvRunners only evaluate.
OFFLINE = True
# CORL's MuJoCo settings (alpha auto-tuned, min_q_weight 5 -> RLlib's default, BC warm-up).
TRAINING_DEFAULTS: dict[str, Any] = dict(
    actor_lr=1e-4,
    critic_lr=3e-4,
    alpha_lr=1e-4,
    gamma=0.99,
    tau=0.005,
    initial_alpha=1.0,
    twin_q=True,
    train_batch_size_per_learner=256,
    num_actions=10,
    min_q_weight=5.0,
    bc_iters=1000,
    deterministic_backup=True,
)
MODEL_DEFAULTS: dict[str, Any] = dict(head="tanh_gaussian", q_hidden=256)


class VLACQLConfig(CQLConfig):
    """RLlib's CQLConfig; works around RLlib 2.60's CQL handing a local learner a bare batch as
    ``data_iterators`` (``KeyError: 0``) when ``dataset_num_iters_per_learner == 1``: a local
    learner then makes 2 updates per iteration from an iterator instead."""

    def offline_data(self, **kwargs) -> VLACQLConfig:
        super().offline_data(**kwargs)
        if self.num_learners == 0 and self.dataset_num_iters_per_learner == 1:
            self.dataset_num_iters_per_learner = 2
        return self


def make_config() -> CQLConfig:
    """A fresh CQL config; the caller adds env (spaces, evaluation), module and data.

    Dataset actions are the env's raw actions: the module's squashed Gaussian covers the env's
    bounds, so RLlib's action normalisation is off.
    """
    # RLlib's CQLConfig sets ``lr`` but its SAC validation refuses it: actor/critic/alpha lrs
    return VLACQLConfig().environment(normalize_actions=False, clip_actions=False).training(lr=None)


def module_class() -> type:
    """The RLModule class ``vla-ray train`` builds for this algorithm."""
    return VLACQLModule
