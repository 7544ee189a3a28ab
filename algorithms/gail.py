"""GAIL (Ho & Ermon, 2016) on RLlib's PPO with the VLA module.

A discriminator ``D(s, a)`` learns to tell expert steps (a dataset written by
``vla-ray collect --policy expert``, given with ``--data``) from the policy's rollouts; PPO
maximises the discriminator reward ``r = -log(1 - D(s, a))`` instead of the env's reward
(``env_reward_coeff`` mixes the env reward back in; 0 by default).

- The discriminator lives in the RLModule (``GAILModule``, a ``VLAModule``): its own VLA trunk
  (same architecture as the policy's, so images + instructions work) and an MLP over
  ``[features, action]`` giving a logit. It is not part of the inference-only module the
  EnvRunners hold.
- Reward relabelling is a learner connector piece (``DiscriminatorReward``), placed right before
  RLlib's ``GeneralAdvantageEstimation`` in PPO's learner pipeline: advantages and value
  targets are computed on the discriminator reward.
- The learner (``GAILLearner``, the PPO learner of ``ppo.py``) adds the discriminator's
  binary cross-entropy (expert = 1, policy = 0; one expert sample per policy step of each
  minibatch) to PPO's loss. The two losses touch disjoint parameters (the reward is computed
  without gradients), so one backward pass trains both.

Expert demos are loaded into the learner process once (they are small: a few thousand steps).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import tree
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.algorithms.ppo import PPO, PPOConfig
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.connectors.learner import GeneralAdvantageEstimation
from ray.rllib.core.columns import Columns
from torch.nn import functional as F

from vla_ray.algorithm_spec import VLAAlgorithmConfig
from vla_ray.algorithms.ppo import VLAPPOLearner
from vla_ray.models.heads import mlp
from vla_ray.models.vla import build_trunk
from vla_ray.rl_module import VLAModule

MODULE_KEYS = ("disc_hidden",)


def gail_reward(logits: torch.Tensor) -> torch.Tensor:
    """``-log(1 - sigmoid(logit))`` = ``softplus(logit)``: high where D believes "expert"."""
    return F.softplus(logits)


def discriminator_loss(expert_logits: torch.Tensor, policy_logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with expert steps labelled 1 and policy steps 0."""
    return F.binary_cross_entropy_with_logits(
        expert_logits, torch.ones_like(expert_logits)
    ) + F.binary_cross_entropy_with_logits(policy_logits, torch.zeros_like(policy_logits))


# -- module -------------------------------------------------------------------------------------
class GAILModule(VLAModule):
    """The VLA policy + value function of PPO, plus a discriminator on its own trunk."""

    MODEL_KEYS = VLAModule.MODEL_KEYS + MODULE_KEYS

    def setup(self) -> None:
        mc = dict(self.model_config or {})
        extra = {k: mc.pop(k) for k in MODULE_KEYS if k in mc}
        full, self.model_config = self.model_config, mc  # VLAModule sees VLA keys only
        try:
            super().setup()
        finally:
            self.model_config = full  # checkpoints rebuild the module from the full config
        if not self.inference_only:
            cfg = self.vla.config
            self.disc_trunk = build_trunk(cfg, self.vla.tokenizer)
            in_dim = self.disc_trunk.feature_dim + self.vla.head.out_dim
            self.disc = mlp(in_dim, int(extra.get("disc_hidden", 256)), 1)

    def discriminator_logits(self, obs: dict[str, Any], actions: torch.Tensor) -> torch.Tensor:
        """Logit of "expert" for each (obs, action) row, shape (B,)."""
        x = torch.cat([self.disc_trunk(obs), actions.float().flatten(1)], dim=-1)
        return self.disc(x).squeeze(-1)

    def get_non_inference_attributes(self) -> list[str]:
        return [*super().get_non_inference_attributes(), "disc_trunk", "disc"]


