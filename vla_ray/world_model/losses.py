"""DreamerV3's loss arithmetic: symlog two-hot regression, KL balancing with free bits,
lambda-returns and percentile return normalisation.

``symlog``, ``inverse_symlog`` and ``two_hot`` are RLlib's (``ray.rllib.utils.torch_utils``).
"""

from __future__ import annotations

import torch
from ray.rllib.utils.torch_utils import inverse_symlog, symlog, two_hot
from torch import nn

__all__ = [
    "FG_THRESHOLD",
    "ReturnNormalizer",
    "TwoHotHead",
    "categorical_kl",
    "foreground_mask",
    "kl_balance",
    "lambda_returns",
    "symlog",
    "inverse_symlog",
    "weighted_image_error",
]

# a pixel is foreground when one channel differs from the background by more than this
# (images in [-0.5, 0.5]: 0.1 = 25 of 255 grey levels, above anti-aliasing noise)
FG_THRESHOLD = 0.1


def foreground_mask(
    image: torch.Tensor, background: torch.Tensor | None = None, threshold: float = FG_THRESHOLD
) -> torch.Tensor:
    """1 where a pixel of the (..., H, W, C) images differs from ``background`` (H, W, C) by
    more than ``threshold`` in some channel, else 0 -> (..., H, W). The default background is
    the per-pixel median over all the images (what stays put across a batch of episodes: the
    floor and borders, not the objects that move or change place between episodes)."""
    if background is None:
        background = image.reshape(-1, *image.shape[-3:]).median(dim=0).values
    return ((image - background).abs().amax(-1) > threshold).to(image.dtype)


def weighted_image_error(
    pred: torch.Tensor,
    target: torch.Tensor,
    fg_weight: float = 1.0,
    background: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Squared error of (..., H, W, C) images: ``loss`` (...,) sums it over pixels and channels
    with weight ``fg_weight`` on the :func:`foreground_mask` pixels of ``target`` and 1
    elsewhere; ``mse``, ``fg_mse`` and ``bg_mse`` (...,) are the unweighted mean errors over all,
    foreground and background pixels (0 where an image has none of that kind), ``fg_fraction``
    the share of foreground pixels."""
    err = ((pred - target) ** 2).mean(-1)  # (..., H, W), mean over channels
    fg = foreground_mask(target, background)
    weight = 1.0 + (fg_weight - 1.0) * fg
    n_fg = fg.sum((-1, -2))
    n_bg = (1 - fg).sum((-1, -2))
    return {
        # x C: the sum over pixels and channels, the plain summed MSE with fg_weight=1
        "loss": target.shape[-1] * (weight * err).sum((-1, -2)),
        "mse": err.mean((-1, -2)),
        "fg_mse": (fg * err).sum((-1, -2)) / n_fg.clamp(min=1.0),
        "bg_mse": ((1 - fg) * err).sum((-1, -2)) / n_bg.clamp(min=1.0),
        "fg_fraction": fg.mean((-1, -2)),
    }


class TwoHotHead(nn.Module):
    """Linear layer -> logits over ``num_buckets`` equally spaced bins of symlog space: the
    prediction is ``symexp(sum(softmax(logits) * bins))``, the loss the cross-entropy with the
    two-hot encoding of ``symlog(target)``. Zero-initialised, as DreamerV3's reward and value
    output layers (predictions start at 0)."""

    def __init__(self, in_dim: int, num_buckets: int, low: float, high: float):
        super().__init__()
        self.linear = nn.Linear(in_dim, num_buckets)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.num_buckets, self.low, self.high = num_buckets, low, high
        self.register_buffer("bins", torch.linspace(low, high, num_buckets), persistent=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Bin logits (..., num_buckets)."""
        return self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted value (...,) in real (non-symlog) space."""
        probs = self.logits(x).softmax(-1)
        return inverse_symlog((probs * self.bins).sum(-1))

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with two_hot(symlog(target)), per element (...,)."""
        logits = self.logits(x)
        flat = symlog(target.reshape(-1).float())
        th = two_hot(flat, self.num_buckets, self.low, self.high, device=flat.device)
        th = th.reshape(*target.shape, self.num_buckets)
        return -(th * logits.log_softmax(-1)).sum(-1)


def categorical_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of independent categoricals given as probabilities (..., S, C), summed over
    the S categoricals -> (...)."""
    eps = 1e-8
    return (p * ((p + eps).log() - (q + eps).log())).sum((-1, -2))


def kl_balance(
    post: torch.Tensor,
    prior: torch.Tensor,
    free_nats: float = 1.0,
    dyn_scale: float = 0.5,
    rep_scale: float = 0.1,
) -> dict[str, torch.Tensor]:
    """DreamerV3's KL balancing with free bits, per step (...):

    ``dyn = max(free_nats, KL(sg(post) || prior))`` trains the prior (dynamics);
    ``rep = max(free_nats, KL(post || sg(prior)))`` trains the posterior (representation);
    ``loss = dyn_scale * dyn + rep_scale * rep``. ``kl`` is the unclipped KL(post || prior).
    """
    kl = categorical_kl(post.detach(), prior)
    rep_kl = categorical_kl(post, prior.detach())
    dyn = kl.clamp(min=free_nats)
    rep = rep_kl.clamp(min=free_nats)
    return {"loss": dyn_scale * dyn + rep_scale * rep, "dyn": dyn, "rep": rep, "kl": kl.detach()}


def lambda_returns(
    rewards: torch.Tensor,
    continues: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    lambda_: float,
) -> torch.Tensor:
    """TD(lambda) targets over an imagined trajectory, time-major (H+1, N) inputs:
    ``R_t = r_{t+1} + gamma c_{t+1} ((1 - lambda) v_{t+1} + lambda R_{t+1})``, ``R_H = v_H``.
    ``rewards[t]``/``continues[t]`` are those predicted at state t (reward on arriving there).
    Returns (H, N): the targets of states 0..H-1."""
    disc = gamma * continues[1:]
    out = [values[-1]]
    for t in reversed(range(rewards.shape[0] - 1)):
        nxt = (1 - lambda_) * values[t + 1] + lambda_ * out[-1]
        out.append(rewards[t + 1] + disc[t] * nxt)
    return torch.stack(out[::-1][:-1])


class ReturnNormalizer(nn.Module):
    """DreamerV3's return scale: EMAs of the 5th and 95th percentiles of the lambda-returns;
    advantages are divided by ``max(1, P95 - P5)`` (small returns are not amplified)."""

    def __init__(self, decay: float = 0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("low", torch.tensor(float("nan")))
        self.register_buffer("high", torch.tensor(float("nan")))

    @torch.no_grad()
    def update(self, returns: torch.Tensor) -> None:
        """Move the percentile EMAs towards this batch's (the first batch sets them)."""
        lo = torch.quantile(returns.detach().float().flatten(), 0.05)
        hi = torch.quantile(returns.detach().float().flatten(), 0.95)
        if torch.isnan(self.low):
            self.low.copy_(lo)
            self.high.copy_(hi)
        else:
            self.low.mul_(self.decay).add_((1 - self.decay) * lo)
            self.high.mul_(self.decay).add_((1 - self.decay) * hi)

    def scale(self) -> torch.Tensor:
        """``max(1, P95 - P5)`` (1 before any update)."""
        if torch.isnan(self.low):
            return torch.ones(())
        return (self.high - self.low).clamp(min=1.0)
