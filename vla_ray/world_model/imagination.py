"""Actor-critic on imagined rollouts (DreamerV3): the actor and critic read the RSSM's latent
features; rollouts run the world model's prior forward from posterior start states.

Gradients go only where intended: the world model's parameters are frozen while imagining
(the actor loss never reaches them); with ``actor_grad="reinforce"`` the imagined states are
detached (score-function gradient only), with ``"dynamics"`` the actor's loss backpropagates
through the (frozen) dynamics, reward and continuation heads into the actor's actions.
The critic trains on detached features against detached lambda-returns.

Divergences from RLlib's DreamerV3 learner, and why: the return scale is ``max(1, P95 - P5)``
as in the paper (RLlib clamps at 1e-8, which amplifies tiny returns); continuous actions are a
tanh-squashed Gaussian scaled to the action bounds (the VLA action spaces are bounded Boxes).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from ray.rllib.algorithms.dreamerv3.torch.models.components.mlp import MLP
from torch import nn

from vla_ray.world_model.config import WorldModelConfig
from vla_ray.world_model.losses import ReturnNormalizer, TwoHotHead, lambda_returns
from vla_ray.world_model.model import WorldModel
from vla_ray.world_model.rssm import RSSMState


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of ``module`` do not require grad inside the block (restored after)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class LatentActor(nn.Module):
    """Latent features -> tanh-squashed Gaussian actions within ``[low, high]``."""

    def __init__(
        self, feature_dim: int, action_dim: int, hidden: int, low: float = -1.0, high: float = 1.0
    ):
        super().__init__()
        self.net = MLP(input_size=feature_dim, num_dense_layers=2, dense_hidden_units=hidden)
        self.out = nn.Linear(hidden, 2 * action_dim)
        self.low, self.high = float(low), float(high)

    def _dist(self, feat: torch.Tensor) -> torch.distributions.Normal:
        mean, raw_std = self.out(self.net(feat)).chunk(2, -1)
        std = 0.1 + 0.9 * torch.sigmoid(raw_std + 2.0)  # DreamerV3-style bounded std
        return torch.distributions.Normal(mean, std)

    def squash(self, u: torch.Tensor) -> torch.Tensor:
        return self.low + (torch.tanh(u) + 1) * 0.5 * (self.high - self.low)

    def sample(
        self, feat: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A reparameterised action, the log-probability of its pre-squash sample and the
        Gaussian's entropy (per row)."""
        dist = self._dist(feat)
        eps = torch.randn(dist.mean.shape, generator=generator, device=feat.device)
        u = dist.mean + dist.stddev * eps
        logp = dist.log_prob(u.detach()).sum(-1)
        return self.squash(u), logp, dist.entropy().sum(-1)

    def mode(self, feat: torch.Tensor) -> torch.Tensor:
        """The deterministic action (squashed mean)."""
        return self.squash(self._dist(feat).mean)


class LatentCritic(nn.Module):
    """Latent features -> value (two-hot over symlog bins), with a slow EMA copy (``slow``,
    not trained by gradient: its parameters never require grad)."""

    def __init__(self, feature_dim: int, config: WorldModelConfig):
        super().__init__()
        self.net = MLP(input_size=feature_dim, num_dense_layers=2, dense_hidden_units=config.hidden)
        self.head = TwoHotHead(
            config.hidden, config.num_buckets, config.bucket_low, config.bucket_high
        )
        self.slow = copy.deepcopy(nn.ModuleList([self.net, self.head])).requires_grad_(False)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(feat))

    def trainable(self) -> list[nn.Parameter]:
        """The parameters the critic's optimiser updates (not the slow copy)."""
        return [*self.net.parameters(), *self.head.parameters()]

    def slow_value(self, feat: torch.Tensor) -> torch.Tensor:
        net, head = self.slow
        return head(net(feat))

    def loss(self, feat: torch.Tensor, target: torch.Tensor, reg: float) -> torch.Tensor:
        """Two-hot cross-entropy to ``target`` plus ``reg`` x that to the slow critic."""
        hidden = self.net(feat)
        with torch.no_grad():
            slow = self.slow_value(feat)
        return self.head.loss(hidden, target) + reg * self.head.loss(hidden, slow)

    @torch.no_grad()
    def update_slow(self, decay: float) -> None:
        """slow <- decay * slow + (1 - decay) * critic."""
        for s, f in zip(self.slow.parameters(), self.trainable(), strict=True):
            s.mul_(decay).add_((1 - decay) * f)


@dataclass
class Imagined:
    """A rollout, time-major: features (H+1, N, F), actions, log-probs and entropies (H, N),
    rewards and continuation probabilities (H+1, N) predicted at each state."""

    features: torch.Tensor
    actions: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    rewards: torch.Tensor
    continues: torch.Tensor


def imagine(
    world_model: WorldModel,
    actor: LatentActor,
    start: RSSMState,
    horizon: int,
    actor_grad: str = "reinforce",
    generator: torch.Generator | None = None,
) -> Imagined:
    """Roll the prior forward ``horizon`` steps from ``start`` (N rows) with the actor's
    actions; the world model's parameters are frozen throughout."""
    dynamics = actor_grad == "dynamics"
    state = start.detach()
    feats, actions, logps, ents = [state.features()], [], [], []
    with frozen(world_model):
        for _ in range(horizon):
            feat = feats[-1]
            action, logp, ent = actor.sample(feat if dynamics else feat.detach(), generator)
            state, _ = world_model.rssm.img_step(
                state, action if dynamics else action.detach(), generator
            )
            feats.append(state.features())
            actions.append(action)
            logps.append(logp)
            ents.append(ent)
        features = torch.stack(feats)
        rewards = world_model.reward(features)
        continues = world_model.continue_prob(features)
    return Imagined(
        features, torch.stack(actions), torch.stack(logps), torch.stack(ents), rewards, continues
    )


def actor_critic_losses(
    rollout: Imagined,
    actor: LatentActor,
    critic: LatentCritic,
    normalizer: ReturnNormalizer,
    config: WorldModelConfig,
    first_continues: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """DreamerV3's actor and critic losses on an imagined rollout (means over steps and rows,
    weighted by the predicted probability of still being in the episode)."""
    feats = rollout.features
    with frozen(critic):
        values = critic(feats)  # gradient reaches features (dynamics mode), never the critic
    continues = rollout.continues.clone()
    if first_continues is not None:
        continues[0] = first_continues
    returns = lambda_returns(rollout.rewards, continues, values, config.gamma, config.lambda_)
    weight = torch.cumprod(
        torch.cat([torch.ones_like(continues[:1]), continues[1:-1] * config.gamma]), 0
    ).detach()
    normalizer.update(returns)
    scale = normalizer.scale().to(returns.device)
    adv = (returns - values[:-1]) / scale
    if config.actor_grad == "reinforce":
        policy = -rollout.logp * adv.detach()
    else:
        policy = -adv
    actor_loss = (weight * (policy - config.entropy_scale * rollout.entropy)).mean()
    critic_loss = (
        weight * critic.loss(feats[:-1].detach(), returns.detach(), config.critic_ema_reg)
    ).mean()
    metrics = {
        "actor_loss": actor_loss.item(),
        "critic_loss": critic_loss.item(),
        "imagined_return": returns[0].mean().item(),
        "return_scale": float(scale),
        "actor_entropy": rollout.entropy.mean().item(),
    }
    return actor_loss, critic_loss, metrics
