"""VLA-Dreamer: DreamerV3-style model-based RL with the VLA trunk as the world model's encoder.

Each iteration samples env steps with the EnvRunners (the stateful ``WorldModelModule`` acts
from its RSSM posterior), adds them to a sequence replay on the driver, and runs
``updates_per_iteration`` learner updates on (B, T) windows: the world-model loss, then the
actor-critic loss on rollouts imagined from every posterior state (``vla_ray.world_model``).
With ``--data`` the replay starts with the dataset's episodes and ``pretrain_updates`` updates
run before any env interaction (offline world-model pretraining).

Why not RLlib's ``DreamerV3`` itself: its catalog builds encoders for 1-D or image Box
observations only (our observations are a Dict with the instruction), its learner reads fixed
``forward_train`` keys of its own model, and its replay buffer samples array observations. We
reuse its GRU cell, MLP, symlog/two-hot and the training-ratio idea (``updates_per_iteration``
here), and keep its loss arithmetic (see ``vla_ray/world_model/``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    LEARNER_RESULTS,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
)

from vla_ray.algorithm_spec import VLAAlgorithmConfig
from vla_ray.world_model.imagination import actor_critic_losses, imagine
from vla_ray.world_model.replay import SequenceReplay
from vla_ray.world_model.rl_module import WorldModelModule

OBS_PREFIX = "obs."


def flatten_batch(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """A replay batch as flat columns (``obs.<key>``), what an RLlib SampleBatch carries."""
    out = {OBS_PREFIX + k: v for k, v in batch["obs"].items()}
    out.update({k: v for k, v in batch.items() if k != "obs"})
    return out


def unflatten_batch(columns: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_batch`."""
    out: dict[str, Any] = {"obs": {}}
    for key, value in columns.items():
        if key.startswith(OBS_PREFIX):
            out["obs"][key[len(OBS_PREFIX) :]] = value
        elif isinstance(key, str):
            out[key] = value
    return out


class DreamerLearner(TorchLearner):
    """World-model loss + imagination actor-critic loss; one optimiser per part (the gradients
    of each loss reach only its part, so one backward pass of the sum is exact)."""

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        module = self.module[module_id].unwrapped()
        cfg = self.config
        groups = {
            "world_model": (list(module.world_model.parameters()), cfg.lr),
            "actor": (list(module.actor.parameters()), cfg.actor_lr),
            "critic": (module.critic.trainable(), cfg.critic_lr),
        }
        for name, (params, lr) in groups.items():
            params = [p for p in params if p.requires_grad]
            self.register_optimizer(
                module_id=module_id,
                optimizer_name=name,
                optimizer=torch.optim.Adam(params, lr=lr, eps=1e-8),
                params=params,
                lr_or_lr_schedule=lr,
            )

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        module = self.module[module_id].unwrapped()
        data = unflatten_batch(dict(batch))
        wm_loss, metrics, post = module.world_model.loss(data)
        total = wm_loss
        if config.imagine and config.actor_lr > 0:
            start = post.flatten().detach()
            rollout = imagine(
                module.world_model,
                module.actor,
                start,
                module.wm_config.horizon,
                module.wm_config.actor_grad,
            )
            actor_loss, critic_loss, ac_metrics = actor_critic_losses(
                rollout, module.actor, module.critic, module.return_norm, module.wm_config
            )
            metrics.update(ac_metrics)
            total = total + actor_loss + critic_loss
        for key, value in metrics.items():
            self.metrics.log_value((module_id, key), value, window=1)
        return total

    def after_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        for mid in self.module.keys():  # noqa: SIM118 (a MultiRLModule, not a dict)
            module = self.module[mid].unwrapped()
            module.critic.update_slow(module.wm_config.critic_ema_decay)


