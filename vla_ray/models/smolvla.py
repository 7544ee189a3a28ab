"""SmolVLA checkpoints in the layout LeRobot publishes on the Hugging Face Hub.

A checkpoint directory such as ``lerobot/smolvla_base`` holds::

    config.json            "type": "smolvla", vlm_model_name, chunk_size, n_action_steps,
                           max_state_dim, max_action_dim, num_steps, num_vlm_layers,
                           num_expert_layers, expert_width_multiplier, self_attn_every_n_layers,
                           attention_mode, prefix_length, pad_language_to, tokenizer_max_length,
                           resize_imgs_with_padding, add_image_special_tokens, empty_cameras,
                           min_period, max_period, input_features, output_features,
                           normalization_mapping, ... (training-only keys are ignored)
    model.safetensors      model.vlm_with_expert.vlm.*        SmolVLMForConditionalGeneration,
                                                              text layers cut to num_vlm_layers
                           model.vlm_with_expert.lm_expert.*  the action expert (a Llama
                                                              decoder without embed_tokens)
                           model.state_proj, model.action_in_proj, model.action_out_proj,
                           model.action_time_mlp_in, model.action_time_mlp_out
    policy_preprocessor.json + policy_preprocessor_step_N_normalizer_processor.safetensors
    policy_postprocessor.json + policy_postprocessor_step_N_unnormalizer_processor.safetensors
                           normalisation statistics, flat keys "<feature>.<stat>"
                           (LeRobot >= 0.4). Older checkpoints keep them as buffers in
                           model.safetensors (``normalize_inputs.buffer_observation_state.mean``,
                           ``unnormalize_outputs.buffer_action.mean``...); both are read.

The VLM's own config and tokenizer are not in the checkpoint: like LeRobot, they come from
``vlm_model_name`` (a Hub id in the local Hugging Face cache, or a local directory), or from the
``vlm_path`` argument of :meth:`SmolVLA.from_pretrained`.

What follows LeRobot's SmolVLA (``policies/smolvla``) exactly:

* parameter names and shapes (the expert is a deep copy of the VLM's text config with
  ``hidden_size * expert_width_multiplier``, LeRobot's intermediate size rule and the VLM's
  head_dim / head counts; in cross-attention layers its k/v projections map from the VLM's
  key/value width);
* the prefix: per camera the vision tower + connector output scaled by sqrt(width) (optionally
  wrapped in ``<fake_token_around_image><global-img>`` ... ``<fake_token_around_image>``), the
  instruction (a newline appended, tokenised right-padded to ``tokenizer_max_length``) scaled by
  sqrt(width), then one state token ``state_proj(normalised, zero-padded state)``; images and
  language attend to each other bidirectionally, the state token attends to them and itself;
* the suffix: ``action_time_mlp_out(silu(action_time_mlp_in([action_in_proj(x_t),
  sincos(t)])))`` with LeRobot's sine-cosine embedding (min_period, max_period); action tokens
  attend to the prefix and causally to each other;
* the layers: every ``self_attn_every_n_layers``-th layer the expert attends jointly over the
  VLM's prefix keys/values and its own; the other layers (``attention_mode="cross_attn"``) the
  expert cross-attends to that layer's VLM keys/values (after RoPE) through its own k/v
  projections, with query positions starting at 0; LeRobot's RoPE (base 10000, half split),
  eager float32 attention with grouped key/value heads, positions = cumsum(valid) - 1;
* images: float in [0, 1], resized with aspect ratio kept and zero padding on the left/top to
  ``resize_imgs_with_padding`` (width, height), mapped to [-1, 1]; empty cameras are -1 images
  whose tokens are masked out;
* flow matching: ``x_t = t * noise + (1 - t) * actions``, target ``noise - actions``,
  ``t ~ Beta(1.5, 1) * 0.999 + 0.001``, MSE over the real action dimensions (padded steps
  masked by ``action_is_pad``); sampling: ``num_steps`` Euler steps from t = 1 to 0 with
  ``dt = -1 / num_steps``, the prefix keys/values computed once;
* normalisation: LeRobot's MEAN_STD / MIN_MAX / QUANTILES / QUANTILE10 / IDENTITY formulas
  (eps 1e-8 unless the processor file says otherwise).

What is simplified or different:

* training runs the prefix pass and then the expert pass instead of one joint pass; since the
  prefix never attends to the suffix this computes the same function (up to float summation
  order);
* one observation per :meth:`SmolVLA.sample_actions` call, no action queue (``n_action_steps``
  is only read), no real-time chunking, no ``adapt_to_pi_aloha`` gripper conversions, no
  ``torch.compile``;
* all named cameras must be given (LeRobot allows missing ones up to ``empty_cameras``);
* flow-matching times are drawn by inverting Beta(1.5, 1)'s CDF (``u ** (1 / 1.5)``): the same
  distribution as LeRobot's ``torch.distributions.Beta``, another random stream;
* the VLM's image processor is not used, as in LeRobot (images go straight to the vision tower
  at ``resize_imgs_with_padding``).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vla_ray.config import ConfigError

SUPPORTED_TYPES = ("smolvla",)
SUPPORTED_VLM_TYPES = ("smolvlm",)
WEIGHTS_NAME = "model.safetensors"
PREPROCESSOR_NAME = "policy_preprocessor.json"
POSTPROCESSOR_NAME = "policy_postprocessor.json"
NORMALIZER_STEPS = ("normalizer_processor", "unnormalizer_processor")
# prefixes of the normalisation buffers older LeRobot versions kept inside model.safetensors
LEGACY_BUFFER_PREFIXES = (
    "normalize_inputs.buffer_",
    "normalize_targets.buffer_",
    "unnormalize_outputs.buffer_",
)
NORM_MODES: dict[str, tuple[str, ...]] = {
    "IDENTITY": (),
    "MEAN_STD": ("mean", "std"),
    "MIN_MAX": ("min", "max"),
    "QUANTILES": ("q01", "q99"),
    "QUANTILE10": ("q10", "q90"),
}
STATE_KEY = "observation.state"
ACTION_KEY = "action"
EMPTY_CAMERA = "observation.images.empty_camera_{}"
ROPE_BASE = 10_000.0


class SmolVLAError(ConfigError):
    """A SmolVLA checkpoint or input is not what the model expects; the message says which field."""


# ---- config --------------------------------------------------------------------------------
class LeRobotFeatures:
    """What a LeRobot policy config (SmolVLA's, pi0's) derives from and checks in its
    ``input_features``/``output_features``/``normalization_mapping``, ``chunk_size``/
    ``n_action_steps``, ``empty_cameras`` and ``max_state_dim``/``max_action_dim`` fields."""

    def check_features(self, error: type[ConfigError]) -> None:
        """``error`` naming the first inconsistent field of the shared ones."""
        if self.n_action_steps > self.chunk_size:
            raise error(
                f"n_action_steps: expected <= chunk_size ({self.chunk_size}), "
                f"given {self.n_action_steps}"
            )
        for ftype, mode in self.normalization_mapping.items():
            if mode not in NORM_MODES:
                raise error(
                    f"normalization_mapping[{ftype!r}]: unknown mode {mode!r}; valid modes are "
                    f"{', '.join(NORM_MODES)}"
                )
        if ACTION_KEY not in self.output_features:
            raise error(
                f"output_features: expected an {ACTION_KEY!r} feature, given "
                f"{sorted(self.output_features)}"
            )
        if not self.image_keys:
            raise error(
                f"input_features: expected at least one VISUAL feature, given "
                f"{sorted(self.input_features)}"
            )
        if self.state_dim > self.max_state_dim:
            raise error(
                f"input_features[{STATE_KEY!r}]: expected at most max_state_dim "
                f"({self.max_state_dim}) values, given {self.state_dim}"
            )
        if self.action_dim > self.max_action_dim:
            raise error(
                f"output_features[{ACTION_KEY!r}]: expected at most max_action_dim "
                f"({self.max_action_dim}) values, given {self.action_dim}"
            )

    @property
    def image_keys(self) -> list[str]:
        """The cameras the caller gives, in config order (empty cameras excluded)."""
        empty = {EMPTY_CAMERA.format(i) for i in range(self.empty_cameras)}
        return [
            k
            for k, f in self.input_features.items()
            if f.get("type") == "VISUAL" and k not in empty
        ]

    @property
    def state_dim(self) -> int:
        feat = self.input_features.get(STATE_KEY)
        return int(feat["shape"][0]) if feat else 0

    @property
    def action_dim(self) -> int:
        return int(self.output_features[ACTION_KEY]["shape"][0])


@dataclass
class SmolVLAConfig(LeRobotFeatures):
    """The fields of LeRobot's ``SmolVLAConfig`` this model reads (defaults are LeRobot's)."""

    vlm_model_name: str = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
    chunk_size: int = 50
    n_action_steps: int = 50
    max_state_dim: int = 32
    max_action_dim: int = 32
    resize_imgs_with_padding: tuple[int, int] | None = (512, 512)
    empty_cameras: int = 0
    tokenizer_max_length: int = 48
    num_steps: int = 10
    freeze_vision_encoder: bool = True
    train_expert_only: bool = True
    train_state_proj: bool = True
    add_image_special_tokens: bool = False
    attention_mode: str = "cross_attn"
    prefix_length: int = -1
    pad_language_to: str = "longest"
    num_expert_layers: int = -1
    num_vlm_layers: int = 16
    self_attn_every_n_layers: int = 2
    expert_width_multiplier: float = 0.75
    min_period: float = 4e-3
    max_period: float = 4.0
    input_features: dict[str, dict[str, Any]] = field(default_factory=dict)
    output_features: dict[str, dict[str, Any]] = field(default_factory=dict)
    normalization_mapping: dict[str, str] = field(
        default_factory=lambda: {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SmolVLAConfig:
        """From a ``config.json`` dict; SmolVLAError unless its "type" is "smolvla"."""
        kind = data.get("type")
        if kind not in SUPPORTED_TYPES:
            raise SmolVLAError(
                f"config.json: type {kind!r} is not a SmolVLA policy; supported types: "
                f"{', '.join(SUPPORTED_TYPES)}"
            )
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        if cfg.resize_imgs_with_padding is not None:
            cfg.resize_imgs_with_padding = tuple(cfg.resize_imgs_with_padding)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """SmolVLAError naming the first inconsistent field."""
        if self.pad_language_to not in ("longest", "max_length"):
            raise SmolVLAError(
                f"pad_language_to: expected 'longest' or 'max_length', given "
                f"{self.pad_language_to!r}"
            )
        self.check_features(SmolVLAError)


# ---- normalisation -------------------------------------------------------------------------
@dataclass
class Normalizer:
    """LeRobot's (un)normalisation of features by type, from flat ``<feature>.<stat>`` stats."""

    stats: dict[str, dict[str, torch.Tensor]]
    modes: dict[str, str]  # feature key -> mode
    eps: float = 1e-8

    def __call__(self, x: torch.Tensor, key: str, inverse: bool = False) -> torch.Tensor:
        mode = self.modes.get(key, "IDENTITY")
        if mode == "IDENTITY":
            return x
        lo_name, hi_name = NORM_MODES[mode]
        s = {k: v.to(device=x.device, dtype=x.dtype) for k, v in self.stats[key].items()}
        lo, hi = s[lo_name], s[hi_name]
        if mode == "MEAN_STD":
            return x * hi + lo if inverse else (x - lo) / (hi + self.eps)
        denom = hi - lo
        denom = torch.where(denom == 0, torch.full_like(denom, self.eps), denom)
        return (x + 1) / 2 * denom + lo if inverse else 2 * (x - lo) / denom - 1


