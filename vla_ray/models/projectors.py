"""Projectors: vision tokens (B, N, Dv) -> language-model embeddings (B, M, Dl).

Every projector takes an optional ``context`` (B, Dl): the encoded instruction. The query-based
projectors (``attention``, ``perceiver``) add it to their queries, so what they pool from the
image depends on the instruction (as in InstructBLIP's instruction-aware Q-Former); set
``projector_config={"conditioned": False}`` for instruction-agnostic pooling.
"""

from __future__ import annotations

import torch
from torch import nn

from vla_ray.config import PROJECTORS, check_choice


class MLPProjector(nn.Module):
    """LLaVA-1.5 style two-layer GELU MLP applied to every token (M = N)."""

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int, **_: object):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.num_tokens = num_tokens

    def forward(self, tokens: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(tokens)


class AttentionPoolProjector(nn.Module):
    """Learned-query attention pooling: M queries cross-attend to the vision tokens."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_tokens: int,
        num_heads: int = 4,
        conditioned: bool = True,
        **_: object,
    ):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_tokens, out_dim) * 0.02)
        self.context = nn.Linear(out_dim, out_dim) if conditioned else None
        self.kv = nn.Linear(in_dim, out_dim)
        self.attn = nn.MultiheadAttention(out_dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(out_dim)
        self.mlp = nn.Sequential(
            nn.Linear(out_dim, 2 * out_dim), nn.GELU(), nn.Linear(2 * out_dim, out_dim)
        )
        self.num_tokens = num_tokens

    def forward(self, tokens: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        kv = self.kv(tokens)
        q = self.queries.expand(tokens.shape[0], -1, -1)
        if self.context is not None and context is not None:
            q = q + self.context(context)[:, None]
        x = q + self.attn(q, kv, kv, need_weights=False)[0]
        return x + self.mlp(self.norm(x))


class FoldedAttentionPool(nn.Module):
    """An ``AttentionPoolProjector``'s inference function with its linear maps composed (for
    export; same outputs up to float rounding).

    Keys and values are linear in the vision tokens, so each head's scores are its folded query
    against the raw tokens (the key bias is the same for every token and cancels in the
    softmax), and its output is the value and output maps applied once to the softmax-weighted
    mean of the raw tokens: no per-token key/value projection, a third of the matrix products.
    """

    def __init__(self, projector: AttentionPoolProjector):
        super().__init__()
        attn = projector.attn
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise ValueError("FoldedAttentionPool: needs a plain MultiheadAttention with biases")
        self.projector = projector
        self.num_tokens = projector.num_tokens
        self.heads = H = attn.num_heads
        E, dh = attn.embed_dim, attn.head_dim
        C = projector.kv.in_features
        self.token_dim = C
        with torch.no_grad():
            wq, wk, wv = attn.in_proj_weight.double().chunk(3)
            bq, _, bv = attn.in_proj_bias.double().chunk(3)
            w_kv, b_kv = projector.kv.weight.double(), projector.kv.bias.double()
            bv = wv @ b_kv + bv  # the value bias of a raw token
            wk, wv = wk @ w_kv, wv @ w_kv  # (E, C): key and value maps of a raw token
            scale = dh**-0.5
            # per head h: query x -> (wq_h x + bq_h) wk_h, a C-vector scored against the tokens
            a = torch.stack(
                [wq[h * dh : (h + 1) * dh].T @ wk[h * dh : (h + 1) * dh] for h in range(H)]
            )
            c = torch.stack(
                [bq[h * dh : (h + 1) * dh] @ wk[h * dh : (h + 1) * dh] for h in range(H)]
            )
            wo, bo = attn.out_proj.weight.double(), attn.out_proj.bias.double()
            # output: sum over heads of wo_h (wv_h pooled_h + bv_h) + bo
            wc = torch.cat(
                [wo[:, h * dh : (h + 1) * dh] @ wv[h * dh : (h + 1) * dh] for h in range(H)], 1
            )
            dtype = attn.in_proj_weight.dtype
            self.query = nn.Linear(E, H * C)
            self.query.weight.copy_((a.permute(0, 2, 1).reshape(H * C, E) * scale).to(dtype))
            self.query.bias.copy_((c.reshape(H * C) * scale).to(dtype))
            self.out = nn.Linear(H * C, E)
            self.out.weight.copy_(wc.to(dtype))
            self.out.bias.copy_((wo @ bv + bo).to(dtype))

    def forward(self, tokens: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        p = self.projector
        B, N, _ = tokens.shape
        q = p.queries.expand(B, -1, -1)
        if p.context is not None and context is not None:
            q = q + p.context(context)[:, None]
        M = q.shape[1]
        folded = self.query(q).view(B, M, self.heads, self.token_dim).transpose(1, 2)
        t = tokens.to(folded.dtype).unsqueeze(1)  # (B, 1, N, C), shared by the heads
        weights = (folded @ t.transpose(-1, -2)).softmax(-1)  # (B, H, M, N)
        pooled = (weights @ t).transpose(1, 2).reshape(B, M, self.heads * self.token_dim)
        x = q + self.out(pooled)
        return x + p.mlp(p.norm(x))


class PerceiverResampler(nn.Module):
    """Flamingo-style Perceiver resampler: latents attend to [vision tokens; latents], L layers."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_tokens: int,
        num_layers: int = 2,
        num_heads: int = 4,
        conditioned: bool = True,
        **_: object,
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_tokens, out_dim) * 0.02)
        self.context = nn.Linear(out_dim, out_dim) if conditioned else None
        self.inp = nn.Linear(in_dim, out_dim)
        self.layers = nn.ModuleList()
        for _ in range(num_layers):
            self.layers.append(
                nn.ModuleDict(
                    dict(
                        norm_x=nn.LayerNorm(out_dim),
                        norm_l=nn.LayerNorm(out_dim),
                        attn=nn.MultiheadAttention(out_dim, num_heads, batch_first=True),
                        norm_ff=nn.LayerNorm(out_dim),
                        ff=nn.Sequential(
                            nn.Linear(out_dim, 4 * out_dim),
                            nn.GELU(),
                            nn.Linear(4 * out_dim, out_dim),
                        ),
                    )
                )
            )
        self.out_norm = nn.LayerNorm(out_dim)
        self.num_tokens = num_tokens

    def forward(self, tokens: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.inp(tokens)
        lat = self.latents.expand(tokens.shape[0], -1, -1)
        if self.context is not None and context is not None:
            lat = lat + self.context(context)[:, None]
        for layer in self.layers:
            q = layer["norm_l"](lat)
            kv = torch.cat([layer["norm_x"](x), q], dim=1)
            lat = lat + layer["attn"](q, kv, kv, need_weights=False)[0]
            lat = lat + layer["ff"](layer["norm_ff"](lat))
        return self.out_norm(lat)


def build_projector(
    name: str, in_dim: int, out_dim: int, in_tokens: int, num_tokens: int, **kwargs: object
) -> nn.Module:
    """Build a projector by name (see ``PROJECTORS``); ``mlp`` keeps all ``in_tokens`` tokens."""
    check_choice("projector", name, PROJECTORS)
    cls = {
        "mlp": MLPProjector,
        "attention": AttentionPoolProjector,
        "perceiver": PerceiverResampler,
    }
    return cls[name](in_dim, out_dim, in_tokens if name == "mlp" else num_tokens, **kwargs)
