"""TD3+BC (Fujimoto & Gu, 2021) as a new RLlib algorithm with the VLA module.

Offline TD3 with a behaviour-cloning term in the actor loss::

    critic: min over twin Q_i of (Q_i(s, a) - y)^2,
            y = r + gamma * (1 - terminated) * min_i Q'_i(s', clip(pi'(s') + clip(eps)))
    actor:  -lambda * Q_1(s, pi(s)) + (pi(s) - a)^2,   lambda = alpha / mean |Q_1(s, pi(s))|

every ``policy_delay`` critic updates (targets are Polyak-averaged with ``tau`` on those steps,
as in TD3), with target policy smoothing noise ``policy_noise`` (clipped to ``noise_clip``, both
in units of half the action range). ``alpha=2.5`` as in the paper.

The actor is the VLA (trunk + deterministic ``mlp`` head, squashed with tanh into the action
bounds). The twin critics share their own VLA trunk (same architecture as the actor's, so pixel
observations work too; gradients of the actor loss never reach it) with one MLP per critic over
``[trunk features, action]``. Target copies of actor and critics implement RLlib's
``TargetNetworkAPI``. With ``normalize_states`` (default, as in the paper) the ``state``
observation is standardised with the dataset's mean/std, computed by one ``ray.data`` pass when
the algorithm is built and kept in the VLA's config (every trunk applies it; evaluation and
checkpoints use it too).

The actor's tanh squashing is the MLP head's ``squash`` option, so the VLA alone is the policy:
checkpoints carry the ``vla/`` export like the other algorithms' (eval, export, serve). Data
and training loop: RLlib's offline pipeline (BC's
``training_step``); the learner connector adds next observations.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

import torch
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.algorithms.bc import BC, BCConfig
from ray.rllib.core import ALL_MODULES
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.learner.utils import make_target_network, update_target_network
from ray.rllib.core.rl_module.apis import TargetNetworkAPI
from torch.nn import functional as F

from vla_ray.algorithm_spec import OfflineVLAAlgorithmConfig
from vla_ray.config import ConfigError
from vla_ray.data.stats import add_state_normalisation
from vla_ray.models.heads import mlp
from vla_ray.models.vla import build_trunk
from vla_ray.rl_module import VLAModule

# model_config keys of the TD3+BC module (not VLAConfig fields)
MODULE_KEYS = ("q_hidden",)


# -- losses (pure functions, unit-tested) --------------------------------------------------------
def td3_target(
    rewards: torch.Tensor,
    terminateds: torch.Tensor,
    q1_next: torch.Tensor,
    q2_next: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """Clipped double-Q target ``r + gamma * (1 - terminated) * min(Q1', Q2')``."""
    return rewards + gamma * (1.0 - terminateds.float()) * torch.minimum(q1_next, q2_next)


def td3bc_actor_loss(
    q: torch.Tensor, pi: torch.Tensor, actions: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``-lambda * mean(Q) + mean((pi - a)^2)`` with ``lambda = alpha / mean|Q|`` (no gradient
    through lambda); returns (loss, lambda)."""
    lam = alpha / q.abs().mean().detach().clamp(min=1e-6)
    return -lam * q.mean() + F.mse_loss(pi, actions), lam


