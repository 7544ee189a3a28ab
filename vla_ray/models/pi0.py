"""pi0 checkpoints in the layout LeRobot publishes on the Hugging Face Hub.

Two published layouts are read, told apart by their ``config.json`` (``"type": "pi0"`` in both):

* **LeRobot >= 0.4** (the OpenPI port: ``lerobot/pi0_base``, ``lerobot/pi0_libero``)::

    config.json            paligemma_variant ("gemma_2b"), action_expert_variant ("gemma_300m"),
                           dtype, chunk_size, n_action_steps, max_state_dim, max_action_dim,
                           num_inference_steps, time_sampling_beta_alpha/_beta/_scale/_offset,
                           min_period, max_period, image_resolution, empty_cameras,
                           tokenizer_max_length, freeze_vision_encoder, train_expert_only,
                           input_features, output_features, normalization_mapping, ...
    model.safetensors      model.paligemma_with_expert.paligemma.model.vision_tower.vision_model.*
                           model.paligemma_with_expert.paligemma.model.multi_modal_projector.linear.*
                           model.paligemma_with_expert.paligemma.model.language_model.*   (Gemma 2B)
                           model.paligemma_with_expert.paligemma.lm_head.weight (tied to the
                                                                   language model's embed_tokens)
                           model.paligemma_with_expert.gemma_expert.model.{layers,norm}.*
                                                                   (Gemma 300M, no embed_tokens)
                           model.state_proj, model.action_in_proj, model.action_out_proj,
                           model.action_time_mlp_in, model.action_time_mlp_out
    policy_preprocessor.json / policy_postprocessor.json + their normalizer safetensors
                           (flat "<feature>.<stat>" keys; the tokenizer step names
                           "google/paligemma-3b-pt-224")

* **LeRobot < 0.4** (the first port: ``lerobot/pi0``): ``config.json`` has
  ``resize_imgs_with_padding``, ``num_steps``, ``proj_width`` instead of the variant names, the
  tensors use transformers 4.48's PaliGemma names (``paligemma.language_model.model.*``,
  ``paligemma.language_model.lm_head``, ``paligemma.vision_tower.*``,
  ``paligemma.multi_modal_projector.*``), renamed here as LeRobot's own loader renames them
  (PR #1415), and the normalisation stats are buffers in model.safetensors
  (``normalize_inputs.buffer_observation_state.mean``...).

The model sizes are not in ``config.json``: LeRobot (and OpenPI) name them by variant, and the
SigLIP So400m/14 vision tower and the 257152-token vocabulary are fixed in their code.
:data:`GEMMA_VARIANTS`, :data:`SIGLIP_SO400M` and :data:`PALIGEMMA_VOCAB` hold those numbers; the
``sizes=`` argument of :meth:`Pi0.from_pretrained` overrides them (the tests load tiny
checkpoints this way). The expert's ``lm_head.weight`` (which LeRobot's GemmaForCausalLM keeps
although pi0 never uses it; 263M values in a real checkpoint) is accepted and dropped.

What follows LeRobot's pi0 (``policies/pi0/modeling_pi0.py``, OpenPI's ``PI0Pytorch``):

* the prefix: per camera the SigLIP tower + linear projector (not rescaled), then the
  instruction (a newline appended, tokenised right-padded to ``tokenizer_max_length`` with the
  PaliGemma tokenizer) embedded and scaled by sqrt(width); all prefix tokens attend to each
  other (bidirectional) over the valid ones;
* the suffix, run by the expert: one state token ``state_proj(normalised, zero-padded state)``
  and ``chunk_size`` action tokens ``action_time_mlp_out(silu(action_time_mlp_in([
  action_in_proj(x_t), sincos(t)])))``; the state token attends to the prefix and itself, the
  action tokens to the prefix, the state and each other (one block, not causal);
* the layers: every layer attends jointly over the PaliGemma prefix keys/values and the expert's
  suffix keys/values (the two Gemmas share head count, key/value heads and head size); Gemma
  RMSNorm ``(1 + w)``, GELU-tanh MLP, RoPE (base 10000) at positions ``cumsum(valid) - 1``
  running on from the prefix into the suffix, eager float32 attention;
* flow matching: ``x_t = t * noise + (1 - t) * actions``, target ``noise - actions``,
  ``t ~ Beta(alpha, beta) * scale + offset`` (1.5, 1, 0.999, 0.001), MSE over the real action
  dimensions; sampling: ``num_inference_steps`` Euler steps from t = 1 to 0 with
  ``dt = -1 / steps``, the prefix keys/values computed once;
* images: float in [0, 1], resized keeping the aspect ratio and padded with zeros to
  ``image_resolution`` (centred, OpenPI's convention; left/top for the < 0.4 layout, as that
  port did), mapped to [-1, 1]; ``empty_cameras`` are -1 images whose tokens are masked out;
* normalisation: LeRobot's formulas (shared with :mod:`vla_ray.models.smolvla`).

What is simplified or different:

* training runs the prefix pass and then the expert pass instead of one joint pass; since the
  prefix never attends to the suffix this is the same function (tested against a written-out
  joint pass);
* one observation per :meth:`Pi0.sample_actions` call, no action queue, no real-time chunking,
  no relative actions, no ``torch.compile``, no gradient checkpointing; all named cameras must be
  given; the config's ``dtype`` is not applied (pass ``dtype=`` to load in bfloat16: every
  weight then is bfloat16, LeRobot keeps the vision tower and norms in float32);
* with ``time_sampling_beta_beta == 1`` the times are drawn by inverting the Beta CDF
  (``u ** (1 / alpha)``, same distribution, another random stream, reproducible with a
  generator); ``action_is_pad`` in a batch masks padded steps (LeRobot >= 0.4's pi0 ignores it).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vla_ray.config import ConfigError
from vla_ray.models.smolvla import (
    ACTION_KEY,
    LEGACY_BUFFER_PREFIXES,
    NORM_MODES,
    POSTPROCESSOR_NAME,
    PREPROCESSOR_NAME,
    STATE_KEY,
    LeRobotFeatures,
    Normalizer,
    SmolVLAError,
    _attend,
    _feature_modes,
    _legacy_stats,
    _processor_stats,
    _tied_names,
    apply_rope,
    attention_2d_mask,
    euler_integrate,
    resize_with_pad,
    select_stats,
    sincos_time_embedding,
)

SUPPORTED_TYPES = ("pi0",)
WEIGHTS_NAME = "model.safetensors"
DEFAULT_TOKENIZER = "google/paligemma-3b-pt-224"
PALIGEMMA_VOCAB = 257_152
PREFIX = "model.paligemma_with_expert."
# tensors LeRobot saves that pi0 never reads (the expert's unused language-model head)
UNUSED_TENSORS = (PREFIX + "gemma_expert.lm_head.weight",)
# transformers 4.48 PaliGemma names (LeRobot < 0.4) -> today's, as LeRobot's PR #1415 renames them
LEGACY_RENAMES = (
    (".paligemma.language_model.lm_head.", ".paligemma.lm_head."),
    (".paligemma.language_model.model.", ".paligemma.model.language_model."),
    (".paligemma.vision_tower.", ".paligemma.model.vision_tower."),
    (".paligemma.multi_modal_projector.", ".paligemma.model.multi_modal_projector."),
)


class Pi0Error(ConfigError):
    """A pi0 checkpoint or input is not what the model expects; the message says which field."""


# ---- sizes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmaVariant:
    """A Gemma trunk's sizes (OpenPI's ``gemma.Config``)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class SiglipVariant:
    """The SigLIP vision tower's sizes."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    patch_size: int


GEMMA_VARIANTS: dict[str, GemmaVariant] = {
    "gemma_300m": GemmaVariant(1024, 18, 4096, 8, 1, 256),
    "gemma_2b": GemmaVariant(2048, 18, 16_384, 8, 1, 256),
}
SIGLIP_SO400M = SiglipVariant(1152, 27, 16, 4304, 14)


@dataclass(frozen=True)
class Pi0Sizes:
    """Everything about the network's size that ``config.json`` does not say."""

    paligemma: GemmaVariant
    expert: GemmaVariant
    vision: SiglipVariant = SIGLIP_SO400M
    vocab_size: int = PALIGEMMA_VOCAB

    @classmethod
    def from_config(cls, cfg: Pi0Config) -> Pi0Sizes:
        """The published sizes of the config's variants; Pi0Error for an unknown variant."""
        for name in ("paligemma_variant", "action_expert_variant"):
            value = getattr(cfg, name)
            if value not in GEMMA_VARIANTS:
                raise Pi0Error(
                    f"{name}: unknown variant {value!r}; valid variants are "
                    f"{', '.join(GEMMA_VARIANTS)} (or pass sizes=)"
                )
        return cls(GEMMA_VARIANTS[cfg.paligemma_variant], GEMMA_VARIANTS[cfg.action_expert_variant])

    def validate(self) -> None:
        """Pi0Error unless the two Gemmas can share attention layer by layer."""
        for name in ("depth", "num_heads", "num_kv_heads", "head_dim"):
            a, b = getattr(self.paligemma, name), getattr(self.expert, name)
            if a != b:
                raise Pi0Error(
                    f"sizes.expert.{name}: expected the PaliGemma's {a} (the layers attend "
                    f"jointly), given {b}"
                )