# -- reward relabelling ---------------------------------------------------------------------------
class DiscriminatorReward(ConnectorV2):
    """Learner connector piece: rewards <- ``gail_reward(D(s, a)) + c * env reward``."""

    def __init__(self, *args, env_reward_coeff: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.env_reward_coeff = float(env_reward_coeff)

    def __call__(self, *, rl_module, batch, episodes, **kwargs):
        for module_id, module_batch in batch.items():
            module = rl_module[module_id]
            module = module.unwrapped() if hasattr(module, "unwrapped") else module
            if not isinstance(module, GAILModule):
                continue
            device = next(module.disc.parameters()).device
            rewards = torch.as_tensor(module_batch[Columns.REWARDS], device=device).float()
            # numpy or tensors, depending on the place in the pipeline
            obs = tree.map_structure(
                lambda x, d=device: torch.as_tensor(x, device=d), module_batch[Columns.OBS]
            )
            with torch.no_grad():
                logits = module.discriminator_logits(
                    obs, torch.as_tensor(module_batch[Columns.ACTIONS], device=device)
                )
            new = gail_reward(logits).to(rewards.device) + self.env_reward_coeff * rewards
            mask = module_batch.get(Columns.LOSS_MASK)
            if mask is not None:  # keep the extra bootstrap step RLlib appends untouched
                new = torch.where(torch.as_tensor(mask, device=device).bool(), new, rewards)
            is_numpy = isinstance(module_batch[Columns.REWARDS], np.ndarray)
            module_batch[Columns.REWARDS] = new.cpu().numpy() if is_numpy else new
        return batch


# -- learner ------------------------------------------------------------------------------------
class GAILLearner(VLAPPOLearner):
    """PPO's loss + the discriminator's cross-entropy against the expert demos."""

    def build(self) -> None:
        super().build()
        from vla_ray.data.rllib_format import read_episodes

        episodes = read_episodes(self.config.expert_data)
        obs, actions = [], []
        for ep in episodes:
            o = ep.get_observations()
            n = len(ep)
            obs.append(tree.map_structure(lambda x, n=n: np.asarray(x)[:n], o))
            actions.append(np.asarray(ep.get_actions(), np.float32).reshape(n, -1))
        self._expert_obs = tree.map_structure(lambda *xs: np.concatenate(xs), *obs)
        self._expert_actions = np.concatenate(actions)
        self._rng = np.random.default_rng(self.config.seed)

    def _expert_batch(self, n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        idx = self._rng.integers(len(self._expert_actions), size=n)
        obs = tree.map_structure(
            lambda x: torch.as_tensor(x[idx], device=self._device), self._expert_obs
        )
        return obs, torch.as_tensor(self._expert_actions[idx], device=self._device)

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        total = super().compute_loss_for_module(
            module_id=module_id, config=config, batch=batch, fwd_out=fwd_out
        )
        module = self.module[module_id].unwrapped()
        mask = batch.get(Columns.LOSS_MASK)
        obs, actions = batch[Columns.OBS], batch[Columns.ACTIONS]
        if mask is not None:
            keep = mask.bool()
            obs = tree.map_structure(lambda x: x[keep], obs)
            actions = actions[keep]
        exp_obs, exp_actions = self._expert_batch(int(actions.shape[0]))
        policy_logits = module.discriminator_logits(obs, actions)
        expert_logits = module.discriminator_logits(exp_obs, exp_actions)
        d_loss = discriminator_loss(expert_logits, policy_logits)
        with torch.no_grad():
            acc = 0.5 * ((expert_logits > 0).float().mean() + (policy_logits < 0).float().mean())
        self.metrics.log_value((module_id, "disc_loss"), d_loss.item(), window=1)
        self.metrics.log_value((module_id, "disc_accuracy"), acc.item(), window=1)
        self.metrics.log_value(
            (module_id, "gail_reward_mean"),
            gail_reward(policy_logits.detach()).mean().item(),
            window=1,
        )
        return total + config.disc_coeff * d_loss


# -- config and algorithm -----------------------------------------------------------------------
class GAILConfig(VLAAlgorithmConfig, PPOConfig):
    """PPO settings + the expert demos and the discriminator's weight; the caller adds env,
    module, runners and the demos (``--data``)."""

    NAME: ClassVar[str] = "gail"
    HEADS: ClassVar[tuple[str, ...]] = ("gaussian", "tanh_gaussian")
    MODEL_DEFAULTS: ClassVar[dict[str, Any]] = dict(head="gaussian", value="shared")
    # online (PPO) but needs expert demos: ``vla-ray train --preset langreach-gail --data DEMOS``
    NEEDS_DATA: ClassVar[bool] = True
    ACCEPTS_DATA: ClassVar[bool] = True

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or GAIL)
        self.expert_data: str | None = None
        self.set_training_defaults(
            lr=5e-4,
            train_batch_size_per_learner=2048,
            minibatch_size=256,
            num_epochs=4,
            disc_coeff=1.0,
            env_reward_coeff=0.0,
        )

    def training(
        self,
        *,
        expert_data: str = NotProvided,
        disc_coeff: float = NotProvided,
        env_reward_coeff: float = NotProvided,
        **kwargs,
    ) -> GAILConfig:
        super().training(**kwargs)
        for name, value in dict(
            expert_data=expert_data, disc_coeff=disc_coeff, env_reward_coeff=env_reward_coeff
        ).items():
            if value is not NotProvided:
                setattr(self, name, value)
        return self

    def validate(self) -> None:
        super().validate()
        if not self.expert_data:
            self._value_error("expert_data: GAIL needs expert demos (vla-ray train --data PATH)")
        if self.disc_coeff < 0:
            self._value_error(f"disc_coeff: must be >= 0, got {self.disc_coeff}")

    def build_learner_connector(self, input_observation_space, input_action_space, device=None):
        pipeline = super().build_learner_connector(
            input_observation_space=input_observation_space,
            input_action_space=input_action_space,
            device=device,
        )
        pipeline.insert_before(
            GeneralAdvantageEstimation,
            DiscriminatorReward(env_reward_coeff=self.env_reward_coeff),
        )
        return pipeline

    def get_default_learner_class(self):
        return GAILLearner

    def get_default_rl_module_spec(self):
        from ray.rllib.core.rl_module.rl_module import RLModuleSpec

        return RLModuleSpec(module_class=GAILModule)

    def use_data(self, data: str | None, val_fraction: float = 0.0) -> None:
        """``--data``: the expert demos."""
        from vla_ray.data.rllib_format import dataset_files

        dataset_files(data)  # a clear error now for a missing / empty dataset
        self.training(expert_data=str(data))


class GAIL(PPO):
    """RLlib's PPO training step; the reward is relabelled in the learner pipeline."""

    @classmethod
    def get_default_config(cls) -> GAILConfig:
        return GAILConfig()
