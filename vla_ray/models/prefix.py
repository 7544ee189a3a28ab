"""The instruction-prefix cache shared by the trunks.

The instruction is the same for every step of an episode, so a trunk whose prompt starts with it
encodes each distinct instruction once per batch and reuses its key/value cache for every sample
that shares it; outside of autograd it is also memoised across calls until the language model's
weights change.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Prefix:
    """Encoded instruction prefixes: per-layer (keys, values) and a pooled context vector."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    context: torch.Tensor

    def select(self, index: int | torch.Tensor) -> Prefix:
        """Rows ``index`` of every tensor."""
        return Prefix([(k[index], v[index]) for k, v in self.kv], self.context[index])

    @staticmethod
    def stack(rows: list[Prefix]) -> Prefix:
        """Stack single-row prefixes (as returned by ``select(int)``) into a batch."""
        kv = [
            (torch.stack([r.kv[i][0] for r in rows]), torch.stack([r.kv[i][1] for r in rows]))
            for i in range(len(rows[0].kv))
        ]
        return Prefix(kv, torch.stack([r.context for r in rows]))


class CachedPrefixTrunk(nn.Module):
    """Base of the trunks: ``prefix(ids, mask)`` encodes each distinct instruction once.

    Subclasses implement ``_encode_prefix(ids, mask) -> Prefix`` for a batch of distinct rows
    and ``_prefix_params()``, the parameters the encoding depends on.
    """

    # memoised prefixes beyond this many are dropped (bounds memory)
    MAX_CACHED = 4096

    def __init__(self) -> None:
        super().__init__()
        self._prefix_cache: dict[bytes, Prefix] = {}
        self._cache_key: tuple[int, ...] | None = None
        # set inside ``shared_prefixes()``: encodings made under autograd in one training pass
        self._pass_prefixes: dict[bytes, Prefix] | None = None
        # set while LoRA adapters are disabled (``vla_ray.models.lora.adapters_disabled``)
        self.adapters_off = False

    def _encode_prefix(self, ids: torch.Tensor, mask: torch.Tensor) -> Prefix:
        raise NotImplementedError  # pragma: no cover - every trunk overrides

    def _prefix_params(self) -> list[nn.Parameter]:
        raise NotImplementedError  # pragma: no cover - every trunk overrides

    def _lm_version(self) -> tuple[int, ...]:
        """Changes whenever any parameter the prefix depends on is modified or moved, or the
        LoRA adapters are switched off or on."""
        params = self._prefix_params()
        return (
            sum(p._version for p in params),
            params[0].data_ptr(),
            params[-1].data_ptr(),
            self.adapters_off,
        )

    @contextlib.contextmanager
    def shared_prefixes(self):
        """Within the block, each distinct instruction is encoded once even under autograd.

        For one training forward pass that runs this trunk several times (e.g. SAC's policy on
        the observations and on the next observations): the encodings join the same graph, so
        gradients from every use add up. Leave the block before the weights change.
        """
        outer = self._pass_prefixes
        self._pass_prefixes = {} if outer is None else outer
        try:
            yield
        finally:
            self._pass_prefixes = outer

    def prefix(self, ids: torch.Tensor, mask: torch.Tensor) -> Prefix:
        """Per-sample prefix key/values and context, computing each distinct instruction once."""
        ids = ids.long() * mask.long()
        rows = torch.cat([ids, mask.long()], dim=1)
        uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
        L = ids.shape[1]
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self._prefix_params())
        if needs_grad:
            key = uniq.cpu().numpy().tobytes() if self._pass_prefixes is not None else None
            encoded = self._pass_prefixes.get(key) if key is not None else None
            if encoded is None:
                encoded = self._encode_prefix(uniq[:, :L], uniq[:, L:])
                if key is not None:
                    self._pass_prefixes[key] = encoded
        else:  # no gradient reaches the prefix (inference, or a frozen LM): memoise
            key = self._lm_version()
            if key != self._cache_key:
                self._prefix_cache.clear()
                self._cache_key = key
            row_keys = [r.cpu().numpy().tobytes() for r in uniq]
            missing = [i for i, k in enumerate(row_keys) if k not in self._prefix_cache]
            if missing:
                if len(self._prefix_cache) + len(missing) > self.MAX_CACHED:
                    self._prefix_cache.clear()
                    missing = list(range(len(row_keys)))
                sel = uniq[missing]
                new = self._encode_prefix(sel[:, :L], sel[:, L:])
                for j, i in enumerate(missing):
                    self._prefix_cache[row_keys[i]] = new.select(j)
            encoded = Prefix.stack([self._prefix_cache[k] for k in row_keys])
        return encoded.select(inverse)