# ---- config --------------------------------------------------------------------------------
@dataclass
class Pi0Config(LeRobotFeatures):
    """The fields of LeRobot's ``PI0Config`` this model reads (defaults are LeRobot >= 0.4's)."""

    paligemma_variant: str = "gemma_2b"
    action_expert_variant: str = "gemma_300m"
    chunk_size: int = 50
    n_action_steps: int = 50
    max_state_dim: int = 32
    max_action_dim: int = 32
    num_inference_steps: int = 10
    time_sampling_beta_alpha: float = 1.5
    time_sampling_beta_beta: float = 1.0
    time_sampling_scale: float = 0.999
    time_sampling_offset: float = 0.001
    min_period: float = 4e-3
    max_period: float = 4.0
    image_resolution: tuple[int, int] = (224, 224)
    empty_cameras: int = 0
    tokenizer_max_length: int = 48
    freeze_vision_encoder: bool = False
    train_expert_only: bool = False
    input_features: dict[str, dict[str, Any]] = field(default_factory=dict)
    output_features: dict[str, dict[str, Any]] = field(default_factory=dict)
    normalization_mapping: dict[str, str] = field(
        default_factory=lambda: {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    )
    # LeRobot < 0.4 only: the width of the state/action projections (the expert's width)
    proj_width: int | None = None
    # "lerobot>=0.4" or "lerobot<0.4": which published layout config.json was in
    layout: str = "lerobot>=0.4"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Pi0Config:
        """From a ``config.json`` dict of either layout; Pi0Error unless "type" is "pi0"."""
        kind = data.get("type")
        if kind not in SUPPORTED_TYPES:
            raise Pi0Error(
                f"config.json: type {kind!r} is not a pi0 policy; supported types: "
                f"{', '.join(SUPPORTED_TYPES)}"
            )
        data = dict(data)
        if "paligemma_variant" not in data and (
            "resize_imgs_with_padding" in data or "proj_width" in data or "num_steps" in data
        ):
            # LeRobot < 0.4: the sizes were fixed in code (gemma_2b + gemma_300m)
            data["layout"] = "lerobot<0.4"
            if "num_steps" in data:
                data["num_inference_steps"] = data["num_steps"]
            resize = data.get("resize_imgs_with_padding")
            if resize is not None:  # (width, height) there; (height, width) here
                data["image_resolution"] = (int(resize[1]), int(resize[0]))
            data.setdefault("freeze_vision_encoder", True)
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        cfg.image_resolution = tuple(int(x) for x in cfg.image_resolution)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Pi0Error naming the first inconsistent field."""
        if self.image_resolution[0] != self.image_resolution[1]:
            raise Pi0Error(
                f"image_resolution: PaliGemma expects a square resolution, given "
                f"{list(self.image_resolution)}"
            )
        self.check_features(Pi0Error)


# ---- the network ---------------------------------------------------------------------------
def _gemma_config(v: GemmaVariant, vocab_size: int) -> Any:
    from transformers import GemmaConfig

    return GemmaConfig(
        hidden_size=v.width,
        num_hidden_layers=v.depth,
        intermediate_size=v.mlp_dim,
        num_attention_heads=v.num_heads,
        num_key_value_heads=v.num_kv_heads,
        head_dim=v.head_dim,
        vocab_size=vocab_size,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        rope_theta=10_000.0,
        pad_token_id=0,
        bos_token_id=None,  # unused here; Gemma's default 2 is outside the expert's 1-token vocab
        eos_token_id=None,
    )


class _Holder(nn.Module):
    """A named level of the published parameter tree (no computation of its own)."""


class PaliGemmaWithExpert(nn.Module):
    """PaliGemma (``paligemma``) and the Gemma action expert (``gemma_expert``), laid out with
    the tensor names LeRobot publishes (``paligemma.model.vision_tower.vision_model.*``...)."""

    def __init__(self, sizes: Pi0Sizes, image_size: int):
        super().__init__()
        from transformers import GemmaModel, SiglipVisionConfig, SiglipVisionModel

        sizes.validate()
        vis = sizes.vision
        vision_config = SiglipVisionConfig(
            hidden_size=vis.hidden_size,
            num_hidden_layers=vis.num_layers,
            num_attention_heads=vis.num_heads,
            intermediate_size=vis.intermediate_size,
            patch_size=vis.patch_size,
            image_size=image_size,
            vision_use_head=False,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        )
        self.paligemma = _Holder()
        self.paligemma.model = _Holder()
        self.paligemma.model.vision_tower = _Holder()
        self.paligemma.model.vision_tower.vision_model = SiglipVisionModel(vision_config)
        self.paligemma.model.multi_modal_projector = _Holder()
        self.paligemma.model.multi_modal_projector.linear = nn.Linear(
            vis.hidden_size, sizes.paligemma.width
        )
        self.paligemma.model.language_model = GemmaModel(
            _gemma_config(sizes.paligemma, sizes.vocab_size)
        )
        self.paligemma.lm_head = nn.Linear(sizes.paligemma.width, sizes.vocab_size, bias=False)
        self.paligemma.lm_head.weight = self.language_model.embed_tokens.weight  # tied
        self.gemma_expert = _Holder()
        # vocab 1: the expert's embed_tokens is dropped, as in LeRobot
        self.gemma_expert.model = GemmaModel(_gemma_config(sizes.expert, 1))
        self.gemma_expert.model.embed_tokens = None
        self.head_dim = sizes.paligemma.head_dim
        self.expert_width = sizes.expert.width

    @property
    def language_model(self) -> nn.Module:
        return self.paligemma.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.paligemma.model.vision_tower.vision_model

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> projected patch tokens (B, n, width)."""
        vision = self.vision_tower
        dtype = vision.embeddings.patch_embedding.weight.dtype
        hidden = vision(pixel_values=pixels.to(dtype)).last_hidden_state
        return self.paligemma.model.multi_modal_projector.linear(hidden)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings scaled by sqrt(width) (Gemma's scaled embedding; OpenPI's multiply)."""
        emb = self.language_model.embed_tokens
        out = F.embedding(ids, emb.weight)
        return out * torch.tensor(math.sqrt(out.shape[-1]), dtype=out.dtype)

    def _qkv(self, layer: nn.Module, x: torch.Tensor, positions: torch.Tensor) -> tuple:
        attn = layer.self_attn
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = apply_rope(attn.q_proj(x).view(shape), positions)
        k = apply_rope(attn.k_proj(x).view(shape), positions)
        return q, k, attn.v_proj(x).view(shape)

    def prefix_kv(
        self,
        embs: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        with_hidden: bool = False,
    ) -> Any:
        """PaliGemma's Gemma over the prefix: each layer's keys (after RoPE) and values; with
        ``with_hidden``, also the last layer's normed input (B, P, width), the states its keys
        and values are made from."""
        h, out = embs, []
        layers = self.language_model.layers
        for i, layer in enumerate(layers):
            x = layer.input_layernorm(h)
            q, k, v = self._qkv(layer, x, positions)
            out.append((k, v))
            if i == len(layers) - 1:
                break  # the last layer's output feeds nothing the expert reads
            h = h + layer.self_attn.o_proj(_attend(q, k, v, mask).to(h.dtype))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return (out, x) if with_hidden else out

    def expert(
        self,
        embs: torch.Tensor,
        kv: list[tuple[torch.Tensor, torch.Tensor]],
        joint_mask: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """The expert over the suffix (B, S, E), each layer attending over that layer's prefix
        keys/values and its own; ``joint_mask`` (B, S, P + S); returns the final-normed states."""
        h = embs
        for layer, (pk, pv) in zip(self.gemma_expert.model.layers, kv, strict=True):
            q, k, v = self._qkv(layer, layer.input_layernorm(h), positions)
            k, v = torch.cat([pk.to(k.dtype), k], 1), torch.cat([pv.to(v.dtype), v], 1)
            h = h + layer.self_attn.o_proj(_attend(q, k, v, joint_mask).to(h.dtype))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.gemma_expert.model.norm(h)


class Pi0FlowMatching(nn.Module):
    """LeRobot's ``PI0Pytorch`` parameters: PaliGemma + expert and the five projections."""

    def __init__(self, cfg: Pi0Config, sizes: Pi0Sizes):
        super().__init__()
        self.paligemma_with_expert = PaliGemmaWithExpert(sizes, cfg.image_resolution[0])
        e = sizes.expert.width
        self.state_proj = nn.Linear(cfg.max_state_dim, e)
        self.action_in_proj = nn.Linear(cfg.max_action_dim, e)
        self.action_out_proj = nn.Linear(e, cfg.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * e, e)
        self.action_time_mlp_out = nn.Linear(e, e)


@dataclass
class Prefix:
    """The prefix's per-layer keys/values and its valid-token mask (B, P)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    pad: torch.Tensor


def legacy_renamed(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LeRobot < 0.4 tensor names (transformers 4.48's PaliGemma) -> LeRobot >= 0.4 names."""
    out = {}
    for name, tensor in weights.items():
        for old, new in LEGACY_RENAMES:
            name = name.replace(old, new)
        out[name] = tensor
    return out


def sample_time(
    batch: int,
    cfg: Pi0Config,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Flow-matching times ``Beta(alpha, beta) * scale + offset`` (B,), float32.

    With beta == 1 (pi0's default) Beta(alpha, 1) is sampled by inversion (u ** (1 / alpha)) so
    a generator makes it reproducible; otherwise torch's Beta sampler (no generator)."""
    a, b = cfg.time_sampling_beta_alpha, cfg.time_sampling_beta_beta
    if b == 1.0:
        x = torch.rand(batch, generator=generator) ** (1 / a)
    else:
        x = torch.distributions.Beta(torch.tensor(a), torch.tensor(b)).sample((batch,))
    return (x * cfg.time_sampling_scale + cfg.time_sampling_offset).float()


def resize_with_pad_centered(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, C, h, w) in [0, 1] -> (B, C, height, width): bilinear resize keeping the aspect ratio,
    clamped to [0, 1], zero padding split evenly (OpenPI's ``resize_with_pad``)."""
    h, w = img.shape[2:]
    if (h, w) == (height, width):
        return img
    ratio = max(w / width, h / height)
    rh, rw = int(h / ratio), int(w / ratio)
    img = F.interpolate(img, size=(rh, rw), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    top, left = (height - rh) // 2, (width - rw) // 2
    return F.pad(img, (left, width - rw - left, top, height - rh - top), value=0.0)


# ---- the policy ----------------------------------------------------------------------------
class Pi0(nn.Module):
    """pi0: PaliGemma prefix (cameras, instruction) + Gemma flow-matching action expert (state
    and the action chunk). Parameters live under ``model`` with LeRobot's names, so
    ``state_dict()`` has the published tensor names. See the module docstring for what follows
    LeRobot exactly and what is simplified.
    """

    def __init__(
        self,
        config: Pi0Config,
        tokenizer: Any,
        normalizer: Normalizer | None = None,
        sizes: Pi0Sizes | None = None,
    ):
        super().__init__()
        self.config = config
        self.sizes = sizes or Pi0Sizes.from_config(config)
        proj = config.proj_width
        if proj is not None and proj != self.sizes.expert.width:
            raise Pi0Error(
                f"proj_width: expected the expert's width {self.sizes.expert.width}, given {proj}"
            )
        self.tokenizer = tokenizer
        self.normalizer = normalizer or Normalizer({}, {})
        self.model = Pi0FlowMatching(config, self.sizes)
        self.set_requires_grad()

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        tokenizer_path: str | os.PathLike | None = None,
        unnorm_key: str | None = None,
        dtype: torch.dtype | None = None,
        sizes: Pi0Sizes | None = None,
    ) -> Pi0:
        """Load a checkpoint directory in a LeRobot pi0 layout (see the module docstring).

        ``tokenizer_path``: the PaliGemma tokenizer (default: the one the preprocessor's
        tokenizer step names, else ``google/paligemma-3b-pt-224``; a local directory or a Hub id
        in the HF cache). ``unnorm_key``: the dataset whose statistics to use when the stats are
        grouped by dataset. ``sizes``: override the variant sizes (default: the published sizes
        of the config's variants). Tensors are matched strictly by name and shape; any missing,
        unexpected or mis-shaped name raises, listing them.
        """
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        directory = Path(directory)
        cfg_path = directory / "config.json"
        if not cfg_path.is_file():
            raise Pi0Error(f"config.json: not found in {directory}")
        cfg = Pi0Config.from_dict(json.loads(cfg_path.read_text()))
        weights_path = directory / WEIGHTS_NAME
        if not weights_path.is_file():
            raise Pi0Error(
                f"{WEIGHTS_NAME}: not found in {directory}; present: "
                f"{sorted(p.name for p in directory.iterdir())}"
            )
        source = str(tokenizer_path or _tokenizer_name(directory) or DEFAULT_TOKENIZER)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise Pi0Error(
                f"tokenizer_path: cannot load the PaliGemma tokenizer from {source!r} (a local "
                f"directory, or a Hub id on a connected machine or in the HF cache): {err}"
            ) from err
        weights = load_file(str(weights_path))
        features = list({**cfg.input_features, **cfg.output_features})
        legacy = _legacy_stats(weights, features)
        weights = {k: v for k, v in weights.items() if not k.startswith(LEGACY_BUFFER_PREFIXES)}
        if cfg.layout == "lerobot<0.4":
            weights = legacy_renamed(weights)
        flat, eps, read = _processor_stats(directory)
        if not read:
            flat, read = legacy, ([f"{WEIGHTS_NAME} (legacy buffers)"] if legacy else [])
        modes = _feature_modes(cfg)
        if not read and any(NORM_MODES[m] for m in modes.values()):
            raise Pi0Error(
                f"normalisation stats: none in {directory} (expected {PREPROCESSOR_NAME} / "
                f"{POSTPROCESSOR_NAME} with their normalizer safetensors, or normalize_*.buffer_* "
                f"tensors in {WEIGHTS_NAME}); present: {sorted(p.name for p in directory.iterdir())}"
            )
        try:
            stats = select_stats(flat, cfg, unnorm_key, ", ".join(read) or "(none)")
        except SmolVLAError as err:
            raise Pi0Error(str(err)) from err
        policy = cls(cfg, tokenizer, Normalizer(stats, modes, eps), sizes)
        policy.load_weights(weights)
        if dtype is not None:
            policy.to(dtype)
        policy.eval()
        return policy

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Strict load by name and shape; Pi0Error listing every missing, unexpected and
        mis-shaped tensor. A weight tied to another present one may be absent; the unused
        expert ``lm_head.weight`` is dropped."""
        weights = {k: v for k, v in weights.items() if k not in UNUSED_TENSORS}
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
            raise Pi0Error(
                f"{WEIGHTS_NAME}: does not match the pi0 built from config.json; "
                f"missing {missing}; unexpected {unexpected}; mis-shaped {shapes}"
            )
        self.load_state_dict(dict(weights), strict=False)

    def set_requires_grad(self) -> None:
        """LeRobot's trainable set: everything, less the PaliGemma when ``train_expert_only``
        and the vision tower when ``freeze_vision_encoder``."""
        cfg, pwe = self.config, self.model.paligemma_with_expert
        self.requires_grad_(True)
        if cfg.train_expert_only:
            pwe.paligemma.requires_grad_(False)
        if cfg.freeze_vision_encoder:
            pwe.paligemma.model.vision_tower.requires_grad_(False)

    # -- inputs -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.state_proj.weight.device

    def _images(self, images: Any, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """uint8 images -> per camera (B, 3, R, R) in [-1, 1] and a (B,) validity mask.

        ``images``: a dict camera key -> (B, H, W, 3), or a sequence over cameras of
        (B, H, W, 3) arrays (in ``input_features`` order)."""
        cfg = self.config
        keys = cfg.image_keys
        if isinstance(images, Mapping):
            absent = [k for k in keys if k not in images]
            if absent:
                raise Pi0Error(f"images: expected cameras {keys}, missing {absent}")
            arrays = [images[k] for k in keys]
        else:
            arrays = list(images)
            if len(arrays) != len(keys):
                raise Pi0Error(f"images: expected {len(keys)} cameras {keys}, given {len(arrays)}")
        res = cfg.image_resolution
        out, masks = [], []
        for key, arr in zip(keys, arrays, strict=True):
            t = torch.as_tensor(np.asarray(arr), device=self.device)
            shape = cfg.input_features[key].get("shape")
            hw = tuple(shape[1:]) if shape else tuple(t.shape[-3:-1])
            expected = (batch, *hw, 3)
            if t.dtype != torch.uint8 or tuple(t.shape) != expected:
                raise Pi0Error(
                    f"images[{key!r}]: expected uint8 of shape {expected}, given "
                    f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"
                )
            img = self.normalizer(t.permute(0, 3, 1, 2).float() / 255.0, key)
            if cfg.layout == "lerobot<0.4":
                img = resize_with_pad(img, res[0], res[1])
            else:
                img = resize_with_pad_centered(img, res[0], res[1])
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
            padding="max_length",
            padding_side="right",
            return_tensors="pt",
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device).bool()

    def _state(self, state: Any, batch: int) -> torch.Tensor:
        """Raw state (B, state_dim) -> normalised, zero-padded to max_state_dim."""
        t = torch.as_tensor(np.asarray(state, dtype=np.float32), device=self.device)
        expected = (batch, self.config.state_dim)
        if tuple(t.shape) != expected:
            raise Pi0Error(
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix embeddings (B, P, width) and valid mask (B, P) (one bidirectional block)."""
        pwe = self.model.paligemma_with_expert
        B = tokens.shape[0]
        embs, pads = [], []
        for img, m in zip(images, image_masks, strict=True):
            e = pwe.embed_image(img)
            embs.append(e)
            pads.append(m[:, None].expand(B, e.shape[1]))
        lang = pwe.embed_tokens(tokens)
        embs.append(lang.to(embs[0].dtype))
        pads.append(token_mask)
        return torch.cat(embs, dim=1), torch.cat(pads, dim=1)

    def encode_prefix(
        self,
        images: list[torch.Tensor],
        image_masks: list[torch.Tensor],
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
    ) -> Prefix:
        """PaliGemma's per-layer keys/values over the prefix (computed once per observation)."""
        embs, pad = self.embed_prefix(images, image_masks, tokens, token_mask)
        positions = torch.cumsum(pad.long(), dim=1) - 1
        mask = attention_2d_mask(pad, torch.zeros_like(pad))
        kv = self.model.paligemma_with_expert.prefix_kv(embs, mask, positions)
        return Prefix(kv, pad)

    def embed_suffix(self, state: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Suffix tokens (B, 1 + chunk, E): the state token, then the action-time tokens."""
        m, cfg = self.model, self.config
        dtype = m.action_in_proj.weight.dtype
        s = m.state_proj(state.to(dtype))[:, None]
        a = m.action_in_proj(x_t.to(dtype))
        te = sincos_time_embedding(t, a.shape[-1], cfg.min_period, cfg.max_period).to(a.dtype)
        h = m.action_time_mlp_out(
            F.silu(m.action_time_mlp_in(torch.cat([a, te[:, None].expand_as(a)], dim=2)))
        )
        return torch.cat([s, h], dim=1)

    def velocity(
        self, state: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prefix: Prefix
    ) -> torch.Tensor:
        """The expert's velocity (B, chunk, max_action_dim) at noisy actions x_t and times t (B,)
        for a normalised padded state (B, max_state_dim)."""
        m, cfg = self.model, self.config
        h = self.embed_suffix(state, x_t, t)
        B, S = h.shape[:2]
        ones = torch.ones(B, S, dtype=torch.bool, device=h.device)
        blocks = torch.zeros(B, S, dtype=torch.bool, device=h.device)
        blocks[:, :2] = True  # [state] then [all actions]: LeRobot's att_masks [1, 1, 0, ...]
        suffix_mask = attention_2d_mask(ones, blocks)
        cross = prefix.pad[:, None, :].expand(-1, S, -1)
        joint = torch.cat([cross, suffix_mask], dim=2)
        positions = prefix.pad.long().sum(1, keepdim=True) + torch.arange(S, device=h.device)
        out = m.paligemma_with_expert.expert(h, prefix.kv, joint, positions)
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
        imgs, masks, tokens, token_mask, st = self.prepare(
            batched, [instruction], np.asarray(state)[None]
        )
        shape = (1, cfg.chunk_size, cfg.max_action_dim)
        if noise is None:
            noise = torch.randn(shape, generator=generator).to(self.device)
        else:
            noise = torch.as_tensor(np.asarray(noise), dtype=torch.float32, device=self.device)
            if tuple(noise.shape) != shape[1:]:
                raise Pi0Error(f"noise: expected shape {shape[1:]}, given {tuple(noise.shape)}")
            noise = noise[None]
        prefix = self.encode_prefix(imgs, masks, tokens, token_mask)
        x = euler_integrate(
            lambda x_t, t: self.velocity(st, x_t, t, prefix), noise, cfg.num_inference_steps
        )
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
        imgs, masks, tokens, token_mask, state = self.prepare(
            batch["images"], batch["instruction"], batch["state"]
        )
        B = state.shape[0]
        actions = torch.as_tensor(np.asarray(batch["actions"], np.float32), device=self.device)
        expected = (B, cfg.chunk_size, cfg.action_dim)
        if tuple(actions.shape) != expected:
            raise Pi0Error(
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
            time = sample_time(B, cfg, gen).to(self.device)
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        target = noise - actions
        prefix = self.encode_prefix(imgs, masks, tokens, token_mask)
        v = self.velocity(state, x_t, time, prefix)
        losses = F.mse_loss(v, target, reduction="none")[:, :, : cfg.action_dim]
        pad = batch.get("action_is_pad")
        if pad is None:
            return losses.mean()
        valid = ~torch.as_tensor(np.asarray(pad), dtype=torch.bool, device=self.device)
        return (losses * valid[..., None]).sum() / (valid.sum() * cfg.action_dim).clamp_min(1)


def _tokenizer_name(directory: Path) -> str | None:
    """The tokenizer the checkpoint's preprocessor names (LeRobot >= 0.4), if any."""
    path = directory / PREPROCESSOR_NAME
    if not path.is_file():
        return None
    for step in json.loads(path.read_text()).get("steps", []):
        name = step.get("config", {}).get("tokenizer_name")
        if step.get("registry_name") == "tokenizer_processor" and name:
            return str(name)
    return None