# -- module -------------------------------------------------------------------------------------
class TD3BCModule(VLAModule, TargetNetworkAPI):
    """Deterministic VLA actor + twin Q critics on their own trunk + target copies."""

    MODEL_KEYS = VLAModule.MODEL_KEYS + MODULE_KEYS

    def setup(self) -> None:
        mc = dict(self.model_config or {})
        extra = {k: mc.pop(k) for k in MODULE_KEYS if k in mc}
        mc["value"] = "none"
        full, self.model_config = self.model_config, mc  # VLAModule sees VLA keys only
        try:
            super().setup()
        finally:
            self.model_config = full  # checkpoints rebuild the module from the full config
        head = self.vla.head
        if head.stochastic or self.vla.config.head != "mlp":
            raise ConfigError(
                f"head: TD3+BC needs the deterministic 'mlp' head, got {self.vla.config.head!r}"
            )
        self._low, self._high = head.low, head.high
        # the actor squashes into the action bounds: part of the VLA (and so of its `vla/`
        # export), whichever way it was built (fresh, or a pretrained_path's mlp head)
        head.squash = True
        self.vla.config.head_config = {**self.vla.config.head_config, "squash": True}
        if not self.inference_only:
            cfg = self.vla.config
            hidden = int(extra.get("q_hidden", 256))
            self.qf_trunk = build_trunk(cfg, self.vla.tokenizer)
            in_dim = self.qf_trunk.feature_dim + head.out_dim
            self.qf = mlp(in_dim, hidden, 1)
            self.qf_twin = mlp(in_dim, hidden, 1)

    # ---- pieces used by the learner ------------------------------------------------------------
    def actor(self, obs: dict[str, Any], trunk=None, head=None) -> torch.Tensor:
        """Actions (B, chunk * action_dim) in the action bounds (tanh-squashed MLP head)."""
        trunk = self.vla.trunk if trunk is None else trunk
        head = self.vla.head if head is None else head
        return head.predict(trunk(obs)).flatten(1)

    def q_values(self, obs, actions, trunk=None, nets=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Twin Q values (B,), (B,) of (obs, actions)."""
        trunk = self.qf_trunk if trunk is None else trunk
        q1, q2 = (self.qf, self.qf_twin) if nets is None else nets
        x = torch.cat([trunk(obs), actions.float()], dim=-1)
        return q1(x).squeeze(-1), q2(x).squeeze(-1)

    def target_q_of_next(self, next_obs: dict[str, Any], noise_fn) -> tuple[torch.Tensor, ...]:
        """Target twin Q of (s', smoothed target action)."""
        a = self.actor(next_obs, self._target_trunk, self._target_head)
        a = (a + noise_fn(a)).clamp(self._low, self._high)
        return self.q_values(
            next_obs, a, self._target_qf_trunk, (self._target_qf, self._target_qf_twin)
        )

    # ---- forward passes ---------------------------------------------------------------------
    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTIONS: self.actor(batch[Columns.OBS])}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTIONS: self.actor(batch[Columns.OBS])}

    # ---- target networks ----------------------------------------------------------------------
    def make_target_networks(self) -> None:
        self._target_trunk = make_target_network(self.vla.trunk)
        self._target_head = make_target_network(self.vla.head)
        self._target_qf_trunk = make_target_network(self.qf_trunk)
        self._target_qf = make_target_network(self.qf)
        self._target_qf_twin = make_target_network(self.qf_twin)

    def get_target_network_pairs(self):
        return [
            (self.vla.trunk, self._target_trunk),
            (self.vla.head, self._target_head),
            (self.qf_trunk, self._target_qf_trunk),
            (self.qf, self._target_qf),
            (self.qf_twin, self._target_qf_twin),
        ]

    def forward_target(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {
            Columns.ACTIONS: self.actor(batch[Columns.OBS], self._target_trunk, self._target_head)
        }

    def get_non_inference_attributes(self) -> list[str]:
        return ["qf_trunk", "qf", "qf_twin"]

    # deterministic policy: no action distribution
    def get_inference_action_dist_cls(self):
        return None

    def get_exploration_action_dist_cls(self):
        return None

    def get_train_action_dist_cls(self):
        return None


# -- learner ------------------------------------------------------------------------------------
class TD3BCLearner(TorchLearner):
    """Twin-critic TD learning + delayed, BC-regularised actor updates + Polyak targets."""

    def build(self) -> None:
        super().build()
        self._num_updates: dict[str, int] = defaultdict(int)
        self._actor_stepped: dict[str, bool] = {}
        self._losses: dict[tuple[str, str], torch.Tensor] = {}
        self.module.foreach_module(lambda mid, mod: mod.make_target_networks())

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        module = self._module[module_id]
        groups = {
            "critic": (
                self.get_parameters(module.qf_trunk)
                + self.get_parameters(module.qf)
                + self.get_parameters(module.qf_twin),
                config.critic_lr,
            ),
            "actor": (self.get_parameters(module.vla), config.actor_lr),
        }
        for name, (params, lr) in groups.items():
            params = [p for p in params if p.requires_grad]
            self.register_optimizer(
                module_id=module_id,
                optimizer_name=name,
                optimizer=torch.optim.Adam(params),
                params=params,
                lr_or_lr_schedule=lr,
            )

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        module = self.module[module_id].unwrapped()
        obs, next_obs = batch[Columns.OBS], batch[Columns.NEXT_OBS]
        actions = batch[Columns.ACTIONS].float()
        half_range = 0.5 * (module._high - module._low)

        def noise(a: torch.Tensor) -> torch.Tensor:
            eps = torch.randn_like(a) * config.policy_noise
            return eps.clamp(-config.noise_clip, config.noise_clip) * half_range

        with torch.no_grad():
            q1_next, q2_next = module.target_q_of_next(next_obs, noise)
            target = td3_target(
                batch[Columns.REWARDS].float(),
                batch[Columns.TERMINATEDS],
                q1_next,
                q2_next,
                config.gamma,
            )
        q1, q2 = module.q_values(obs, actions)
        critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        self._losses[(module_id, "critic")] = critic_loss
        total = critic_loss
        actor_step = self._num_updates[module_id] % int(config.policy_delay) == 0
        self._actor_stepped[module_id] = actor_step
        self._num_updates[module_id] += 1
        log = {"critic_loss": critic_loss, "q_mean": q1.mean(), "q_target_mean": target.mean()}
        if actor_step:
            pi = fwd_out[Columns.ACTIONS]
            q_pi, _ = module.q_values(obs, pi)
            actor_loss, lam = td3bc_actor_loss(q_pi, pi, actions, config.alpha)
            self._losses[(module_id, "actor")] = actor_loss
            total = total + actor_loss
            log.update(actor_loss=actor_loss, bc_mse=F.mse_loss(pi, actions), lmbda=lam)
        for key, value in log.items():
            self.metrics.log_value((module_id, key), float(value.detach()), window=1)
        return total

    def compute_gradients(self, loss_per_module, **kwargs):
        """Each optimizer's parameters get the gradient of their own loss only (the actor loss
        runs through the critic, whose parameters it must not move)."""
        grads = {}
        for module_id in set(loss_per_module) - {ALL_MODULES}:
            for optim_name, optim in self.get_optimizers_for_module(module_id):
                optim.zero_grad(set_to_none=True)
                loss = self._losses.pop((module_id, optim_name), None)
                if loss is None:  # the actor between its delayed updates
                    continue
                params = self.filter_param_dict_for_optimizer(self._params, optim)
                values = torch.autograd.grad(
                    loss, list(params.values()), retain_graph=True, allow_unused=True
                )
                grads.update(
                    {pid: g for pid, g in zip(params, values, strict=True) if g is not None}
                )
        self._losses.clear()
        return grads

    def after_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        for module_id, module in self.module._rl_modules.items():
            if self._actor_stepped.get(module_id):
                tau = self.config.get_config_for_module(module_id).tau
                for main, target in module.unwrapped().get_target_network_pairs():
                    update_target_network(main_net=main, target_net=target, tau=tau)


# -- config and algorithm -----------------------------------------------------------------------
class TD3BCConfig(OfflineVLAAlgorithmConfig, BCConfig):
    """TD3+BC settings on RLlib's offline (BC) pipeline; the caller adds env (spaces,
    evaluation), module and data."""

    NAME: ClassVar[str] = "td3bc"
    HEADS: ClassVar[tuple[str, ...]] = ("mlp",)
    MODEL_DEFAULTS: ClassVar[dict[str, Any]] = dict(head="mlp", value="none")

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or TD3BC)
        self.set_training_defaults(
            actor_lr=3e-4,
            critic_lr=3e-4,
            train_batch_size_per_learner=256,
            gamma=0.99,
            tau=0.005,
            policy_delay=2,
            policy_noise=0.2,
            noise_clip=0.5,
            alpha=2.5,
            normalize_states=True,
        )

    def training(
        self,
        *,
        actor_lr: float = NotProvided,
        critic_lr: float = NotProvided,
        tau: float = NotProvided,
        policy_delay: int = NotProvided,
        policy_noise: float = NotProvided,
        noise_clip: float = NotProvided,
        alpha: float = NotProvided,
        normalize_states: bool = NotProvided,
        **kwargs,
    ) -> TD3BCConfig:
        super().training(**kwargs)
        for name, value in dict(
            actor_lr=actor_lr,
            critic_lr=critic_lr,
            tau=tau,
            policy_delay=policy_delay,
            policy_noise=policy_noise,
            noise_clip=noise_clip,
            alpha=alpha,
            normalize_states=normalize_states,
        ).items():
            if value is not NotProvided:
                setattr(self, name, value)
        return self

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.tau <= 1.0:
            self._value_error(f"tau: must be in (0, 1], got {self.tau}")
        if int(self.policy_delay) < 1:
            self._value_error(f"policy_delay: must be >= 1, got {self.policy_delay}")
        for name in ("policy_noise", "noise_clip", "alpha"):
            if getattr(self, name) < 0:
                self._value_error(f"{name}: must be >= 0, got {getattr(self, name)}")

    def build_algo(self, *args, **kwargs):
        if self.normalize_states:
            add_state_normalisation(self)
        return super().build_algo(*args, **kwargs)

    def get_default_learner_class(self):
        return TD3BCLearner

    def get_default_rl_module_spec(self):
        from ray.rllib.core.rl_module.rl_module import RLModuleSpec

        return RLModuleSpec(module_class=TD3BCModule)


class TD3BC(BC):
    """RLlib's offline training step (sample the dataset, update the learner) with TD3+BC."""

    @classmethod
    def get_default_config(cls) -> TD3BCConfig:
        return TD3BCConfig()