def _feature_modes(cfg: SmolVLAConfig) -> dict[str, str]:
    feats = {**cfg.input_features, **cfg.output_features}
    return {k: cfg.normalization_mapping.get(f.get("type"), "IDENTITY") for k, f in feats.items()}


def _processor_stats(directory: Path) -> tuple[dict[str, torch.Tensor], float, list[str]]:
    """Flat stats from the (un)normaliser steps of the processor pipelines, eps, files read."""
    from safetensors.torch import load_file

    flat: dict[str, torch.Tensor] = {}
    eps, read = 1e-8, []
    for name in (PREPROCESSOR_NAME, POSTPROCESSOR_NAME):
        path = directory / name
        if not path.is_file():
            continue
        for step in json.loads(path.read_text()).get("steps", []):
            if step.get("registry_name") not in NORMALIZER_STEPS or not step.get("state_file"):
                continue
            state_path = directory / step["state_file"]
            if not state_path.is_file():
                raise SmolVLAError(
                    f"{name}: step {step['registry_name']!r} names state_file "
                    f"{step['state_file']!r}, which is not in {directory}"
                )
            flat.update(load_file(str(state_path)))
            eps = float(step.get("config", {}).get("eps", eps))
            read.append(step["state_file"])
    return flat, eps, read


def _legacy_stats(
    weights: Mapping[str, torch.Tensor], features: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Flat stats from the normalisation buffers older LeRobot versions saved with the model."""
    by_buffer = {f.replace(".", "_"): f for f in features}
    flat: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        for prefix in LEGACY_BUFFER_PREFIXES:
            if name.startswith(prefix):
                buffer, _, stat = name[len(prefix) :].rpartition(".")
                flat[f"{by_buffer.get(buffer, buffer)}.{stat}"] = tensor
    return flat


def _stat_groups(flat: Mapping[str, torch.Tensor], feature: str) -> list[str]:
    """Dataset groups of stats keyed ``<group>[.buffer].<feature>.<stat>`` (multi-dataset
    checkpoints such as smolvla_base key their stats by training dataset)."""
    groups = set()
    for key in flat:
        head, _, _ = key.rpartition(".")
        if head.endswith("." + feature):
            groups.add(head[: -len(feature) - 1].removesuffix(".buffer"))
    return sorted(groups)


def select_stats(
    flat: Mapping[str, torch.Tensor],
    cfg: SmolVLAConfig,
    unnorm_key: str | None,
    source: str,
) -> dict[str, dict[str, torch.Tensor]]:
    """The stats each normalised feature needs, by feature; SmolVLAError listing what is present
    when one is missing (and the dataset groups when the stats are grouped)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, mode in _feature_modes(cfg).items():
        for stat in NORM_MODES[mode]:
            if unnorm_key is None:
                candidates = [f"{key}.{stat}"]
            else:
                candidates = [f"{unnorm_key}.buffer.{key}.{stat}", f"{unnorm_key}.{key}.{stat}"]
            hit = next((c for c in candidates if c in flat), None)
            if hit is None:
                groups = _stat_groups(flat, key)
                hint = (
                    f"; the stats are grouped by dataset, pass unnorm_key= one of {groups}"
                    if groups and unnorm_key is None
                    else ""
                )
                raise SmolVLAError(
                    f"normalisation stats: feature {key!r} ({mode}) needs {stat!r}, looked for "
                    f"{candidates} in {source}; present: {sorted(flat)}{hint}"
                )
            out.setdefault(key, {})[stat] = flat[hit].float()
    return out


# ---- the VLM + action expert ---------------------------------------------------------------
def expert_intermediate_size(hidden: int, ffn_multiplier: int = 4, multiple_of: int = 256) -> int:
    """LeRobot's MLP width for the action expert."""
    hidden = int(2 * hidden / 3)
    hidden = int(ffn_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = ROPE_BASE) -> torch.Tensor:
    """Rotary embedding of x (B, L, H, D) at integer positions (B, L), half-split convention."""
    half = x.shape[-1] // 2
    dtype = x.dtype
    x = x.float()
    inv = base ** (-(2.0 / x.shape[-1]) * torch.arange(half, device=x.device, dtype=torch.float32))
    ang = positions[..., None].float() * inv  # (B, L, half)
    sin, cos = torch.sin(ang)[:, :, None], torch.cos(ang)[:, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)


def sincos_time_embedding(
    t: torch.Tensor, dim: int, min_period: float, max_period: float
) -> torch.Tensor:
    """LeRobot's sine-cosine embedding of flow-matching times t (B,) -> (B, dim), float64."""
    frac = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** frac
    arg = t.double()[:, None] * (2 * math.pi / period)
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


def attention_2d_mask(pad: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """big_vision's block mask: i attends j if j is valid and j's block index <= i's (B, L, L)."""
    cum = torch.cumsum(blocks.long(), dim=1)
    allowed = cum[:, None, :] <= cum[:, :, None]
    return allowed & (pad[:, None, :] & pad[:, :, None])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eager float32 attention: q (B, Lq, H, D), k/v (B, Lk, Hkv, D), mask (B, Lq, Lk) ->
    (B, Lq, H * D) in v's dtype."""
    B, Lq, H, D = q.shape
    groups = H // k.shape[2]
    k = k.repeat_interleave(groups, dim=2).float().transpose(1, 2)
    v = v.repeat_interleave(groups, dim=2).transpose(1, 2)
    w = torch.matmul(q.float().transpose(1, 2), k.transpose(2, 3)) * D**-0.5
    w = torch.where(mask[:, None], w, torch.finfo(w.dtype).min)
    p = torch.softmax(w, dim=-1).to(v.dtype)
    return torch.matmul(p, v).transpose(1, 2).reshape(B, Lq, H * D)


class SmolVLMWithExpert(nn.Module):
    """The VLM (``vlm``) and the action expert (``lm_expert``) with LeRobot's names and shapes."""

    def __init__(self, cfg: SmolVLAConfig, vlm_config: Any):
        super().__init__()
        from transformers import AutoModel, SmolVLMForConditionalGeneration

        vlm_config = copy.deepcopy(vlm_config)
        text = vlm_config.text_config
        if cfg.num_vlm_layers > 0:
            if cfg.num_vlm_layers > text.num_hidden_layers:
                raise SmolVLAError(
                    f"num_vlm_layers: expected <= the VLM's {text.num_hidden_layers} text "
                    f"layers, given {cfg.num_vlm_layers}"
                )
            text.num_hidden_layers = cfg.num_vlm_layers  # LeRobot keeps the first layers
        self.vlm = SmolVLMForConditionalGeneration(vlm_config)
        self.num_vlm_layers = text.num_hidden_layers
        expert = copy.deepcopy(text)
        expert.hidden_size = int(text.hidden_size * cfg.expert_width_multiplier)
        expert.intermediate_size = expert_intermediate_size(expert.hidden_size)
        expert.num_hidden_layers = self.num_vlm_layers
        if cfg.num_expert_layers > 0:
            if self.num_vlm_layers % cfg.num_expert_layers:
                raise SmolVLAError(
                    f"num_expert_layers: expected a divisor of num_vlm_layers "
                    f"({self.num_vlm_layers}), given {cfg.num_expert_layers}"
                )
            expert.num_hidden_layers = cfg.num_expert_layers
        self.lm_expert = AutoModel.from_config(expert)
        self.head_dim = text.head_dim
        self.num_heads = text.num_attention_heads
        self.num_kv_heads = text.num_key_value_heads
        self.cross = "cross" in cfg.attention_mode
        self.every_n = cfg.self_attn_every_n_layers
        kv_width = self.num_kv_heads * self.head_dim
        if self.cross:
            for i, layer in enumerate(self.lm_expert.layers):
                if self.every_n > 0 and i % self.every_n == 0:
                    continue
                out = expert.num_key_value_heads * expert.head_dim
                bias = expert.attention_bias
                layer.self_attn.k_proj = nn.Linear(kv_width, out, bias=bias)
                layer.self_attn.v_proj = nn.Linear(kv_width, out, bias=bias)
        self.lm_expert.embed_tokens = None
        self.expert_hidden_size = expert.hidden_size
        n_exp = len(self.lm_expert.layers)
        step = self.num_vlm_layers // n_exp
        # VLM layer i runs expert layer i // step when i % step == 0 (LeRobot's mapping)
        self.expert_of = [i // step if i % step == 0 else None for i in range(self.num_vlm_layers)]

    @property
    def text_model(self) -> nn.Module:
        return self.vlm.model.text_model

    def is_self_attention(self, layer_idx: int) -> bool:
        return not self.cross or (self.every_n > 0 and layer_idx % self.every_n == 0)

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> connector tokens (B, n, text width)."""
        vision = self.vlm.model.vision_model
        hidden = vision(pixel_values=pixels.to(vision.dtype)).last_hidden_state
        return self.vlm.model.connector(hidden)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_model.get_input_embeddings()(ids)

    def prefix_kv(
        self,
        embs: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        with_hidden: bool = False,
    ) -> Any:
        """The VLM over the prefix: each layer's keys (after RoPE) and values (B, P, Hkv, D);
        with ``with_hidden``, also the last layer's normed input (B, P, width), the states its
        keys and values are made from."""
        h, out = embs, []
        layers = self.text_model.layers
        for i, layer in enumerate(layers):
            x = layer.input_layernorm(h)
            shape = (*x.shape[:-1], -1, self.head_dim)
            attn = layer.self_attn
            q = apply_rope(attn.q_proj(x).view(shape), positions)
            k = apply_rope(attn.k_proj(x).view(shape), positions)
            v = attn.v_proj(x).view(shape)
            out.append((k, v))
            if i == len(layers) - 1:
                break  # the last layer's output feeds nothing the expert reads
            h = h + attn.o_proj(_attend(q, k, v, mask).to(h.dtype))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return (out, x) if with_hidden else out

    def expert(
        self,
        embs: torch.Tensor,
        kv: list[tuple[torch.Tensor, torch.Tensor]],
        prefix_pad: torch.Tensor,
        suffix_mask: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """The expert over the suffix tokens (B, S, E) given the prefix keys/values; returns the
        expert's final-normed hidden states. ``suffix_mask`` (B, S, S), ``positions`` (B, S)
        absolute (the prefix's valid length + suffix index)."""
        h = embs
        S = embs.shape[1]
        cross_mask = prefix_pad[:, None, :].expand(-1, S, -1)
        joint_mask = torch.cat([cross_mask, suffix_mask], dim=2)
        for i, e in enumerate(self.expert_of):
            if e is None:
                continue
            layer = self.lm_expert.layers[e]
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            shape = (*x.shape[:-1], -1, self.head_dim)
            q = attn.q_proj(x).view(shape)
            pk, pv = kv[i]
            if self.is_self_attention(i):
                q = apply_rope(q, positions)
                k = apply_rope(attn.k_proj(x).view(shape), positions)
                v = attn.v_proj(x).view(shape)
                o = _attend(q, torch.cat([pk, k], 1), torch.cat([pv, v], 1), joint_mask)
            else:
                q = apply_rope(q, positions - positions.min(dim=1, keepdim=True).values)
                flat = (*pk.shape[:2], -1)
                k = attn.k_proj(pk.reshape(flat).to(x.dtype)).view(*pk.shape[:2], -1, self.head_dim)
                v = attn.v_proj(pv.reshape(flat).to(x.dtype)).view(*pv.shape[:2], -1, self.head_dim)
                o = _attend(q, k, v, cross_mask)
            h = h + attn.o_proj(o.to(h.dtype))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_expert.norm(h)


class FlowMatching(nn.Module):
    """LeRobot's ``VLAFlowMatching`` parameters: the VLM + expert and the projections."""

    def __init__(self, cfg: SmolVLAConfig, vlm_config: Any):
        super().__init__()
        self.vlm_with_expert = SmolVLMWithExpert(cfg, vlm_config)
        width = vlm_config.text_config.hidden_size
        e = self.vlm_with_expert.expert_hidden_size
        self.state_proj = nn.Linear(cfg.max_state_dim, width)
        self.action_in_proj = nn.Linear(cfg.max_action_dim, e)
        self.action_out_proj = nn.Linear(e, cfg.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * e, e)
        self.action_time_mlp_out = nn.Linear(e, e)


@dataclass
class Prefix:
    """The prefix's per-layer keys/values and its valid-token mask (B, P)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    pad: torch.Tensor


# ---- the policy ----------------------------------------------------------------------------
class SmolVLA(nn.Module):
    """SmolVLA: SmolVLM prefix (cameras, instruction, state) + flow-matching action expert.

    Parameters live under ``model`` with LeRobot's names (``model.vlm_with_expert.vlm.*``...), so
    ``state_dict()`` has the published tensor names. See the module docstring for what follows
    LeRobot exactly and what is simplified.
    """

    def __init__(
        self,
        config: SmolVLAConfig,
        vlm_config: Any,
        tokenizer: Any,
        normalizer: Normalizer | None = None,
    ):
        super().__init__()
        if getattr(vlm_config, "model_type", None) not in SUPPORTED_VLM_TYPES:
            raise SmolVLAError(
                f"vlm_model_name: the VLM config has model_type "
                f"{getattr(vlm_config, 'model_type', None)!r}; supported: "
                f"{', '.join(SUPPORTED_VLM_TYPES)}"
            )
        self.config = config
        self.tokenizer = tokenizer
        self.normalizer = normalizer or Normalizer({}, {})
        self.model = FlowMatching(config, vlm_config)
        self._special = [
            tokenizer.convert_tokens_to_ids(t)
            for t in ("<fake_token_around_image>", "<global-img>")
        ]
        self.set_requires_grad()

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        vlm_path: str | os.PathLike | None = None,
        unnorm_key: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> SmolVLA:
        """Load a checkpoint directory in LeRobot's published layout (see the module docstring).

        ``vlm_path``: where the VLM's config.json and tokenizer are (default: the checkpoint's
        ``vlm_model_name``). ``unnorm_key``: the dataset whose statistics to use when the
        checkpoint's stats are grouped by dataset. Tensors are matched strictly by name and
        shape; any missing, unexpected or mis-shaped name raises, listing them.
        """
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoTokenizer

        directory = Path(directory)
        cfg_path = directory / "config.json"
        if not cfg_path.is_file():
            raise SmolVLAError(f"config.json: not found in {directory}")
        cfg = SmolVLAConfig.from_dict(json.loads(cfg_path.read_text()))
        weights_path = directory / WEIGHTS_NAME
        if not weights_path.is_file():
            raise SmolVLAError(
                f"{WEIGHTS_NAME}: not found in {directory}; present: "
                f"{sorted(p.name for p in directory.iterdir())}"
            )
        source = str(vlm_path) if vlm_path is not None else cfg.vlm_model_name
        try:
            vlm_config = AutoConfig.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise SmolVLAError(
                f"vlm_model_name: cannot load the VLM config/tokenizer from {source!r} (a local "
                f"directory, or a Hub id on a connected machine or in the HF cache); pass "
                f"vlm_path=DIR: {err}"
            ) from err
        weights = load_file(str(weights_path))
        legacy = _legacy_stats(weights, list({**cfg.input_features, **cfg.output_features}))
        weights = {k: v for k, v in weights.items() if not k.startswith(LEGACY_BUFFER_PREFIXES)}
        flat, eps, read = _processor_stats(directory)
        if not read:
            flat, read = legacy, ([f"{WEIGHTS_NAME} (legacy buffers)"] if legacy else [])
        modes = _feature_modes(cfg)
        if not read and any(NORM_MODES[m] for m in modes.values()):
            raise SmolVLAError(
                f"normalisation stats: none in {directory} (expected {PREPROCESSOR_NAME} / "
                f"{POSTPROCESSOR_NAME} with their normalizer safetensors, or normalize_*.buffer_* "
                f"tensors in {WEIGHTS_NAME}); present: {sorted(p.name for p in directory.iterdir())}"
            )
        stats = select_stats(flat, cfg, unnorm_key, ", ".join(read) or "(none)")
        policy = cls(cfg, vlm_config, tokenizer, Normalizer(stats, modes, eps))
        policy.load_weights(weights)
        if dtype is not None:
            policy.to(dtype)
        policy.eval()
        return policy

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Strict load by name and shape; SmolVLAError listing every missing, unexpected and
        mis-shaped tensor. Weights tied to another present tensor may be absent."""
        own = self.state_dict()
        ties = _tied_names(self)
        missing = [k for k in own if k not in weights and not (k in ties and ties[k] in weights)]
        unexpected = [k for k in weights if k not in own]
        shapes = [
            f"{k}: expected {tuple(own[k].shape)}, given {tuple(v.shape)}"
            for k, v in weights.items()
            if k in own and tuple(own[k].shape) != tuple(v.shape)
        ]
        if missing or unexpected or shapes:
            raise SmolVLAError(
                f"{WEIGHTS_NAME}: does not match the SmolVLA built from config.json; "
                f"missing {missing}; unexpected {unexpected}; mis-shaped {shapes}"
            )
        self.load_state_dict(dict(weights), strict=False)

    def set_requires_grad(self) -> None:
        """LeRobot's trainable set: the expert and projections; the VLM when not
        ``train_expert_only`` (vision tower per ``freeze_vision_encoder``)."""
        cfg, vwe = self.config, self.model.vlm_with_expert
        for p in self.parameters():
            p.requires_grad_(True)
        if cfg.train_expert_only:
            vwe.vlm.requires_grad_(False)
        else:
            # LeRobot freezes what gets no gradient in its joint pass
            vwe.vlm.lm_head.requires_grad_(False)
            vwe.text_model.norm.requires_grad_(False)
            vwe.text_model.layers[-1].requires_grad_(False)
        if cfg.freeze_vision_encoder:
            vwe.vlm.model.vision_model.requires_grad_(False)
        self.model.state_proj.requires_grad_(cfg.train_state_proj)

    # -- inputs -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.state_proj.weight.device

    def _images(self, images: Any, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """uint8 images -> per camera (B, 3, H', W') in [-1, 1] and a (B,) validity mask.

        ``images``: a dict camera key -> (B, H, W, 3), or a sequence / array over cameras of
        (B, H, W, 3) arrays (in ``input_features`` order)."""
        cfg = self.config
        keys = cfg.image_keys
        if isinstance(images, Mapping):
            absent = [k for k in keys if k not in images]
            if absent:
                raise SmolVLAError(f"images: expected cameras {keys}, missing {absent}")
            arrays = [images[k] for k in keys]
        else:
            arrays = list(images)
            if len(arrays) != len(keys):
                raise SmolVLAError(
                    f"images: expected {len(keys)} cameras {keys}, given {len(arrays)}"
                )
        out, masks = [], []
        for key, arr in zip(keys, arrays, strict=True):
            t = torch.as_tensor(np.asarray(arr), device=self.device)
            shape = cfg.input_features[key].get("shape")
            hw = tuple(shape[1:]) if shape else tuple(t.shape[-3:-1])
            expected = (batch, *hw, 3)
            if t.dtype != torch.uint8 or tuple(t.shape) != expected:
                raise SmolVLAError(
                    f"images[{key!r}]: expected uint8 of shape {expected}, given "
                    f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"
                )
            img = t.permute(0, 3, 1, 2).float() / 255.0
            img = self.normalizer(img, key)
            if cfg.resize_imgs_with_padding is not None:
                width, height = cfg.resize_imgs_with_padding
                img = resize_with_pad(img, height, width)
            out.append(img * 2.0 - 1.0)
            masks.append(torch.ones(batch, dtype=torch.bool, device=self.device))
        for _ in range(cfg.empty_cameras):
            out.append(-torch.ones_like(out[-1]))
            masks.append(torch.zeros(batch, dtype=torch.bool, device=self.device))
        return out, masks

    def _language(self, instructions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        texts = [s if s.endswith("\n") else s + "\n" for s in instructions]
        enc = self.tokenizer(
            texts,
            max_length=cfg.tokenizer_max_length,
            truncation=True,
            padding=cfg.pad_language_to,
            padding_side="right",
            return_tensors="pt",
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device).bool()

    def _state(self, state: Any, batch: int) -> torch.Tensor:
        """Raw state (B, state_dim) -> normalised, zero-padded to max_state_dim."""
        t = torch.as_tensor(np.asarray(state, dtype=np.float32), device=self.device)
        expected = (batch, self.config.state_dim)
        if tuple(t.shape) != expected:
            raise SmolVLAError(
                f"state ({STATE_KEY}): expected shape {expected}, given {tuple(t.shape)}"
            )
        t = self.normalizer(t, STATE_KEY)
        return F.pad(t, (0, self.config.max_state_dim - t.shape[-1]))

    # -- the network ------------------------------------------------------------------------
    def embed_prefix(
        self,
        images: list[torch.Tensor],
        image_masks: list[torch.Tensor],
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        state: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefix embeddings (B, P, width), valid mask (B, P) and block starts (B, P)."""
        vwe = self.model.vlm_with_expert
        B = state.shape[0]
        embs, pads, blocks = [], [], []

        def special(ids: list[int]) -> None:
            t = torch.tensor(ids, dtype=torch.long, device=self.device)
            embs.append(vwe.embed_tokens(t)[None].expand(B, -1, -1))
            pads.append(torch.ones(B, len(ids), dtype=torch.bool, device=self.device))
            blocks.append(torch.zeros(B, len(ids), dtype=torch.bool, device=self.device))

        for img, m in zip(images, image_masks, strict=True):
            if self.config.add_image_special_tokens:
                special(self._special)
            e = vwe.embed_image(img)
            embs.append(e * torch.tensor(e.shape[-1] ** 0.5, dtype=e.dtype))
            pads.append(m[:, None].expand(B, e.shape[1]))
            blocks.append(torch.zeros(B, e.shape[1], dtype=torch.bool, device=self.device))
            if self.config.add_image_special_tokens:
                special(self._special[:1])
        lang = vwe.embed_tokens(tokens)
        embs.append(lang * math.sqrt(lang.shape[-1]))
        pads.append(token_mask)
        blocks.append(torch.zeros_like(token_mask))
        s = self.model.state_proj(state.to(self.model.state_proj.weight.dtype))[:, None]
        embs.append(s.to(lang.dtype))
        pads.append(torch.ones(B, 1, dtype=torch.bool, device=self.device))
        blocks.append(torch.ones(B, 1, dtype=torch.bool, device=self.device))
        embs, pads, blocks = (torch.cat(x, dim=1) for x in (embs, pads, blocks))
        extra = self.config.prefix_length - embs.shape[1]
        if extra > 0:
            embs = F.pad(embs, (0, 0, 0, extra))
            pads, blocks = F.pad(pads, (0, extra)), F.pad(blocks, (0, extra))
        return embs, pads, blocks

    def encode_prefix(
        self,
        images: list[torch.Tensor],
        image_masks: list[torch.Tensor],
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        state: torch.Tensor,
    ) -> Prefix:
        """The VLM's per-layer keys/values over the prefix (computed once per observation)."""
        embs, pad, blocks = self.embed_prefix(images, image_masks, tokens, token_mask, state)
        positions = torch.cumsum(pad.long(), dim=1) - 1
        kv = self.model.vlm_with_expert.prefix_kv(embs, attention_2d_mask(pad, blocks), positions)
        return Prefix(kv, pad)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, prefix: Prefix) -> torch.Tensor:
        """The expert's velocity (B, chunk, max_action_dim) at noisy actions x_t and times t (B,)."""
        m, cfg = self.model, self.config
        a = m.action_in_proj(x_t.to(m.action_in_proj.weight.dtype))
        e = m.vlm_with_expert.expert_hidden_size
        te = sincos_time_embedding(t, e, cfg.min_period, cfg.max_period).to(a.dtype)
        h = m.action_time_mlp_out(
            F.silu(m.action_time_mlp_in(torch.cat([a, te[:, None].expand_as(a)], dim=2)))
        )
        B, S = h.shape[:2]
        ones = torch.ones(B, S, dtype=torch.bool, device=h.device)
        suffix_mask = attention_2d_mask(ones, ones)  # causal over action tokens
        positions = prefix.pad.long().sum(1, keepdim=True) + torch.arange(S, device=h.device)
        out = m.vlm_with_expert.expert(h, prefix.kv, prefix.pad, suffix_mask, positions)
        out = out[:, -cfg.chunk_size :].to(m.action_out_proj.weight.dtype)
        return m.action_out_proj(out).float()

    # -- public API ---------------------------------------------------------------------------
    def prepare(
        self, images: Any, instructions: str | Sequence[str], state: Any
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw batch (images per camera (B, H, W, 3) uint8, B instructions, state (B, S)) ->
        the model's inputs (images, image masks, tokens, token mask, normalised padded state)."""
        if isinstance(instructions, str):
            instructions = [instructions]
        B = len(instructions)
        imgs, masks = self._images(images, B)
        tokens, token_mask = self._language(instructions)
        return imgs, masks, tokens, token_mask, self._state(state, B)

    @torch.no_grad()
    def sample_actions(
        self,
        images: Any,
        instruction: str,
        state: Any,
        noise: torch.Tensor | np.ndarray | None = None,
        generator: torch.Generator | None = None,
    ) -> np.ndarray:
        """One observation -> the de-normalised action chunk (chunk_size, action_dim), float32.

        ``images``: per camera one uint8 (H, W, 3) image (a dict by camera key or a sequence in
        ``input_features`` order). ``state``: (state_dim,). ``noise``: (chunk_size,
        max_action_dim) standard normal sample (default: drawn with ``generator``); the result
        is a deterministic function of it.
        """
        cfg = self.config
        if isinstance(images, Mapping):
            batched: Any = {k: np.asarray(v)[None] for k, v in images.items()}
        else:
            batched = [np.asarray(v)[None] for v in images]
        inputs = self.prepare(batched, [instruction], np.asarray(state)[None])
        shape = (1, cfg.chunk_size, cfg.max_action_dim)
        if noise is None:
            noise = torch.randn(shape, generator=generator).to(self.device)
        else:
            noise = torch.as_tensor(np.asarray(noise), dtype=torch.float32, device=self.device)
            if tuple(noise.shape) != shape[1:]:
                raise SmolVLAError(f"noise: expected shape {shape[1:]}, given {tuple(noise.shape)}")
            noise = noise[None]
        prefix = self.encode_prefix(*inputs)
        x = euler_integrate(lambda x_t, t: self.velocity(x_t, t, prefix), noise, cfg.num_steps)
        actions = self.normalizer(x[0, :, : cfg.action_dim], ACTION_KEY, inverse=True)
        return actions.float().cpu().numpy()

    def loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Flow-matching BC loss (scalar) on a batch of raw data.

        ``batch``: ``images`` (per camera (B, H, W, 3) uint8), ``instruction`` (B strings),
        ``state`` (B, state_dim), ``actions`` (B, chunk_size, action_dim) raw (normalised here);
        optional ``action_is_pad`` (B, chunk_size) bool, ``noise`` (B, chunk_size,
        max_action_dim), ``time`` (B,), ``generator``.
        """
        cfg = self.config
        instructions = batch["instruction"]
        imgs, masks, tokens, token_mask, state = self.prepare(
            batch["images"], instructions, batch["state"]
        )
        B = state.shape[0]
        actions = torch.as_tensor(np.asarray(batch["actions"], np.float32), device=self.device)
        expected = (B, cfg.chunk_size, cfg.action_dim)
        if tuple(actions.shape) != expected:
            raise SmolVLAError(
                f"actions ({ACTION_KEY}): expected shape {expected}, given {tuple(actions.shape)}"
            )
        actions = self.normalizer(actions, ACTION_KEY)
        actions = F.pad(actions, (0, cfg.max_action_dim - cfg.action_dim))
        gen = batch.get("generator")
        noise = batch.get("noise")
        if noise is None:
            noise = torch.randn(actions.shape, generator=gen).to(self.device)
        time = batch.get("time")
        if time is None:
            time = sample_time(B, gen).to(self.device)
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        target = noise - actions
        prefix = self.encode_prefix(imgs, masks, tokens, token_mask, state)
        v = self.velocity(x_t, time, prefix)
        losses = F.mse_loss(v, target, reduction="none")[:, :, : cfg.action_dim]
        pad = batch.get("action_is_pad")
        if pad is None:
            return losses.mean()
        valid = ~torch.as_tensor(np.asarray(pad), dtype=torch.bool, device=self.device)
        return (losses * valid[..., None]).sum() / (valid.sum() * cfg.action_dim).clamp_min(1)


# ---- helpers -------------------------------------------------------------------------------
def sample_time(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flow-matching times ``Beta(1.5, 1) * 0.999 + 0.001`` (B,), float32.

    Beta(a, 1) is sampled by inversion (u ** (1 / a)) so a generator makes it reproducible.
    """
    u = torch.rand(batch, generator=generator)
    return (u ** (1 / 1.5)) * 0.999 + 0.001


def euler_integrate(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    num_steps: int,
) -> torch.Tensor:
    """``num_steps`` Euler steps of dx/dt = velocity(x, t) from t = 1 (noise) to t = 0."""
    dt = -1.0 / num_steps
    x = noise
    for step in range(num_steps):
        t = torch.full((noise.shape[0],), 1.0 + step * dt, device=noise.device)
        x = x + dt * velocity(x, t)
    return x


def resize_with_pad(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, height, width): bilinear resize keeping the aspect ratio, zero
    padding on the left and top (LeRobot's SmolVLA convention)."""
    h, w = img.shape[2:]
    if (h, w) == (height, width):
        return img
    ratio = max(w / width, h / height)
    rh, rw = int(h / ratio), int(w / ratio)
    img = F.interpolate(img, size=(rh, rw), mode="bilinear", align_corners=False)
    return F.pad(img, (max(0, width - rw), 0, max(0, height - rh), 0), value=0.0)


def _tied_names(module: nn.Module) -> dict[str, str]:
    """Parameter name -> another name sharing its storage (tied embeddings)."""
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties[name] = first[id(p)]
            ties[first[id(p)]] = name
        else:
            first[id(p)] = name
    return ties
