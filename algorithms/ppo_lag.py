"""PPO-Lagrangian (as in the Safety-Gym baselines, Ray et al. 2019) on RLlib's PPO.

Constrained RL: maximise the return while the expected episode cost stays under
``training.cost_limit``. The cost is the safety layer's (``env.safety=RULES.yaml``: every step's
``info["cost"]``, the number of rules that intervened; use ``mode: monitor`` rules to count
violations without changing the actions). A Lagrange multiplier ``lambda >= 0`` is updated once
per training batch from the mean cost of the episodes that ended in it::

    lambda <- max(0, lambda + lagrangian_lr * (mean_episode_cost - cost_limit))

and the policy is trained on the penalised objective ``(A_r - lambda * A_c) / (1 + lambda)``.
Here the penalty is applied to each sampled step's reward, ``(r - lambda * c) / (1 + lambda)``, before
RLlib's GAE, so the shared value function and GAE give that advantage (GAE is linear in the
reward); the baselines' separate cost critic is not used. The piece is a learner connector
(``CostPenalty``), prepended to PPO's learner pipeline; the multiplier is part of the
connector's state (saved in checkpoints) and logged as ``lagrange_multiplier``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.algorithms.ppo import PPO
from ray.rllib.connectors.connector_v2 import ConnectorV2

from vla_ray.algorithms.ppo import VLAPPOConfig, VLAPPOLearner
from vla_ray.safety import COST_INFO_KEY, EPISODE_COST_INFO_KEY

# the constraint's settings, stated once (the config and the connector piece start from them)
LAGRANGIAN_DEFAULTS: dict[str, float] = dict(
    cost_limit=1.0, lagrangian_lr=0.05, lagrangian_init=0.0
)
MULTIPLIER_KEY = "lagrange_multiplier"


def lagrange_update(multiplier: float, mean_cost: float, cost_limit: float, lr: float) -> float:
    """One projected gradient-ascent step of the multiplier on ``mean_cost - cost_limit``."""
    return max(0.0, float(multiplier) + float(lr) * (float(mean_cost) - float(cost_limit)))


def penalised_rewards(rewards: np.ndarray, costs: np.ndarray, multiplier: float) -> np.ndarray:
    """``(r - lambda * c) / (1 + lambda)`` per step."""
    return (np.asarray(rewards) - multiplier * np.asarray(costs)) / (1.0 + multiplier)


def step_costs(episode: Any) -> np.ndarray:
    """``info["cost"]`` of each step of an episode chunk (the infos after each action)."""
    infos = episode.get_infos()[1:]
    if len(infos) != len(episode) or any(COST_INFO_KEY not in i for i in infos):
        raise ValueError(
            f"ppo_lag: every step's info needs {COST_INFO_KEY!r}; train with "
            "--set env.safety=RULES.yaml (the safety layer's cost)"
        )
    return np.asarray([float(i[COST_INFO_KEY]) for i in infos], np.float32)


class CostPenalty(ConnectorV2):
    """Learner connector piece: updates the multiplier from the batch's ended episodes, then
    rewrites every episode chunk's rewards to the penalised rewards."""

    def __init__(
        self,
        *args: Any,
        cost_limit: float = LAGRANGIAN_DEFAULTS["cost_limit"],
        lagrangian_lr: float = LAGRANGIAN_DEFAULTS["lagrangian_lr"],
        lagrangian_init: float = LAGRANGIAN_DEFAULTS["lagrangian_init"],
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.cost_limit = float(cost_limit)
        self.lr = float(lagrangian_lr)
        self.multiplier = float(lagrangian_init)
        self.last_mean_cost: float | None = None

    def __call__(self, *, rl_module, batch, episodes, **kwargs):
        ended = [ep.get_infos(-1) for ep in episodes if ep.is_done and len(ep) > 0]
        costs = [float(i[EPISODE_COST_INFO_KEY]) for i in ended if EPISODE_COST_INFO_KEY in i]
        if costs:
            self.last_mean_cost = float(np.mean(costs))
            self.multiplier = lagrange_update(
                self.multiplier, self.last_mean_cost, self.cost_limit, self.lr
            )
        for ep in episodes:
            n = len(ep)
            if n == 0:
                continue
            rewards = np.asarray(ep.get_rewards(), np.float32)
            new = penalised_rewards(rewards, step_costs(ep), self.multiplier).astype(np.float32)
            data = ep.rewards.data
            if isinstance(data, np.ndarray) and not data.flags.writeable:
                # episodes from remote EnvRunners arrive as read-only views of Ray's object store
                ep.rewards.data = data.copy()
            ep.set_rewards(new_data=new if ep.is_numpy else list(new), at_indices=slice(0, n))
        return batch

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict[str, Any]:
        return {MULTIPLIER_KEY: self.multiplier}

    def set_state(self, state: dict[str, Any]) -> None:
        if MULTIPLIER_KEY in state:
            self.multiplier = float(state[MULTIPLIER_KEY])


class PPOLagLearner(VLAPPOLearner):
    """The PPO learner of ``ppo.py``, logging the multiplier and the batch's mean episode cost."""

    def build(self) -> None:
        super().build()
        # PPO's learner prepends AddOneTsToEpisodesAndTruncate, which marks every episode chunk
        # as ended: the penalty must see the sampled episodes before that
        pipeline = self._learner_connector
        piece = next(
            (c for c in getattr(pipeline, "connectors", []) if isinstance(c, CostPenalty)), None
        )
        if piece is not None and pipeline.connectors[0] is not piece:
            pipeline.connectors.remove(piece)
            pipeline.prepend(piece)

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        piece = next(
            (
                c
                for c in getattr(self._learner_connector, "connectors", [])
                if isinstance(c, CostPenalty)
            ),
            None,
        )
        if piece is not None:
            self.metrics.log_value((module_id, MULTIPLIER_KEY), piece.multiplier, window=1)
            if piece.last_mean_cost is not None:
                self.metrics.log_value(
                    (module_id, "batch_episode_cost"), piece.last_mean_cost, window=1
                )
        return super().compute_loss_for_module(
            module_id=module_id, config=config, batch=batch, fwd_out=fwd_out
        )


class PPOLagConfig(VLAPPOConfig):
    """vla-ray's PPO settings + ``cost_limit``, ``lagrangian_lr`` and ``lagrangian_init``; the
    caller adds env (with ``env.safety``), module, runners and training settings."""

    NAME: ClassVar[str] = "ppo_lag"
    # single-step actions only (PPO's chunks are not declared for the cost penalty)
    ACTION_CHUNKS: ClassVar[bool] = False
    # no memory: the cost penalty's connectors are not checked on time-ranked sequences
    TEMPORAL: ClassVar[bool] = False

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or PPOLag)
        self.set_training_defaults(**LAGRANGIAN_DEFAULTS)

    def training(
        self,
        *,
        cost_limit: float = NotProvided,
        lagrangian_lr: float = NotProvided,
        lagrangian_init: float = NotProvided,
        **kwargs: Any,
    ) -> PPOLagConfig:
        super().training(**kwargs)
        for name, value in dict(
            cost_limit=cost_limit, lagrangian_lr=lagrangian_lr, lagrangian_init=lagrangian_init
        ).items():
            if value is not NotProvided:
                setattr(self, name, value)
        return self

    def validate(self) -> None:
        super().validate()
        if self.cost_limit < 0:
            self._value_error(f"cost_limit: expected >= 0, got {self.cost_limit}")
        if self.lagrangian_lr <= 0:
            self._value_error(f"lagrangian_lr: expected > 0, got {self.lagrangian_lr}")
        if self.lagrangian_init < 0:
            self._value_error(f"lagrangian_init: expected >= 0, got {self.lagrangian_init}")

    def build_learner_connector(self, input_observation_space, input_action_space, device=None):
        pipeline = super().build_learner_connector(
            input_observation_space=input_observation_space,
            input_action_space=input_action_space,
            device=device,
        )
        # first: the episodes' rewards are rewritten before any column is built from them
        pipeline.prepend(
            CostPenalty(
                cost_limit=self.cost_limit,
                lagrangian_lr=self.lagrangian_lr,
                lagrangian_init=self.lagrangian_init,
            )
        )
        return pipeline

    def get_default_learner_class(self):
        return PPOLagLearner


class PPOLag(PPO):
    """RLlib's PPO training step; the cost penalty is applied in the learner pipeline."""

    @classmethod
    def get_default_config(cls) -> PPOLagConfig:
        return PPOLagConfig()
