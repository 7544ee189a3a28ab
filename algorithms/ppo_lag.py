"""PPO-Lagrangian (as in the Safety-Gym baselines, Ray et al. 2019) on RLlib's PPO.

Constrained RL: maximise the return while the expected episode cost stays under
``training.cost_limit``. The cost is the safety layer's (``env.safety=RULES.yaml``: every step's
``info["cost"]``, the number of rules that intervened; use ``mode: monitor`` rules to count
violations without changing the actions). A Lagrange multiplier ``lambda >= 0`` is updated once
per training batch from the mean cost of the episodes that ended in it::

    lambda <- max(0, lambda + lagrangian_lr * (mean_episode_cost - cost_limit))

and the policy is trained on the penalised objective ``(A_r - lambda * A_c) / (1 + lambda)``, in
one of two forms (``training.cost_critic``):

- ``False`` (the first form): the penalty is applied to each sampled step's reward,
  ``(r - lambda * c) / (1 + lambda)``, before RLlib's GAE, so the one value function and GAE give
  that advantage (GAE is linear in the reward); that value function fits a target that moves
  with lambda.
- ``True`` (the baselines' and OmniSafe's form): a separate cost value function ``V_c``
  (the module's ``cost_value`` head), the cost advantage ``A_c`` and the cost value targets by
  GAE on the step costs with ``cost_gamma`` and ``cost_lambda`` (default: PPO's ``gamma`` and
  ``lambda_``; ``cost_gamma=1`` matches the constraint, which is on the undiscounted episode
  cost: with a discount, postponing a violation looks cheaper) (``CostAdvantages``, after PPO's
  GAE), the policy surrogate on ``(A_r - lambda * A_c) / (1 + lambda)`` with ``A_r`` PPO's
  standardised reward advantage and ``A_c`` centred; the cost value loss (clipped as PPO's, times
  ``cost_vf_loss_coeff``, default ``vf_loss_coeff``) is added to PPO's loss.

The multiplier's piece is a learner connector (``CostPenalty``), first in PPO's learner
pipeline; the multiplier is part of the connector's state and of the learner's (so checkpoints
and ``--resume`` keep it: RLlib's learner state does not include its connector) and logged as
``lagrange_multiplier``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.algorithms.ppo import PPO
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.postprocessing.value_predictions import compute_value_targets
from ray.rllib.utils.torch_utils import explained_variance

from vla_ray.algorithms.ppo import VLAPPOConfig, VLAPPOLearner
from vla_ray.safety import COST_INFO_KEY, EPISODE_COST_INFO_KEY

# the constraint's settings, stated once (the config and the connector piece start from them)
LAGRANGIAN_DEFAULTS: dict[str, float] = dict(
    cost_limit=1.0, lagrangian_lr=0.05, lagrangian_init=0.0
)
# the form of the penalised advantage (module docstring) and the cost value loss's weight
# (None: vf_loss_coeff)
# cost_gamma / cost_lambda: the cost GAE's discount and lambda (None: PPO's gamma / lambda_)
COST_CRITIC_DEFAULTS: dict[str, Any] = dict(
    cost_critic=False, cost_vf_loss_coeff=None, cost_gamma=None, cost_lambda=None
)
MULTIPLIER_KEY = "lagrange_multiplier"
# batch columns of the cost critic (CostAdvantages)
COST_ADVANTAGES = "cost_advantages"
COST_VALUE_TARGETS = "cost_value_targets"


def lagrange_update(multiplier: float, mean_cost: float, cost_limit: float, lr: float) -> float:
    """One projected gradient-ascent step of the multiplier on ``mean_cost - cost_limit``."""
    return max(0.0, float(multiplier) + float(lr) * (float(mean_cost) - float(cost_limit)))


def penalised_rewards(rewards: np.ndarray, costs: np.ndarray, multiplier: float) -> np.ndarray:
    """``(r - lambda * c) / (1 + lambda)`` per step."""
    return (np.asarray(rewards) - multiplier * np.asarray(costs)) / (1.0 + multiplier)


def penalised_advantages(reward_advantages: Any, cost_advantages: Any, multiplier: float) -> Any:
    """``(A_r - lambda * A_c) / (1 + lambda)`` per step (arrays or tensors)."""
    return (reward_advantages - multiplier * cost_advantages) / (1.0 + multiplier)


def cost_value_targets(
    values: np.ndarray,
    costs: np.ndarray,
    terminateds: np.ndarray,
    truncateds: np.ndarray,
    gamma: float,
    lambda_: float,
) -> tuple[np.ndarray, np.ndarray]:
    """GAE on the step costs, as PPO's on the rewards (RLlib's ``compute_value_targets``, the
    episode chunks elongated by one bootstrap step): the cost value targets and the cost
    advantages ``targets - values``."""
    targets = compute_value_targets(
        values=np.asarray(values, np.float32),
        rewards=np.asarray(costs, np.float32),
        terminateds=np.asarray(terminateds, np.float32),
        truncateds=np.asarray(truncateds, np.float32),
        gamma=gamma,
        lambda_=lambda_,
    )
    return targets, (targets - np.asarray(values, np.float32)).astype(np.float32)


def step_costs(episode: Any, elongated: bool = False) -> np.ndarray:
    """``info["cost"]`` of each step of an episode chunk (the infos after each action).
    ``elongated``: the chunk carries PPO's artificial bootstrap step at its end (its info
    repeats the last one); that step costs 0."""
    infos = episode.get_infos()[1:]
    if elongated:
        infos = infos[:-1]
    n = len(episode) - (1 if elongated else 0)
    if len(infos) != n or any(COST_INFO_KEY not in i for i in infos):
        raise ValueError(
            f"ppo_lag: every step's info needs {COST_INFO_KEY!r}; train with "
            "--set env.safety=RULES.yaml (the safety layer's cost)"
        )
    costs = [float(i[COST_INFO_KEY]) for i in infos]
    return np.asarray(costs + ([0.0] if elongated else []), np.float32)


class CostPenalty(ConnectorV2):
    """Learner connector piece: updates the multiplier from the batch's ended episodes and
    passes it on (``shared_data[MULTIPLIER_KEY]``); with ``fold`` (the first form), rewrites
    every episode chunk's rewards to the penalised rewards."""

    def __init__(
        self,
        *args: Any,
        cost_limit: float = LAGRANGIAN_DEFAULTS["cost_limit"],
        lagrangian_lr: float = LAGRANGIAN_DEFAULTS["lagrangian_lr"],
        lagrangian_init: float = LAGRANGIAN_DEFAULTS["lagrangian_init"],
        fold: bool = True,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.cost_limit = float(cost_limit)
        self.lr = float(lagrangian_lr)
        self.multiplier = float(lagrangian_init)
        self.fold = bool(fold)
        self.last_mean_cost: float | None = None

    def __call__(self, *, rl_module, batch, episodes, shared_data=None, **kwargs):
        ended = [ep.get_infos(-1) for ep in episodes if ep.is_done and len(ep) > 0]
        costs = [float(i[EPISODE_COST_INFO_KEY]) for i in ended if EPISODE_COST_INFO_KEY in i]
        if costs:
            self.last_mean_cost = float(np.mean(costs))
            self.multiplier = lagrange_update(
                self.multiplier, self.last_mean_cost, self.cost_limit, self.lr
            )
        if shared_data is not None:
            shared_data[MULTIPLIER_KEY] = self.multiplier
        if not self.fold:
            for ep in episodes:
                if len(ep):
                    step_costs(ep)  # the cost must be there (the cost critic reads it later)
            return batch
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


class CostAdvantages(ConnectorV2):
    """Learner connector piece after PPO's GAE (the second form, ``cost_critic``): the cost
    value function's predictions on the batch, the cost value targets and cost advantages by
    GAE on the step costs (``COST_VALUE_TARGETS``, ``COST_ADVANTAGES``, centred), and PPO's
    advantages replaced by ``(A_r - lambda * A_c) / (1 + lambda)`` with the multiplier that
    ``CostPenalty`` passed on."""

    def __init__(self, *args: Any, gamma: float, lambda_: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.gamma = float(gamma)
        self.lambda_ = float(lambda_)

    def __call__(self, *, rl_module, batch, episodes, shared_data=None, **kwargs):
        if shared_data is None or MULTIPLIER_KEY not in shared_data:
            raise RuntimeError(
                "ppo_lag: CostAdvantages needs the multiplier from CostPenalty earlier in the "
                "learner pipeline"
            )
        multiplier = float(shared_data[MULTIPLIER_KEY])
        sa_episodes = list(
            self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False)
        )
        for module_id, module_batch in batch.items():
            module = rl_module[module_id].unwrapped()
            if module.is_stateful():
                raise ValueError("ppo_lag: the cost critic needs a module without memory")
            eps = [e for e in sa_episodes if e.module_id in (None, module_id)]
            costs = np.concatenate([step_costs(e, elongated=True) for e in eps])
            with torch.no_grad():
                values = module.compute_cost_values(module_batch)
            device = values.device
            values = values.detach().cpu().numpy().astype(np.float32)
            if values.shape[0] != costs.shape[0]:
                raise RuntimeError(
                    f"ppo_lag: {values.shape[0]} cost values for {costs.shape[0]} steps"
                )

            targets, adv_c = cost_value_targets(
                values,
                costs,
                _numpy(module_batch[Columns.TERMINATEDS]),
                _numpy(module_batch[Columns.TRUNCATEDS]),
                self.gamma,
                self.lambda_,
            )
            mask = (
                _numpy(module_batch[Columns.LOSS_MASK]).astype(bool)
                if Columns.LOSS_MASK in module_batch
                else None
            )
            valid = adv_c[mask] if mask is not None else adv_c
            adv_c = adv_c - (valid.mean() if valid.size else 0.0)
            adv_r = module_batch[Postprocessing.ADVANTAGES]
            adv_c_t = torch.as_tensor(adv_c, device=device)
            if not torch.is_tensor(adv_r):
                adv_r = torch.as_tensor(np.asarray(adv_r, np.float32), device=device)
            module_batch[Postprocessing.ADVANTAGES] = penalised_advantages(
                adv_r, adv_c_t.to(adv_r.dtype), multiplier
            )
            module_batch[COST_ADVANTAGES] = adv_c_t
            module_batch[COST_VALUE_TARGETS] = torch.as_tensor(targets, device=device)
        return batch


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def _piece(pipeline: Any, cls: type) -> Any:
    """The first piece of ``cls`` in a connector pipeline, or None."""
    return next((c for c in getattr(pipeline, "connectors", []) if isinstance(c, cls)), None)


class PPOLagLearner(VLAPPOLearner):
    """The PPO learner of ``ppo.py``, logging the multiplier and the batch's mean episode cost;
    with ``cost_critic``, the cost advantages after PPO's GAE and the cost value loss."""

    def build(self) -> None:
        super().build()
        # PPO's learner prepends AddOneTsToEpisodesAndTruncate, which marks every episode chunk
        # as ended: the penalty must see the sampled episodes before that
        pipeline = self._learner_connector
        piece = _piece(pipeline, CostPenalty)
        if piece is not None and pipeline.connectors[0] is not piece:
            pipeline.connectors.remove(piece)
            pipeline.prepend(piece)
        # ... and PPO's learner appends its GAE: the cost advantages come after it
        critic = pipeline is not None and getattr(self.config, "cost_critic", False)
        if critic and _piece(pipeline, CostAdvantages) is None:
            cfg = self.config
            gamma = cfg.gamma if cfg.cost_gamma is None else cfg.cost_gamma
            lambda_ = cfg.lambda_ if cfg.cost_lambda is None else cfg.cost_lambda
            pipeline.append(CostAdvantages(gamma=gamma, lambda_=lambda_))

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict[str, Any]:
        # RLlib's Learner state holds the module, optimiser and metrics, not the learner
        # connector: the multiplier is added here so that checkpoints (and --resume) keep it
        state = super().get_state(components, not_components=not_components, **kwargs)
        piece = _piece(self._learner_connector, CostPenalty)
        if piece is not None and self._check_component(MULTIPLIER_KEY, components, not_components):
            state[MULTIPLIER_KEY] = piece.multiplier
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        piece = _piece(self._learner_connector, CostPenalty)
        if piece is not None and MULTIPLIER_KEY in state:
            piece.set_state({MULTIPLIER_KEY: state[MULTIPLIER_KEY]})

    def _cost_value_loss(self, module_id: str, config: Any, batch: dict, fwd_out: dict) -> Any:
        """The cost value function's clipped squared error on ``COST_VALUE_TARGETS`` (masked
        mean over the real steps), logged with its explained variance."""
        module = self.module[module_id].unwrapped()
        predicted = module.compute_cost_values(batch, embeddings=fwd_out.get(Columns.EMBEDDINGS))
        target = batch[COST_VALUE_TARGETS]
        error = torch.pow(predicted - target, 2.0)
        clipped = torch.clamp(error, 0, config.vf_clip_param)
        if Columns.LOSS_MASK in batch:
            mask = batch[Columns.LOSS_MASK]
            loss = torch.sum(clipped[mask]) / torch.sum(mask)
        else:
            loss = torch.mean(clipped)
        self.metrics.log_dict(
            {
                "cost_vf_loss": loss,
                "cost_vf_explained_var": explained_variance(target, predicted),
            },
            key=module_id,
            window=1,
        )
        return loss

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
        total = super().compute_loss_for_module(
            module_id=module_id, config=config, batch=batch, fwd_out=fwd_out
        )
        if COST_VALUE_TARGETS in batch:
            coeff = config.cost_vf_loss_coeff
            coeff = config.vf_loss_coeff if coeff is None else coeff
            total = total + coeff * self._cost_value_loss(module_id, config, batch, fwd_out)
        return total


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
        self.set_training_defaults(**LAGRANGIAN_DEFAULTS, **COST_CRITIC_DEFAULTS)

    def training(
        self,
        *,
        cost_limit: float = NotProvided,
        lagrangian_lr: float = NotProvided,
        lagrangian_init: float = NotProvided,
        cost_critic: bool = NotProvided,
        cost_vf_loss_coeff: float | None = NotProvided,
        cost_gamma: float | None = NotProvided,
        cost_lambda: float | None = NotProvided,
        **kwargs: Any,
    ) -> PPOLagConfig:
        super().training(**kwargs)
        for name, value in dict(
            cost_limit=cost_limit,
            lagrangian_lr=lagrangian_lr,
            lagrangian_init=lagrangian_init,
            cost_critic=cost_critic,
            cost_vf_loss_coeff=cost_vf_loss_coeff,
            cost_gamma=cost_gamma,
            cost_lambda=cost_lambda,
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
        if not isinstance(self.cost_critic, bool):
            self._value_error(f"cost_critic: expected true or false, got {self.cost_critic!r}")
        coeff = self.cost_vf_loss_coeff
        if coeff is not None and (isinstance(coeff, bool) or not coeff >= 0):
            self._value_error(f"cost_vf_loss_coeff: expected a number >= 0 or null, got {coeff!r}")
        for name in ("cost_gamma", "cost_lambda"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not 0 <= v <= 1):
                self._value_error(f"{name}: expected a number in [0, 1] or null, got {v!r}")

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        # the cost critic's head (VLAModule's cost_value) when the second form is on
        extra = {"cost_value": True} if getattr(self, "cost_critic", False) else {}
        return super()._model_config_auto_includes | extra

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
                fold=not self.cost_critic,
            )
        )
        return pipeline

    def get_default_learner_class(self):
        return PPOLagLearner


class PPOLag(PPO):
    """RLlib's PPO training step; the cost penalty (and cost critic) are in the learner."""

    @classmethod
    def get_default_config(cls) -> PPOLagConfig:
        return PPOLagConfig()
