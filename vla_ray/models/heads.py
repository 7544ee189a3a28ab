"""Action heads: trunk features (B, F) -> action chunks (B, K, A).

Every head has ``loss(features, actions, mask=None)`` (its behaviour-cloning loss; ``mask``
(B, K) marks the chunk slots that hold real actions, see ``vla_ray.data.chunks``) and
``predict(features, deterministic)``; stochastic heads also give RLlib distribution inputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from vla_ray.config import ACTION_HEADS, check_choice

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None, action_dim: int) -> torch.Tensor:
    """Mean of per-element losses (B, K*A) over the unmasked chunk slots (``mask`` (B, K))."""
    if mask is None:
        return values.mean()
    w = mask.to(values.dtype).repeat_interleave(action_dim, dim=1)
    return (values * w).sum() / w.sum().clamp_min(1.0)


def masked_nll(logp: torch.Tensor, mask: torch.Tensor | None, action_dim: int) -> torch.Tensor:
    """Negative log-likelihood per sample (summed over its unmasked elements of (B, K*A)),
    averaged over the batch."""
    if mask is not None:
        logp = logp * mask.to(logp.dtype).repeat_interleave(action_dim, dim=1)
    return -logp.sum(-1).mean()


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2) -> nn.Sequential:
    """A GELU MLP with ``layers`` hidden layers."""
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.GELU()]
        d = hidden
    mods.append(nn.Linear(d, out_dim))
    return nn.Sequential(*mods)


class ActionHead(nn.Module):
    """Base class: holds the chunk geometry and the action bounds.

    ``takes_noise``: the head maps an initial noise chunk (B, K*A) to actions through
    ``sample(features, noise, steps=None)``; exported graphs then take ``noise`` as an input.
    """

    stochastic = False
    takes_noise = False

    def __init__(self, in_dim: int, action_dim: int, chunk_size: int, low: float, high: float):
        super().__init__()
        self.in_dim, self.action_dim, self.chunk_size = in_dim, action_dim, chunk_size
        self.out_dim = action_dim * chunk_size
        self.low, self.high = float(low), float(high)

    @property
    def value_dim(self) -> int:
        """Width of ``value_input`` (what a shared value head reads)."""
        return self.in_dim

    def value_input(self, features: torch.Tensor) -> torch.Tensor:
        """What a value head sharing the policy's trunk reads: the trunk features themselves,
        unless the head holds a representation of its own (the LeRobot expert's VLM)."""
        return features

    def dist_inputs_and_value_input(
        self, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stochastic heads: the distribution inputs and ``value_input`` from one pass."""
        return self.dist_inputs(features), self.value_input(features)

    def _chunk(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.view(flat.shape[0], self.chunk_size, self.action_dim)

    def _to_unit(self, actions: torch.Tensor) -> torch.Tensor:
        """Actions in [low, high] -> [-1, 1]."""
        return 2.0 * (actions - self.low) / (self.high - self.low) - 1.0

    def _from_unit(self, x: torch.Tensor) -> torch.Tensor:
        return self.low + (x + 1.0) * 0.5 * (self.high - self.low)

    def predict(self, features: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """Action chunk (B, K, A)."""
        raise NotImplementedError  # pragma: no cover - every head overrides

    def loss(
        self, features: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Behaviour-cloning loss against target chunks (B, K, A); ``mask`` (B, K) excludes the
        padded slots past an episode's end (None: every slot counts)."""
        raise NotImplementedError  # pragma: no cover - every head overrides


class MLPHead(ActionHead):
    """Deterministic regression head (MSE). With ``squash`` (``head_config``), the output is
    tanh-squashed into the action bounds (TD3+BC's actor)."""

    def __init__(
        self,
        in_dim,
        action_dim,
        chunk_size,
        low,
        high,
        hidden: int = 256,
        layers: int = 2,
        squash: bool = False,
    ):
        super().__init__(in_dim, action_dim, chunk_size, low, high)
        self.net = mlp(in_dim, hidden, self.out_dim, layers)
        self.squash = bool(squash)

    def predict(self, features, deterministic=True):
        out = self.net(features)
        return self._chunk(self._from_unit(torch.tanh(out)) if self.squash else out)

    def loss(self, features, actions, mask=None):
        err = (self.predict(features) - actions).pow(2).flatten(1)
        return masked_mean(err, mask, self.action_dim)


class GaussianHead(ActionHead):
    """Diagonal Gaussian with a learned, state-independent log-std (PPO, GRPO, BC by NLL).

    Distribution inputs are ``[mean, log_std]`` as RLlib's ``TorchDiagGaussian`` reads them.
    With ``squash`` (``head_config``) the mean is tanh-squashed into the action bounds (the
    sampled action is not: the env clips it), so a mean cannot drift past a bound where the
    env's clipping hides every change of it from the return.
    """

    stochastic = True

    def __init__(
        self,
        in_dim,
        action_dim,
        chunk_size,
        low,
        high,
        hidden: int = 256,
        layers: int = 2,
        init_log_std: float = -0.5,
        squash: bool = False,
    ):
        super().__init__(in_dim, action_dim, chunk_size, low, high)
        self.net = mlp(in_dim, hidden, self.out_dim, layers)
        nn.init.normal_(self.net[-1].weight, std=0.01)
        nn.init.zeros_(self.net[-1].bias)
        self.log_std = nn.Parameter(torch.full((self.out_dim,), float(init_log_std)))
        self.squash = bool(squash)

    def dist_inputs(self, features: torch.Tensor) -> torch.Tensor:
        mean = self.net(features)
        if self.squash:
            mean = self._from_unit(torch.tanh(mean))
        return torch.cat([mean, self.log_std.expand_as(mean)], dim=-1)

    def predict(self, features, deterministic=True):
        mean, log_std = self.dist_inputs(features).chunk(2, dim=-1)
        if not deterministic:
            mean = mean + log_std.exp() * torch.randn_like(mean)
        return self._chunk(mean)

    def loss(self, features, actions, mask=None):
        mean, log_std = self.dist_inputs(features).chunk(2, dim=-1)
        dist = torch.distributions.Normal(mean, log_std.exp())
        return masked_nll(dist.log_prob(actions.flatten(1)), mask, self.action_dim)


class TanhGaussianHead(ActionHead):
    """Tanh-squashed Gaussian with state-dependent std (SAC); inputs ``[mean, log_std]``."""

    stochastic = True

    def __init__(
        self, in_dim, action_dim, chunk_size, low, high, hidden: int = 256, layers: int = 2
    ):
        super().__init__(in_dim, action_dim, chunk_size, low, high)
        self.net = mlp(in_dim, hidden, 2 * self.out_dim, layers)

    def dist_inputs(self, features: torch.Tensor) -> torch.Tensor:
        mean, log_std = self.net(features).chunk(2, dim=-1)
        return torch.cat([mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)], dim=-1)

    def predict(self, features, deterministic=True):
        mean, log_std = self.dist_inputs(features).chunk(2, dim=-1)
        if not deterministic:
            mean = mean + log_std.exp() * torch.randn_like(mean)
        return self._chunk(self._from_unit(torch.tanh(mean)))

    def loss(self, features, actions, mask=None):
        mean, log_std = self.dist_inputs(features).chunk(2, dim=-1)
        u_target = self._to_unit(actions.flatten(1)).clamp(-0.999, 0.999)
        pre = torch.atanh(u_target)
        logp = torch.distributions.Normal(mean, log_std.exp()).log_prob(pre)
        logp = logp - torch.log1p(-u_target.pow(2))
        return masked_nll(logp, mask, self.action_dim)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def denoiser_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """The noise/velocity network of the generative heads: 3 Mish hidden layers."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.Mish(),
        nn.Linear(hidden, hidden),
        nn.Mish(),
        nn.Linear(hidden, hidden),
        nn.Mish(),
        nn.Linear(hidden, out_dim),
    )


class NoiseSampledHead(ActionHead):
    """A head that maps an initial noise chunk to actions (``sample(features, noise)``);
    ``predict`` starts from zero noise when deterministic, else from N(0, 1)."""

    takes_noise = True

    def sample(
        self, features: torch.Tensor, noise: torch.Tensor, steps: int | None = None
    ) -> torch.Tensor:
        """Action chunk (B, K, A) from ``noise`` (B, K*A)."""
        raise NotImplementedError  # pragma: no cover - every head overrides

    def predict(self, features, deterministic=True):
        shape = (features.shape[0], self.out_dim)
        noise = (
            torch.zeros(shape, device=features.device)
            if deterministic
            else torch.randn(shape, device=features.device)
        )
        return self.sample(features, noise)


class DiffusionHead(NoiseSampledHead):
    """Diffusion Policy head: DDPM noise-prediction training, DDIM sampling.

    ``inference_steps`` DDIM steps (eta = 0) map an initial noise chunk to actions; with a given
    ``noise`` the result is deterministic. ``deterministic=True`` starts from zero noise.
    """

    def __init__(
        self,
        in_dim,
        action_dim,
        chunk_size,
        low,
        high,
        hidden: int = 256,
        train_steps: int = 100,
        inference_steps: int = 10,
        time_dim: int = 32,
    ):
        super().__init__(in_dim, action_dim, chunk_size, low, high)
        if not 1 <= inference_steps <= train_steps:
            raise ValueError(
                f"head_config.inference_steps: expected 1..{train_steps}, got {inference_steps}"
            )
        self.train_steps, self.inference_steps, self.time_dim = (
            train_steps,
            inference_steps,
            time_dim,
        )
        self.eps_net = denoiser_mlp(self.out_dim + time_dim + in_dim, hidden, self.out_dim)
        # squared-cosine schedule (Nichol & Dhariwal) as in Diffusion Policy
        s = 0.008
        steps = torch.arange(train_steps + 1, dtype=torch.float64) / train_steps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.register_buffer("alpha_bar", torch.cumprod(1 - betas, 0).float(), persistent=False)

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.eps_net(torch.cat([x_t, timestep_embedding(t, self.time_dim), features], -1))

    def loss(self, features, actions, mask=None):
        x0 = self._to_unit(actions.flatten(1))
        t = torch.randint(0, self.train_steps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        ab = self.alpha_bar[t][:, None]
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        err = (self._eps(x_t, t, features) - noise).pow(2)
        return masked_mean(err, mask, self.action_dim)

    def sample(
        self, features: torch.Tensor, noise: torch.Tensor, steps: int | None = None
    ) -> torch.Tensor:
        """DDIM (eta = 0) from ``noise`` (B, K*A) -> action chunk (B, K, A)."""
        steps = steps or self.inference_steps
        ts = torch.linspace(self.train_steps - 1, 0, steps).round().long().tolist()
        x = noise
        x0 = x
        for i, t in enumerate(ts):
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            ab = self.alpha_bar[t]
            eps = self._eps(x, tt, features)
            x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
            if i + 1 < len(ts):
                ab_prev = self.alpha_bar[ts[i + 1]]
                eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
                x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        return self._chunk(self._from_unit(x0))


class FlowMatchingHead(NoiseSampledHead):
    """Flow-matching head (pi0 / SmolVLA convention): velocity regression, Euler sampling.

    Training: actions in unit space ``x0``, ``eps ~ N(0, I)``, ``t ~ Beta(1.5, 1)`` rescaled to
    [0.001, 1] (t = 1 is pure noise), ``x_t = t * eps + (1 - t) * x0``; the network regresses
    the velocity ``u = eps - x0``. Sampling: ``inference_steps`` Euler steps from ``noise`` at
    t = 1 to t = 0. ``deterministic=True`` starts from zero noise.
    """

    # t in [0, 1] is scaled by this before the sinusoidal embedding, so that its frequencies
    # (1 .. 1/10000 per unit) resolve the time as they resolve integer diffusion steps
    time_scale = 1000.0

    def __init__(
        self,
        in_dim,
        action_dim,
        chunk_size,
        low,
        high,
        hidden: int = 256,
        inference_steps: int = 10,
        time_dim: int = 32,
        time_alpha: float = 1.5,
        time_beta: float = 1.0,
        min_time: float = 0.001,
    ):
        super().__init__(in_dim, action_dim, chunk_size, low, high)
        if isinstance(inference_steps, bool) or not (
            isinstance(inference_steps, int) and inference_steps >= 1
        ):
            raise ValueError(
                f"head_config.inference_steps: expected an integer >= 1, got {inference_steps!r}"
            )
        self.inference_steps, self.time_dim = inference_steps, time_dim
        self.time_alpha, self.time_beta, self.min_time = time_alpha, time_beta, min_time
        self.v_net = denoiser_mlp(self.out_dim + time_dim + in_dim, hidden, self.out_dim)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """v_theta(x_t, t, features) for x_t (B, K*A) and continuous times t (B,) in [0, 1]."""
        emb = timestep_embedding(t * self.time_scale, self.time_dim)
        return self.v_net(torch.cat([x_t, emb, features], -1))

    def sample_time(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Training times (B,): Beta(time_alpha, time_beta) rescaled to [min_time, 1]."""
        a = torch.tensor(self.time_alpha, device=device)
        b = torch.tensor(self.time_beta, device=device)
        t = torch.distributions.Beta(a, b).sample((batch,))
        return t * (1.0 - self.min_time) + self.min_time

    def loss(self, features, actions, mask=None):
        x0 = self._to_unit(actions.flatten(1))
        eps = torch.randn_like(x0)
        t = self.sample_time(x0.shape[0], x0.device)
        x_t = t[:, None] * eps + (1.0 - t[:, None]) * x0
        err = (self.velocity(x_t, t, features) - (eps - x0)).pow(2)
        return masked_mean(err, mask, self.action_dim)

    def sample(
        self, features: torch.Tensor, noise: torch.Tensor, steps: int | None = None
    ) -> torch.Tensor:
        """Euler integration from ``noise`` (B, K*A) at t = 1 to t = 0 -> action chunk (B, K, A)."""
        steps = steps or self.inference_steps
        dt = -1.0 / steps
        x = noise
        for i in range(steps):
            t = torch.full((x.shape[0],), 1.0 + i * dt, device=x.device, dtype=x.dtype)
            x = x + dt * self.velocity(x, t, features)
        return self._chunk(self._from_unit(x.clamp(-1.0, 1.0)))


class TransformerHead(ActionHead):
    """Autoregressive decoder over discretised action tokens (256 uniform bins per dimension).

    The K*A action tokens are generated left to right, conditioned on the trunk features as the
    first token (OpenVLA-style binning; cross-entropy loss).
    """

    def __init__(
        self,
        in_dim,
        action_dim,
        chunk_size,
        low,
        high,
        bins: int = 256,
        d_model: int = 64,
        layers: int = 2,
        heads: int = 4,
    ):
        super().__init__(in_dim, action_dim, chunk_size, low, high)
        self.bins = bins
        self.feat = nn.Linear(in_dim, d_model)
        self.tok = nn.Embedding(bins, d_model)
        self.pos = nn.Parameter(torch.randn(1, self.out_dim, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d_model, bins)
        mask = torch.triu(torch.full((self.out_dim, self.out_dim), float("-inf")), diagonal=1)
        self.register_buffer("causal", mask, persistent=False)

    def tokenize(self, actions: torch.Tensor) -> torch.Tensor:
        """Continuous actions (..., ) -> bin indices in [0, bins)."""
        u = (self._to_unit(actions) + 1.0) * 0.5
        return (u * self.bins).floor().long().clamp(0, self.bins - 1)

    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bin indices -> bin centres in [low, high]."""
        return self._from_unit((tokens.float() + 0.5) / self.bins * 2.0 - 1.0)

    def logits(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, n+1 clipped to K*A, bins) given the first n tokens."""
        x = self.feat(features)[:, None]
        if tokens.shape[1] > 0:
            x = torch.cat([x, self.tok(tokens)], dim=1)
        x = x[:, : self.out_dim] + self.pos[:, : x.shape[1]]
        n = x.shape[1]
        return self.out(self.decoder(x, mask=self.causal[:n, :n]))

    def loss(self, features, actions, mask=None):
        target = self.tokenize(actions.flatten(1))
        logits = self.logits(features, target[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, self.bins), target.reshape(-1), reduction="none")
        return masked_mean(ce.view(target.shape), mask, self.action_dim)

    def predict(self, features, deterministic=True):
        tokens = torch.zeros(features.shape[0], 0, dtype=torch.long, device=features.device)
        for _ in range(self.out_dim):
            last = self.logits(features, tokens)[:, -1]
            if deterministic:
                nxt = last.argmax(-1)
            else:
                nxt = torch.distributions.Categorical(logits=last).sample()
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        return self._chunk(self.detokenize(tokens))


HEADS = {
    "mlp": MLPHead,
    "gaussian": GaussianHead,
    "tanh_gaussian": TanhGaussianHead,
    "diffusion": DiffusionHead,
    "flow_matching": FlowMatchingHead,
    "transformer": TransformerHead,
}


def takes_noise(name: str) -> bool:
    """Whether the head registered as ``name`` samples from an initial noise input."""
    check_choice("head", name, ACTION_HEADS)
    return HEADS[name].takes_noise


def build_head(
    name: str,
    in_dim: int,
    action_dim: int,
    chunk_size: int,
    low: float,
    high: float,
    **kwargs: object,
) -> ActionHead:
    """Build an action head by name (see ``ACTION_HEADS``)."""
    check_choice("head", name, ACTION_HEADS)
    return HEADS[name](in_dim, action_dim, chunk_size, low, high, **kwargs)
