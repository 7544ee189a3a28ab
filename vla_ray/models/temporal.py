"""Temporal memory over the trunk's per-step features, chosen by name (``VLAConfig.temporal``).

The trunk turns one observation into features (B, F); a temporal module turns a sequence of
them (B, T, F) plus a per-sample state into memory-aware features (B, T, F + hidden), which
the action head and the value head read. The state is what RLlib's stateful RLModule API
carries between calls (``Columns.STATE_IN`` / ``STATE_OUT``; ``initial_state`` at an episode's
start):

- ``gru``: a GRU over the projected features; the state is its hidden state ``h``
  (layers, hidden). ``history`` is the length of the training sequences (truncated BPTT).
- ``transformer``: causal self-attention over a sliding window of the last ``history`` steps'
  projected features, with a learned relative-position bias per head; the state is the window
  of the previous ``history - 1`` projected features and their validity (0 before the episode
  started). The window lives in the module state rather than in an env-side frame stack so that
  the trunk (the VLA's expensive part) runs once per step, not ``history`` times, and RLlib's
  own connectors carry it (an env-side stack would multiply the observation's size by
  ``history`` for every image and sensor).

Both outputs are ``[features, memory]`` (F + hidden): the current step stays directly visible to
the head and memory adds to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vla_ray.config import ConfigError, check_choice

TEMPORALS = ("none", "gru", "transformer")
# temporal -> its temporal_config keys and defaults
TEMPORAL_DEFAULTS: dict[str, dict[str, Any]] = {
    "none": {},
    "gru": dict(history=16, hidden=64, layers=1),
    "transformer": dict(history=8, hidden=64, layers=1, heads=4),
}


def check_temporal(temporal: str, temporal_config: Mapping[str, Any]) -> dict[str, Any]:
    """``temporal_config`` with the module's defaults filled in; ConfigError naming the field,
    what is allowed and what was given otherwise."""
    check_choice("temporal", temporal, TEMPORALS)
    if not isinstance(temporal_config, Mapping):
        raise ConfigError(f"temporal_config: expected a dict, got {temporal_config!r}")
    defaults = TEMPORAL_DEFAULTS[temporal]
    unknown = sorted(set(temporal_config) - set(defaults))
    if unknown:
        valid = ", ".join(sorted(defaults)) or "none (temporal='none' takes no config)"
        raise ConfigError(
            f"temporal_config: unknown key(s) {unknown} for temporal={temporal!r}; "
            f"valid keys are {valid}"
        )
    full = {**defaults, **temporal_config}
    for name in ("history", "hidden", "layers", "heads"):
        if name in full and (
            not isinstance(full[name], int) or isinstance(full[name], bool) or full[name] < 1
        ):
            raise ConfigError(
                f"temporal_config.{name}: expected a positive integer, got {full[name]!r}"
            )
    if temporal == "transformer":
        if full["history"] < 2:
            raise ConfigError(
                "temporal_config.history: the transformer attends over a window of >= 2 steps, "
                f"got {full['history']}"
            )
        if full["hidden"] % full["heads"]:
            raise ConfigError(
                f"temporal_config.hidden: must be divisible by heads={full['heads']}, "
                f"got {full['hidden']}"
            )
    return full


class TemporalModule(nn.Module):
    """Base class: (B, T, F) features and a state -> (B, T, out_dim) features and the state
    after the last step. States are dicts of tensors with a leading batch dim."""

    def __init__(self, in_dim: int, hidden: int, history: int):
        super().__init__()
        self.in_dim, self.hidden, self.history = in_dim, hidden, history
        self.out_dim = in_dim + hidden

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The state at an episode's start, for one sample (no batch dim)."""
        raise NotImplementedError  # pragma: no cover - every module overrides

    def batch_initial_state(self, batch: int) -> dict[str, torch.Tensor]:
        """``initial_state`` repeated over ``batch`` samples, on this module's device."""
        device = next(self.parameters()).device
        return {
            k: v.to(device)[None].expand(batch, *v.shape).clone()
            for k, v in self.initial_state().items()
        }

    def forward(
        self, features: torch.Tensor, state: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError  # pragma: no cover - every module overrides


class GRUTemporal(TemporalModule):
    """A GRU over projected per-step features; state ``h`` (B, layers, hidden)."""

    def __init__(self, in_dim: int, history: int, hidden: int, layers: int):
        super().__init__(in_dim, hidden, history)
        self.layers = layers
        self.gru = nn.GRU(in_dim, hidden, num_layers=layers, batch_first=True)

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {"h": torch.zeros(self.layers, self.hidden)}

    def forward(
        self, features: torch.Tensor, state: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h0 = state["h"].to(features.dtype).transpose(0, 1).contiguous()  # (layers, B, hidden)
        memory, h = self.gru(features, h0)
        return torch.cat([features, memory], dim=-1), {"h": h.transpose(0, 1)}


class WindowTransformer(TemporalModule):
    """Pre-norm transformer layers over each step's window of the last ``history`` projected
    features; state ``window`` (B, history - 1, hidden) and ``valid`` (B, history - 1)."""

    def __init__(self, in_dim: int, history: int, hidden: int, layers: int, heads: int):
        super().__init__(in_dim, hidden, history)
        self.heads = heads
        self.proj = nn.Linear(in_dim, hidden)
        # bias[h, k]: head h's score for the step k steps back (0: the current step)
        self.rel_bias = nn.Parameter(torch.zeros(heads, history))
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                dict(
                    norm1=nn.LayerNorm(hidden),
                    qkv=nn.Linear(hidden, 3 * hidden),
                    out=nn.Linear(hidden, hidden),
                    norm2=nn.LayerNorm(hidden),
                    mlp=nn.Sequential(
                        nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden)
                    ),
                )
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)

    def initial_state(self) -> dict[str, torch.Tensor]:
        n = self.history - 1
        return {"window": torch.zeros(n, self.hidden), "valid": torch.zeros(n)}

    def _bias(self, valid: torch.Tensor) -> torch.Tensor:
        """Additive attention mask (B, heads, L, L): step i sees steps i-history+1 .. i that are
        valid (always itself), with the relative-position bias."""
        L = valid.shape[1]
        idx = torch.arange(L, device=valid.device)
        back = idx[:, None] - idx[None, :]  # i - j
        band = (back >= 0) & (back < self.history)
        allowed = band[None] & ((valid[:, None, :] > 0) | (back == 0)[None])  # (B, L, L)
        rel = self.rel_bias[:, back.clamp(0, self.history - 1)]  # (heads, L, L)
        neg = torch.finfo(rel.dtype).min
        return torch.where(allowed[:, None], rel[None], torch.full_like(rel[None], neg))

    def forward(
        self, features: torch.Tensor, state: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B, T, _ = features.shape
        new = self.proj(features)
        window = state["window"].to(new.dtype)
        x = torch.cat([window, new], dim=1)  # (B, L = history - 1 + T, hidden)
        valid = torch.cat([state["valid"].to(new.dtype), new.new_ones(B, T)], dim=1)
        mask = self._bias(valid)
        d = self.hidden // self.heads
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["norm1"](x)).chunk(3, dim=-1)
            q, k, v = (t.view(B, -1, self.heads, d).transpose(1, 2) for t in (q, k, v))
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + blk["out"](att.transpose(1, 2).reshape(B, -1, self.hidden))
            x = x + blk["mlp"](blk["norm2"](x))
        memory = self.norm(x[:, -T:])
        n = self.history - 1
        # the next call's window: the last history - 1 projected inputs (not the layers' outputs)
        all_in = torch.cat([window, new], dim=1)
        return torch.cat([features, memory], dim=-1), {
            "window": all_in[:, -n:],
            "valid": valid[:, -n:],
        }


def build_temporal(
    temporal: str, temporal_config: Mapping[str, Any], in_dim: int
) -> TemporalModule | None:
    """The temporal module ``temporal`` names over ``in_dim`` features (None for ``none``)."""
    full = check_temporal(temporal, temporal_config)
    if temporal == "gru":
        return GRUTemporal(in_dim, full["history"], full["hidden"], full["layers"])
    if temporal == "transformer":
        return WindowTransformer(
            in_dim, full["history"], full["hidden"], full["layers"], full["heads"]
        )
    return None


def fold_time(obs: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int, int]:
    """A time-ranked observation dict (B, T, ...) as (B * T, ...), with B and T."""
    B, T = obs["instruction_mask"].shape[:2]
    return {k: v.reshape(B * T, *v.shape[2:]) for k, v in obs.items()}, B, T