class VLADreamerConfig(VLAAlgorithmConfig, AlgorithmConfig):
    """VLA-Dreamer's settings; defaults set once, here."""

    NAME: ClassVar[str] = "dreamer"
    HEADS: ClassVar[tuple[str, ...]] = ("gaussian",)  # unused: the latent actor is the policy
    MODEL_DEFAULTS: ClassVar[dict[str, Any]] = dict(head="gaussian", world_model={})
    ACCEPTS_DATA: ClassVar[bool] = True
    EXPORTS_VLA: ClassVar[bool] = False

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class or VLADreamer)
        self.actor_lr = 3e-5
        self.critic_lr = 3e-5
        self.batch_size_B = 16
        self.batch_length_T = 16
        self.updates_per_iteration = 1
        self.replay_capacity = 100_000
        self.pretrain_updates = 0
        self.imagine = True
        self.dataset_path: str | None = None
        self.set_training_defaults(
            lr=3e-4,
            actor_lr=3e-5,
            critic_lr=3e-5,
            grad_clip=100.0,
            batch_size_B=16,
            batch_length_T=16,
            updates_per_iteration=1,
            replay_capacity=100_000,
            pretrain_updates=0,
            imagine=True,
            train_batch_size_per_learner=256,
        )

    def training(
        self,
        *,
        actor_lr: float | None = NotProvided,
        critic_lr: float | None = NotProvided,
        batch_size_B: int | None = NotProvided,
        batch_length_T: int | None = NotProvided,
        updates_per_iteration: int | None = NotProvided,
        replay_capacity: int | None = NotProvided,
        pretrain_updates: int | None = NotProvided,
        imagine: bool | None = NotProvided,
        **kwargs: Any,
    ) -> VLADreamerConfig:
        """RLlib's training settings plus VLA-Dreamer's: learning rates of actor and critic
        (``lr`` is the world model's), replay window (``batch_size_B`` x ``batch_length_T``),
        learner updates per iteration, replay capacity in steps, updates on ``--data`` before
        any env step, and whether to train the actor-critic in imagination."""
        super().training(**kwargs)
        for name, value in dict(
            actor_lr=actor_lr,
            critic_lr=critic_lr,
            batch_size_B=batch_size_B,
            batch_length_T=batch_length_T,
            updates_per_iteration=updates_per_iteration,
            replay_capacity=replay_capacity,
            pretrain_updates=pretrain_updates,
            imagine=imagine,
        ).items():
            if value is not NotProvided:
                setattr(self, name, value)
        return self

    def use_data(self, data: str | None, val_fraction: float = 0.0) -> None:
        """``--data``: its episodes seed the replay (read on the driver when the algorithm is
        built) and ``pretrain_updates`` world-model updates run on them first."""
        self.dataset_path = data

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=WorldModelModule)

    def get_default_learner_class(self) -> type:
        return DreamerLearner


class VLADreamer(Algorithm):
    """Sample -> replay -> world model + imagination updates -> sync weights."""

    @classmethod
    def get_default_config(cls) -> VLADreamerConfig:
        return VLADreamerConfig()

    def setup(self, config: AlgorithmConfig) -> None:
        super().setup(config)
        self.replay = SequenceReplay(self.config.replay_capacity)
        self._rng = np.random.default_rng(self.config.seed)
        if self.config.dataset_path:
            self.load_dataset(self.config.dataset_path)
            for _ in range(int(self.config.pretrain_updates)):
                self._update()
            if self.config.pretrain_updates:
                self._sync()

    def load_dataset(self, path: str) -> int:
        """Add every episode of the dataset at ``path`` (any format ``--data`` reads) to the
        replay; returns the number of episodes."""
        from vla_ray.data.convert import read_dataset

        episodes = read_dataset(path, self.config.env, self.config.env_config)
        for ep in episodes:
            self.replay.add_episode(ep)
        return len(episodes)

    def _update(self) -> dict[str, Any]:
        sample = self.replay.sample(self.config.batch_size_B, self.config.batch_length_T, self._rng)
        batch = MultiAgentBatch(
            {DEFAULT_MODULE_ID: SampleBatch(flatten_batch(sample))},
            env_steps=self.config.batch_size_B * self.config.batch_length_T,
        )
        return self.learner_group.update(
            batch=batch,
            timesteps={
                NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
                    (ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0
                )
            },
        )

    def _sync(self) -> None:
        self.env_runner_group.sync_weights(
            from_worker_or_learner_group=self.learner_group, inference_only=True
        )

    def training_step(self) -> None:
        episodes, runner_metrics = synchronous_parallel_sample(
            worker_set=self.env_runner_group,
            max_env_steps=self.config.train_batch_size_per_learner,
            sample_timeout_s=self.config.sample_timeout_s,
            _uses_new_env_runners=True,
            _return_metrics=True,
        )
        self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)
        for ep in episodes:
            self.replay.add_episode(ep)
        for _ in range(int(self.config.updates_per_iteration)):
            results = self._update()
            self.metrics.aggregate(results, key=LEARNER_RESULTS)
        self._sync()
