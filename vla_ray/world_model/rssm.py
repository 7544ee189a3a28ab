"""The RSSM: a deterministic GRU state ``h`` and ``stoch`` categorical latents ``z``.

Pieces from RLlib's DreamerV3 (``ray.rllib.algorithms.dreamerv3.torch.models.components``):
its GRU cell (``DreamerV3GRU``, layer-normed, update bias -1) and its ``MLP`` (linear, layer
norm, SiLU; DreamerV3's initialiser). Where this file diverges, and why:

- the categorical layer is our own: RLlib's ``RepresentationLayer`` samples from the global
  torch RNG, and imagined rollouts here must be reproducible from a ``torch.Generator``
  (checkpoint round-trips, planning with common random numbers);
- RLlib's ``SequenceModel`` sizes its pre-GRU layer from ``model_size`` with no override, so
  it is rebuilt here from the same MLP and GRU with our sizes;
- the world model is batch-major (B, T, ...) and takes the action *before* each observation
  (``prev_actions[:, t]`` led to ``obs[:, t]``), the layout our datasets convert to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from ray.rllib.algorithms.dreamerv3.torch.models.components.mlp import MLP
from ray.rllib.algorithms.dreamerv3.torch.models.components.sequence_model import DreamerV3GRU
from torch import nn


@dataclass
class RSSMState:
    """Deterministic state ``h`` (..., deter) and stochastic one-hot sample ``z``
    (..., stoch, classes), straight-through (its gradient is that of the probabilities)."""

    h: torch.Tensor
    z: torch.Tensor

    def features(self) -> torch.Tensor:
        """``[h, flatten(z)]`` (..., deter + stoch * classes): what the heads read."""
        return torch.cat([self.h, self.z.flatten(-2)], dim=-1)

    def detach(self) -> RSSMState:
        return RSSMState(self.h.detach(), self.z.detach())

    def flatten(self) -> RSSMState:
        """Leading (B, T) dims folded into one."""
        return RSSMState(
            self.h.reshape(-1, self.h.shape[-1]), self.z.reshape(-1, *self.z.shape[-2:])
        )


def sample_categorical(
    probs: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One-hot samples of independent categoricals ``probs`` (..., S, C), straight-through."""
    flat = probs.detach().reshape(-1, probs.shape[-1])
    idx = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
    onehot = nn.functional.one_hot(idx, probs.shape[-1]).to(probs.dtype).reshape(probs.shape)
    return onehot + probs - probs.detach()


class CategoricalLayer(nn.Module):
    """Linear -> ``stoch`` categoricals of ``classes``, mixed with ``unimix`` uniform."""

    def __init__(self, in_dim: int, stoch: int, classes: int, unimix: float):
        super().__init__()
        self.linear = nn.Linear(in_dim, stoch * classes)
        self.stoch, self.classes, self.unimix = stoch, classes, unimix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities (..., stoch, classes)."""
        logits = self.linear(x).reshape(*x.shape[:-1], self.stoch, self.classes)
        return (1 - self.unimix) * logits.softmax(-1) + self.unimix / self.classes


class RSSM(nn.Module):
    """Recurrent state-space model over embeddings ``e_t`` and previous actions ``a_{t-1}``:
    ``h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}])``, prior ``p(z_t | h_t)``, posterior
    ``q(z_t | h_t, e_t)``."""

    def __init__(
        self,
        embed_dim: int,
        action_dim: int,
        deter: int,
        stoch: int,
        classes: int,
        hidden: int,
        unimix: float = 0.01,
    ):
        super().__init__()
        self.deter, self.stoch, self.classes = deter, stoch, classes
        self.action_dim = action_dim
        self.feature_dim = deter + stoch * classes
        self.initial_h = nn.Parameter(torch.zeros(deter))
        self.pre_gru = MLP(
            input_size=stoch * classes + action_dim, num_dense_layers=1, dense_hidden_units=hidden
        )
        self.gru = DreamerV3GRU(input_size=hidden, cell_size=deter)
        self.prior_mlp = MLP(input_size=deter, num_dense_layers=1, dense_hidden_units=hidden)
        self.prior = CategoricalLayer(hidden, stoch, classes, unimix)
        self.post_mlp = MLP(
            input_size=deter + embed_dim, num_dense_layers=1, dense_hidden_units=hidden
        )
        self.post = CategoricalLayer(hidden, stoch, classes, unimix)

    def initial(self, batch: int) -> RSSMState:
        """The learned initial state: ``tanh(initial_h)`` and the prior's mode for ``z``."""
        h = torch.tanh(self.initial_h).expand(batch, -1)
        probs = self.prior(self.prior_mlp(h))
        z = nn.functional.one_hot(probs.argmax(-1), self.classes).to(h.dtype)
        return RSSMState(h, z)

    def prior_probs(self, h: torch.Tensor) -> torch.Tensor:
        return self.prior(self.prior_mlp(h))

    def recur(self, state: RSSMState, action: torch.Tensor) -> torch.Tensor:
        """The next deterministic state ``h'`` (B, deter)."""
        x = self.pre_gru(torch.cat([state.z.flatten(-2), action], dim=-1))
        h, _ = self.gru(x, state.h)
        return h

    def img_step(
        self, state: RSSMState, action: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[RSSMState, torch.Tensor]:
        """One imagined step: the next state with ``z`` sampled from the prior, and the
        prior's probabilities."""
        h = self.recur(state, action)
        probs = self.prior_probs(h)
        return RSSMState(h, sample_categorical(probs, generator)), probs

    def observe(
        self,
        embed: torch.Tensor,
        prev_actions: torch.Tensor,
        is_first: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[RSSMState, torch.Tensor, torch.Tensor]:
        """Filter a batch of sequences (B, T, ...): the posterior states (B, T, ...), the
        posterior and the prior probabilities (B, T, stoch, classes). Where ``is_first`` the
        state and the previous action restart from ``initial``."""
        B, T = embed.shape[:2]
        state = self.initial(B)
        hs, zs, posts, priors = [], [], [], []
        for t in range(T):
            first = is_first[:, t].to(embed.dtype)[:, None]
            init = self.initial(B)
            state = RSSMState(
                first * init.h + (1 - first) * state.h,
                first[..., None] * init.z + (1 - first[..., None]) * state.z,
            )
            action = prev_actions[:, t] * (1 - first)
            h = self.recur(state, action)
            prior = self.prior_probs(h)
            post = self.post(self.post_mlp(torch.cat([h, embed[:, t]], dim=-1)))
            state = RSSMState(h, sample_categorical(post, generator))
            hs.append(h)
            zs.append(state.z)
            posts.append(post)
            priors.append(prior)
        stacked = RSSMState(torch.stack(hs, 1), torch.stack(zs, 1))
        return stacked, torch.stack(posts, 1), torch.stack(priors, 1)
