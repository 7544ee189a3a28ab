"""OpenVLA checkpoints in the layout their authors publish on the Hugging Face Hub.

A checkpoint directory such as ``openvla/openvla-7b`` holds::

    config.json                      model_type "openvla", architectures
                                     ["OpenVLAForActionPrediction"], vision_backbone_id,
                                     llm_backbone_id, arch_specifier, use_fused_vision_backbone,
                                     timm_model_ids, image_sizes, n_action_bins, text_config
                                     (the Llama config), norm_stats, pad_token_id,
                                     pad_to_multiple_of, ...
    model.safetensors.index.json     weight_map: tensor name -> shard file
    model-0000N-of-0000M.safetensors the shards (or a single model.safetensors)
    tokenizer.json, tokenizer_config.json, ...
    dataset_statistics.json          the same norm_stats (read when config.json has none)
    preprocessor_config.json         per-backbone input size, resize strategy, mean and std

Tensor names, matched strictly by name and shape:

* ``vision_backbone.featurizer.*`` and ``vision_backbone.fused_featurizer.*``: timm ViTs
  (``cls_token``, ``reg_token``, ``pos_embed``, ``patch_embed.proj``,
  ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.scale_factor,norm2,mlp.fc1,mlp.fc2,ls2.scale_factor}``,
  ``norm``, and SigLIP's ``attn_pool.*``). OpenVLA's Hugging Face port renames timm's
  LayerScale ``gamma`` to ``scale_factor``, so the published files say ``ls1.scale_factor``.
* ``projector.fc1/fc2/fc3`` (fused backbones; ``fc1/fc2`` otherwise), GELU between them.
* ``language_model.model.*`` and ``language_model.lm_head.*``: a transformers causal LM built
  from ``text_config``.

timm itself is not used (it requires torchvision): the ViTs here are small modules whose
parameter names equal timm's. Their widths, depths and patch sizes are read from the tensor
shapes in the shards (the published config names the timm model, not its sizes); the number of
attention heads comes from the timm model id (:data:`VIT_FAMILIES`).

The model reads, for each ViT, the patch tokens output by its second-to-last block (no final
norm, no class/register tokens), concatenates the two ViTs' features per patch, projects them
and inserts them after the BOS token of the prompt
``"In: What action should the robot take to {instruction}?\\nOut:"`` followed by the empty
token ``"▁"`` (id 29871 in Llama-2's vocabulary). Actions are decoded from the last 256 ids of
the unpadded vocabulary (see :func:`decode_action_tokens` and :func:`unnormalize_actions`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vla_ray.config import ConfigError
from vla_ray.models.language import cache_keyword, decoder_of, output_cache

SUPPORTED_MODEL_TYPES = ("openvla",)
SUPPORTED_ARCHITECTURES = ("OpenVLAForActionPrediction",)
INDEX_NAME = "model.safetensors.index.json"
SINGLE_WEIGHTS_NAME = "model.safetensors"
DATASET_STATISTICS_NAME = "dataset_statistics.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
EMPTY_TOKEN = "▁"  # SentencePiece's bare word boundary; id 29871 in Llama-2's vocabulary
LLAMA_EMPTY_TOKEN_ID = 29871
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_STRATEGIES = ("resize-naive", "letterbox", "resize-crop")
ROTARY_BUFFER = "rotary_emb.inv_freq"


class OpenVLAError(ConfigError):
    """An OpenVLA checkpoint or input is not what the model expects; the message says which field."""


# ---- timm-named ViTs -------------------------------------------------------------------------
@dataclass(frozen=True)
class ViTFamily:
    """What a timm model id fixes that the tensor shapes do not say."""

    num_heads: int
    class_token: bool
    layer_scale: bool
    attn_pool: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Keyed by timm model name without its pretrained tag (the part before the first '.').
VIT_FAMILIES: dict[str, ViTFamily] = {
    "vit_large_patch14_reg4_dinov2": ViTFamily(16, True, True, False, IMAGENET_MEAN, IMAGENET_STD),
    "vit_so400m_patch14_siglip_224": ViTFamily(16, False, False, True, (0.5,) * 3, (0.5,) * 3),
    "vit_so400m_patch14_siglip_384": ViTFamily(16, False, False, True, (0.5,) * 3, (0.5,) * 3),
}


def vit_family(timm_model_id: str) -> ViTFamily:
    """The :class:`ViTFamily` of a timm model id such as ``vit_so400m_patch14_siglip_224``."""
    name = timm_model_id.split(".")[0]
    if name not in VIT_FAMILIES:
        raise OpenVLAError(
            f"config.json timm_model_ids: unsupported vision model {timm_model_id!r}; "
            f"supported: {', '.join(VIT_FAMILIES)}"
        )
    return VIT_FAMILIES[name]


@dataclass(frozen=True)
class ViTShape:
    """Sizes of one timm ViT, as read from its tensors."""

    dim: int
    depth: int
    patch: int
    mlp_hidden: int
    num_patches: int
    reg_tokens: int
    pool_mlp_hidden: int


class LayerScale(nn.Module):
    """timm's LayerScale with the parameter OpenVLA's port calls ``scale_factor``."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale_factor = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


class Mlp(nn.Module):
    """``fc1`` -> GELU -> ``fc2`` (timm's ``Mlp``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm's ``Attention``)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block (timm's ``Block``), with optional LayerScale."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, layer_scale: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens (timm's ``PatchEmbed``)."""

    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class AttentionPoolLatent(nn.Module):
    """Parameters of SigLIP's attention-pooling head (timm's ``AttentionPoolLatent``).

    The published weights contain it, so it exists for strict loading; OpenVLA reads an
    intermediate block and never runs it, and neither does this module.
    """

    def __init__(self, dim: int, mlp_hidden: int):
        super().__init__()
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)


class TimmViT(nn.Module):
    """A timm VisionTransformer's parameters; ``forward`` returns the patch tokens after the
    second-to-last block (what OpenVLA's ``get_intermediate_layers(n={depth - 2})`` returns)."""

    def __init__(self, family: ViTFamily, shape: ViTShape):
        super().__init__()
        d = shape.dim
        if d % family.num_heads:
            raise OpenVLAError(
                f"vision width: {d} is not divisible by the family's {family.num_heads} heads"
            )
        self.family, self.shape = family, shape
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if family.class_token else None
        self.reg_token = (
            nn.Parameter(torch.zeros(1, shape.reg_tokens, d)) if shape.reg_tokens else None
        )
        self.num_prefix_tokens = int(family.class_token) + shape.reg_tokens
        # timm's no_embed_class: position embeddings cover the patches only
        self.pos_embed = nn.Parameter(torch.zeros(1, shape.num_patches, d))
        self.patch_embed = PatchEmbed(d, shape.patch)
        self.blocks = nn.ModuleList(
            Block(d, family.num_heads, shape.mlp_hidden, family.layer_scale)
            for _ in range(shape.depth)
        )
        self.norm = nn.LayerNorm(d, eps=1e-6)  # in the weights; not on OpenVLA's path
        self.attn_pool = AttentionPoolLatent(d, shape.pool_mlp_hidden) if family.attn_pool else None

    @property
    def embed_dim(self) -> int:
        return self.shape.dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels) + self.pos_embed
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*prefix, x], dim=1)
        for block in self.blocks[: len(self.blocks) - 1]:
            x = block(x)
        return x[:, self.num_prefix_tokens :]


def read_vit_shape(shapes: Mapping[str, tuple[int, ...]], prefix: str, field: str) -> ViTShape:
    """Sizes of the ViT whose tensors start with ``prefix`` in ``shapes`` (name -> shape)."""
    key = prefix + "patch_embed.proj.weight"
    if key not in shapes:
        raise OpenVLAError(f"{field}: the checkpoint has no tensor {key!r}")
    dim, _, patch, _ = shapes[key]
    depth = 0
    while f"{prefix}blocks.{depth}.norm1.weight" in shapes:
        depth += 1
    if depth < 2:
        raise OpenVLAError(f"{field}: expected at least 2 blocks under {prefix!r}, found {depth}")
    reg = shapes.get(prefix + "reg_token", (1, 0, dim))[1]
    pool = shapes.get(prefix + "attn_pool.mlp.fc1.weight", (0, dim))[0]
    return ViTShape(
        dim=dim,
        depth=depth,
        patch=patch,
        mlp_hidden=shapes[f"{prefix}blocks.0.mlp.fc1.weight"][0],
        num_patches=shapes[prefix + "pos_embed"][1],
        reg_tokens=reg,
        pool_mlp_hidden=pool,
    )


class PrismaticVisionBackbone(nn.Module):
    """One ViT (``featurizer``) or two fused ViTs (``featurizer`` + ``fused_featurizer``).

    Input: pixel values (B, 3 * n_vits, S, S), each ViT's preprocessed image stacked on the
    channels; output: (B, patches, sum of widths).
    """

    def __init__(self, vits: Sequence[TimmViT]):
        super().__init__()
        self.featurizer = vits[0]
        self.fused_featurizer = vits[1] if len(vits) > 1 else None
        self.embed_dim = sum(v.embed_dim for v in vits)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.fused_featurizer is None:
            return self.featurizer(pixel_values)
        img, img_fused = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat([self.featurizer(img), self.fused_featurizer(img_fused)], dim=2)


class PrismaticProjector(nn.Module):
    """Patch features -> LM embeddings: fc1-GELU-fc2-GELU-fc3 (fused) or fc1-GELU-fc2."""

    def __init__(self, fused: bool, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fused = fused
        if fused:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
        else:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(F.gelu(self.fc1(x)))
        return self.fc3(F.gelu(x)) if self.fused else x


# ---- OFT-style parallel decoding ---------------------------------------------------------------
class MLPResNetBlock(nn.Module):
    """x + ReLU(Linear(LayerNorm(x)))."""

    def __init__(self, dim: int):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    """LayerNorm-fc1-ReLU, residual blocks, LayerNorm-fc2."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.mlp_resnet_blocks = nn.ModuleList(
            MLPResNetBlock(hidden_dim) for _ in range(num_blocks)
        )
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    """OpenVLA-OFT-style head: LM hidden states at ``chunk * action_dim`` placeholder positions
    (B, K*A, D) -> normalised actions (B, K, A), trained with an L1 loss.

    The module names follow OFT's ``L1RegressionActionHead`` (``model.layer_norm1``, ``model.fc1``,
    ``model.mlp_resnet_blocks.N.ffn.{0,1}``, ``model.layer_norm2``, ``model.fc2``); loading OFT's
    released head weights has not been tried.
    """

    def __init__(self, llm_dim: int, action_dim: int, chunk: int, num_blocks: int = 2):
        super().__init__()
        self.action_dim, self.chunk = action_dim, chunk
        self.model = MLPResNet(num_blocks, llm_dim * action_dim, llm_dim, action_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        B = hidden.shape[0]
        return self.model(hidden.reshape(B, self.chunk, -1))


# ---- action decoding ---------------------------------------------------------------------------
def bin_centers(n_action_bins: int) -> np.ndarray:
    """Centres of the ``n_action_bins - 1`` uniform intervals between ``n_action_bins`` edges on
    [-1, 1]."""
    edges = np.linspace(-1.0, 1.0, n_action_bins)
    return (edges[:-1] + edges[1:]) / 2.0


def decode_action_tokens(
    token_ids: np.ndarray | Sequence[int], vocab_size: int, n_action_bins: int = 256
) -> np.ndarray:
    """Normalised actions in [-1, 1] from action token ids, as OpenVLA decodes them.

    ``vocab_size`` is the unpadded vocabulary (``text_config.vocab_size - pad_to_multiple_of``):
    id -> ``vocab_size - id`` -> minus 1, clipped to [0, n_action_bins - 2] -> that bin centre.
    """
    centers = bin_centers(n_action_bins)
    idx = vocab_size - np.asarray(token_ids, dtype=np.int64)
    return centers[np.clip(idx - 1, 0, centers.shape[0] - 1)]


def unnormalize_actions(normalized: np.ndarray, action_stats: Mapping[str, Any]) -> np.ndarray:
    """Map [-1, 1] back to each dimension's [q01, q99] where ``mask`` is true (all, if absent);
    dimensions with a false mask (e.g. the gripper) pass through unchanged."""
    low, high = np.asarray(action_stats["q01"]), np.asarray(action_stats["q99"])
    mask = np.asarray(action_stats.get("mask", np.ones_like(low, dtype=bool)), dtype=bool)
    return np.where(mask, 0.5 * (normalized + 1.0) * (high - low) + low, normalized)


def select_unnorm_key(norm_stats: Mapping[str, Any] | None, unnorm_key: str | None) -> str:
    """The dataset key whose statistics un-normalise actions; errors list the keys present."""
    if not norm_stats:
        raise OpenVLAError(
            "norm_stats: the checkpoint has none (neither config.json 'norm_stats' nor "
            f"{DATASET_STATISTICS_NAME}); actions cannot be un-normalised"
        )
    keys = ", ".join(norm_stats)
    if unnorm_key is None:
        if len(norm_stats) != 1:
            raise OpenVLAError(
                f"unnorm_key: required when norm_stats has several datasets; choose one of {keys}"
            )
        return next(iter(norm_stats))
    if unnorm_key not in norm_stats:
        raise OpenVLAError(f"unnorm_key: {unnorm_key!r} is not in norm_stats; choose one of {keys}")
    return unnorm_key


# ---- image preprocessing -----------------------------------------------------------------------
@dataclass(frozen=True)
class ImageTransform:
    """Resize + normalise one ViT's input (the published ``preprocessor_config.json``)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    strategy: str = "resize-naive"


def _resize_pil(image: np.ndarray, t: ImageTransform) -> np.ndarray:
    """The published processor's geometry with PIL bicubic (what torchvision's functional
    transforms do on PIL images): ``resize-naive`` squashes to (S, S); ``resize-crop`` resizes the
    shorter side to S and centre-crops; ``letterbox`` first pads to (nearly) square with the mean
    colour, then does the same."""
    from PIL import Image, ImageOps

    img = Image.fromarray(image)
    if t.strategy == "resize-naive":
        return np.asarray(img.resize((t.size, t.size), Image.BICUBIC))
    if t.strategy == "letterbox":  # int((max - side) / 2) on each side, as the processor pads
        w, h = img.size
        pad_w, pad_h = int((max(w, h) - w) / 2), int((max(w, h) - h) / 2)
        fill = tuple(int(m * 255) for m in t.mean)
        img = ImageOps.expand(img, border=(pad_w, pad_h, pad_w, pad_h), fill=fill)
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(t.size * long / short)  # torchvision truncates the longer side
    img = img.resize((t.size, new_long) if w <= h else (new_long, t.size), Image.BICUBIC)
    w, h = img.size
    left, top = int(round((w - t.size) / 2.0)), int(round((h - t.size) / 2.0))
    return np.asarray(img.crop((left, top, left + t.size, top + t.size)))


def preprocess_image(image: np.ndarray, transforms: Sequence[ImageTransform]) -> torch.Tensor:
    """uint8 (H, W, 3) -> float pixel values (3 * len(transforms), S, S), each transform's image
    stacked on the channels."""
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3):
        given = getattr(image, "shape", type(image).__name__)
        raise OpenVLAError(f"image: expected a uint8 array of shape (H, W, 3), given {given}")
    if image.dtype != np.uint8:
        raise OpenVLAError(f"image: expected dtype uint8, given {image.dtype}")
    out = []
    for t in transforms:
        x = torch.from_numpy(_resize_pil(image, t).copy()).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(t.mean).view(3, 1, 1)
        std = torch.tensor(t.std).view(3, 1, 1)
        out.append((x - mean) / std)
    return torch.cat(out, dim=0)


def preprocess_batch(images: torch.Tensor, transforms: Sequence[ImageTransform]) -> torch.Tensor:
    """uint8 (B, S, S, 3) already at the backbone's size -> pixel values (B, 3 * n, S, S)."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    out = []
    for t in transforms:
        mean = torch.tensor(t.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(t.std, device=x.device).view(1, 3, 1, 1)
        out.append((x - mean) / std)
    return torch.cat(out, dim=1)


def prompt_text(instruction: str) -> str:
    """OpenVLA's prompt for one instruction (lower-cased, as in training)."""
    return PROMPT.format(instruction=instruction.lower().strip())


# ---- checkpoint reading ------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_openvla_config(config: Mapping[str, Any]) -> None:
    """Raise unless ``config`` (a parsed config.json) is an OpenVLA checkpoint's."""
    model_type = config.get("model_type")
    archs = config.get("architectures")
    if (
        model_type not in SUPPORTED_MODEL_TYPES
        or not archs
        or archs[0] not in SUPPORTED_ARCHITECTURES
    ):
        raise OpenVLAError(
            f"config.json: model_type {model_type!r} with architectures {archs!r} is not a "
            f"supported VLA checkpoint; supported families: model_type "
            f"{', '.join(map(repr, SUPPORTED_MODEL_TYPES))} with architectures "
            f"{list(SUPPORTED_ARCHITECTURES)} (vision timm models {', '.join(VIT_FAMILIES)})"
        )
    for key in ("timm_model_ids", "image_sizes", "text_config", "use_fused_vision_backbone"):
        if key not in config:
            raise OpenVLAError(f"config.json: missing key {key!r}")
    n_vits = 2 if config["use_fused_vision_backbone"] else 1
    for key in ("timm_model_ids", "image_sizes"):
        if len(config[key]) != n_vits:
            raise OpenVLAError(
                f"config.json {key}: expected {n_vits} entries (use_fused_vision_backbone="
                f"{config['use_fused_vision_backbone']}), given {config[key]!r}"
            )


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index or a single file."""
    index = directory / INDEX_NAME
    if index.exists():
        weight_map = _read_json(index)["weight_map"]
        files = {name: directory / shard for name, shard in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.exists():
                raise OpenVLAError(f"{INDEX_NAME}: names shard {path.name!r}, which is missing")
        return files
    single = directory / SINGLE_WEIGHTS_NAME
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise OpenVLAError(f"weights: {directory} has neither {INDEX_NAME} nor {SINGLE_WEIGHTS_NAME}")


def tensor_shapes(files: Mapping[str, Path]) -> dict[str, tuple[int, ...]]:
    """Name -> shape from the safetensors headers (no tensor data is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _listing(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_names(
    expected: Mapping[str, tuple[int, ...]], given: Mapping[str, tuple[int, ...]]
) -> None:
    """Raise listing missing, unexpected and wrongly shaped tensors, if any."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(
        f"{n} (expected {tuple(expected[n])}, given {tuple(given[n])})"
        for n in set(expected) & set(given)
        if tuple(expected[n]) != tuple(given[n])
    )
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_listing(unexpected)}")
        if wrong:
            parts.append(f"wrong shape {len(wrong)}: {_listing(wrong)}")
        raise OpenVLAError(
            "weights: checkpoint tensors do not match the model; " + "; ".join(parts)
        )


# transformers 4.40.1's LlamaConfig defaults (Llama-2-7B sizes). openvla-7b's text_config stores
# only what differs from them (model_type, pad_token_id, torch_dtype, vocab_size), so these fill
# the rest whatever the installed transformers' defaults are. rms_norm_eps is 4.40's default 1e-6,
# which is what OpenVLA runs with (Llama-2's own config says 1e-5).
LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "tie_word_embeddings": False,
}


def language_model_config(text_config: Mapping[str, Any]) -> Any:
    """The transformers config of the LM from config.json's ``text_config``."""
    from transformers import AutoConfig

    text_config = dict(text_config)
    lm_type = text_config.pop("model_type", "llama")
    if lm_type == "llama":
        text_config = {**LLAMA_DEFAULTS, **text_config}
        text_config.setdefault("num_key_value_heads", text_config["num_attention_heads"])
    return AutoConfig.for_model(lm_type, **text_config)


def load_tokenizer(directory: Path) -> Any:
    """The checkpoint's tokenizer, by class rather than AutoTokenizer: AutoTokenizer would read
    config.json, whose auto_map points at the authors' remote code."""
    if (directory / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(directory))
    if (directory / "tokenizer.model").exists():  # SentencePiece only (not tried here)
        from transformers import LlamaTokenizer

        return LlamaTokenizer.from_pretrained(str(directory))
    raise OpenVLAError(f"tokenizer: {directory} has neither tokenizer.json nor tokenizer.model")


def _config_dtype(config: Mapping[str, Any]) -> torch.dtype:
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return getattr(torch, str(name).removeprefix("torch."))


def _rebuild_meta_buffers(module: nn.Module, lm_config: Any) -> None:
    """Modules built on the meta device whose non-persistent buffers (rotary frequencies) were
    not in the weights: rebuild them for real."""
    for name, child in list(module.named_modules()):
        if any(b.is_meta for b in child.buffers(recurse=False)):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, type(child)(config=lm_config))


def build_vision(
    config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], pre: Mapping[str, Any]
) -> tuple[list[TimmViT], list[ImageTransform]]:
    """The ViTs (on the meta device, sized from the tensor ``shapes``) and their image transforms
    (from ``preprocessor_config.json`` contents ``pre``, else the timm family's defaults)."""
    strategy = pre.get("image_resize_strategy", config.get("image_resize_strategy", "resize-naive"))
    if strategy not in RESIZE_STRATEGIES:
        raise OpenVLAError(
            f"image_resize_strategy: unknown {strategy!r}; valid: {', '.join(RESIZE_STRATEGIES)}"
        )
    prefixes = ("vision_backbone.featurizer.", "vision_backbone.fused_featurizer.")
    vits, transforms = [], []
    for i, timm_id in enumerate(config["timm_model_ids"]):
        family = vit_family(timm_id)
        shape = read_vit_shape(shapes, prefixes[i], f"timm_model_ids[{i}] ({timm_id})")
        size = int(config["image_sizes"][i])
        grid = size // shape.patch
        if grid * grid != shape.num_patches:
            raise OpenVLAError(
                f"config.json image_sizes[{i}]: {size} px with patch {shape.patch} gives "
                f"{grid * grid} patches, but {prefixes[i]}pos_embed has {shape.num_patches}"
            )
        with torch.device("meta"):
            vits.append(TimmViT(family, shape))
        mean = tuple(pre["means"][i]) if "means" in pre else family.mean
        std = tuple(pre["stds"][i]) if "stds" in pre else family.std
        transforms.append(ImageTransform(size, mean, std, strategy))
    return vits, transforms


# ---- the model ---------------------------------------------------------------------------------
class OpenVLA(nn.Module):
    """OpenVLA (Prismatic VLM + action tokens) read from the published checkpoint layout.

    Build with :meth:`from_pretrained`; act with :meth:`predict_action`. With
    ``action_decoding="l1_parallel"`` the model instead reads the LM's hidden states at
    ``action_chunk * action_dim`` placeholder positions after the prompt and regresses a chunk
    of actions with :class:`L1RegressionActionHead` (OpenVLA-OFT's parallel decoding; the head
    starts untrained unless ``action_head_path`` names its safetensors weights).
    """

    ACTION_DECODINGS = ("tokens", "l1_parallel")

    def __init__(
        self,
        config: Mapping[str, Any],
        vits: Sequence[TimmViT],
        language_model: nn.Module,
        tokenizer: Any,
        transforms: Sequence[ImageTransform],
        norm_stats: Mapping[str, Any] | None,
    ):
        super().__init__()
        self.config = dict(config)
        self.vision_backbone = PrismaticVisionBackbone(vits)
        d = int(language_model.config.hidden_size)
        self.projector = PrismaticProjector(len(vits) > 1, self.vision_backbone.embed_dim, d)
        self.language_model = language_model
        self.hidden_size = d
        self.tokenizer = tokenizer
        self.transforms = tuple(transforms)
        self.norm_stats = norm_stats
        self.n_action_bins = int(config.get("n_action_bins", 256))
        # the action bins are the last ids of the vocabulary before padding to a multiple of 64
        self.vocab_size = int(language_model.config.vocab_size) - int(
            config.get("pad_to_multiple_of", 0)
        )
        self.empty_token_id = self._empty_token_id()
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos_token_id = int(bos) if bos is not None else 1  # Llama's <s>
        self.action_decoding = "tokens"
        self.action_head: L1RegressionActionHead | None = None
        self.unnorm_key: str | None = None

    def _empty_token_id(self) -> int:
        if self.tokenizer is None:
            return LLAMA_EMPTY_TOKEN_ID
        tid = self.tokenizer.convert_tokens_to_ids(EMPTY_TOKEN)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise OpenVLAError(f"tokenizer: has no {EMPTY_TOKEN!r} token to end the prompt with")
        return int(tid)

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        unnorm_key: str | None = None,
        dtype: torch.dtype | None = None,
        action_decoding: str = "tokens",
        action_chunk: int = 1,
        action_head_path: str | os.PathLike | None = None,
    ) -> OpenVLA:
        """Load a checkpoint directory in the published Hub layout (see the module docstring).

        ``dtype``: None keeps the checkpoint's ``torch_dtype``. ``unnorm_key``: the dataset whose
        statistics un-normalise actions (required when norm_stats has several). Tensors are
        matched strictly: any missing, unexpected or wrongly shaped name raises, listing them.
        """
        from transformers import AutoModelForCausalLM

        directory = Path(directory)
        config_path = directory / "config.json"
        if not config_path.exists():
            raise OpenVLAError(f"config.json: not found in {directory}")
        config = _read_json(config_path)
        check_openvla_config(config)
        if action_decoding not in cls.ACTION_DECODINGS:
            raise OpenVLAError(
                f"action_decoding: unknown name {action_decoding!r}; valid names are "
                f"{', '.join(cls.ACTION_DECODINGS)}"
            )
        norm_stats = config.get("norm_stats")
        if not norm_stats and (directory / DATASET_STATISTICS_NAME).exists():
            norm_stats = _read_json(directory / DATASET_STATISTICS_NAME)
        if unnorm_key is not None:
            select_unnorm_key(norm_stats, unnorm_key)
        dtype = dtype if dtype is not None else _config_dtype(config)

        files = weight_files(directory)
        shapes = tensor_shapes(files)
        pre_path = directory / PREPROCESSOR_NAME
        vits, transforms = build_vision(
            config, shapes, _read_json(pre_path) if pre_path.exists() else {}
        )

        lm_config = language_model_config(config["text_config"])
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(lm_config)
        tokenizer = load_tokenizer(directory)
        with torch.device("meta"):
            model = cls(config, vits, lm, tokenizer, transforms, norm_stats)
        expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
        # rotary frequencies are recomputed, whether or not an older export saved them
        files = {n: f for n, f in files.items() if not n.endswith(ROTARY_BUFFER)}
        check_names(expected, {n: shapes[n] for n in files})
        model.load_state_dict(load_tensors(files, dtype), strict=True, assign=True)
        _rebuild_meta_buffers(model, lm_config)
        model.unnorm_key = unnorm_key
        if action_decoding == "l1_parallel":
            model.use_parallel_decoding(action_chunk, action_head_path)
        return model.eval()

    def use_parallel_decoding(
        self, chunk: int, head_path: str | os.PathLike | None = None
    ) -> L1RegressionActionHead:
        """Switch to OFT-style decoding of ``chunk`` actions at once with an L1 regression head."""
        if chunk < 1:
            raise OpenVLAError(f"action_chunk: expected >= 1, given {chunk}")
        dtype = next(self.language_model.parameters()).dtype
        head = L1RegressionActionHead(self.hidden_size, self._head_action_dim(), chunk).to(dtype)
        if head_path is not None:
            from safetensors.torch import load_file

            state = load_file(str(head_path))
            expected = {n: tuple(t.shape) for n, t in head.state_dict().items()}
            check_names(expected, {n: tuple(t.shape) for n, t in state.items()})
            head.load_state_dict(state)
        self.action_head, self.action_decoding = head, "l1_parallel"
        return head

    # ---- statistics ---------------------------------------------------------------------------
    def action_stats(self, unnorm_key: str | None = None) -> dict[str, Any]:
        """The action statistics (q01, q99, mask, ...) of one dataset."""
        key = select_unnorm_key(self.norm_stats, unnorm_key or self.unnorm_key)
        return self.norm_stats[key]["action"]

    def _head_action_dim(self) -> int:
        """The action length a regression head needs: the chosen dataset's, or the one length all
        datasets share."""
        if self.unnorm_key is not None or not self.norm_stats or len(self.norm_stats) == 1:
            return self.action_dim()
        dims = {len(s["action"]["q01"]) for s in self.norm_stats.values()}
        if len(dims) > 1:
            select_unnorm_key(self.norm_stats, None)  # raises, listing the datasets
        return dims.pop()

    def action_dim(self, unnorm_key: str | None = None) -> int:
        """Length of one action (from the dataset's q01)."""
        return len(self.action_stats(unnorm_key)["q01"])

    # ---- forward pieces -----------------------------------------------------------------------
    def encode_prompt(self, instruction: str) -> torch.Tensor:
        """Token ids (1, L) of the prompt with BOS and the trailing empty token."""
        # BOS added here, not by the tokenizer's template, which not every saved tokenizer keeps
        ids = [self.bos_token_id]
        ids += self.tokenizer(prompt_text(instruction), add_special_tokens=False).input_ids
        if ids[-1] != self.empty_token_id:
            ids = [*ids, self.empty_token_id]
        return torch.tensor([ids], dtype=torch.long)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """[BOS] + projected patches + the rest of the prompt, as LM input embeddings."""
        emb = self.language_model.get_input_embeddings()(input_ids)
        patches = self.projector(self.vision_backbone(pixel_values.to(emb.dtype)))
        return torch.cat([emb[:, :1], patches, emb[:, 1:]], dim=1)

    @torch.no_grad()
    def predict_action_tokens(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, n: int
    ) -> torch.Tensor:
        """Greedy decoding of ``n`` tokens after the prompt (batch of one), with a KV cache."""
        out = self.language_model(inputs_embeds=self.embed(input_ids, pixel_values), use_cache=True)
        tokens = []
        for step in range(n):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            if step + 1 < n:
                cache = {cache_keyword(self.language_model): output_cache(out)}
                out = self.language_model(input_ids=nxt, use_cache=True, **cache)
        return torch.cat(tokens, dim=1)

    @torch.no_grad()
    def predict_normalized_chunk(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor
    ) -> torch.Tensor:
        """OFT-style: hidden states at K*A zero placeholder embeddings -> (1, K, A), clipped to
        [-1, 1] (placeholders attend causally, as the LM was built)."""
        head = self.action_head
        emb = self.embed(input_ids, pixel_values)
        slots = emb.new_zeros(1, head.chunk * head.action_dim, emb.shape[-1])
        out = decoder_of(self.language_model)(inputs_embeds=torch.cat([emb, slots], dim=1))
        hidden = out.last_hidden_state[:, -slots.shape[1] :]
        # the head is linear at the output (as OFT's); its targets were clipped to [-1, 1]
        return head(hidden).clamp(-1.0, 1.0)

    def predict_action(
        self, image: np.ndarray, instruction: str, unnorm_key: str | None = None
    ) -> np.ndarray:
        """De-normalised action (A,) for one uint8 (H, W, 3) image and instruction; with
        ``l1_parallel`` decoding, a chunk (K, A)."""
        stats = self.action_stats(unnorm_key)
        device = self.language_model.lm_head.weight.device
        pixel_values = preprocess_image(image, self.transforms)[None].to(device)
        input_ids = self.encode_prompt(instruction).to(device)
        if self.action_decoding == "l1_parallel":
            chunk = self.predict_normalized_chunk(pixel_values, input_ids)
            normalized = chunk[0].float().cpu().numpy()
        else:
            ids = self.predict_action_tokens(pixel_values, input_ids, len(stats["q01"]))
            normalized = decode_action_tokens(
                ids[0].cpu().numpy(), self.vocab_size, self.n_action_bins
            )
        return unnormalize_actions(normalized, stats)


def load_tensors(files: Mapping[str, Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor named in ``files``, cast to ``dtype`` where floating point."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    state = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                t = f.get_tensor(name)
                state[name] = t.to(dtype) if t.is_floating_point() else t
    return state


# ---- trunk adapter -----------------------------------------------------------------------------
class OpenVLATrunk(nn.Module):
    """An OpenVLA checkpoint as a vla-ray trunk: observation dict -> features (B, F).

    ``obs`` holds batched tensors: ``image`` uint8 (B, S, S, 3) with S = ``image_size`` (the
    checkpoint's ``image_sizes[0]``, 224 for openvla-7b), ``instruction`` int64 (B, L) and
    ``instruction_mask`` (B, L): right-padded ids of :func:`prompt_text` of the instruction,
    tokenized by the checkpoint's tokenizer without special tokens, e.g.
    ``vla_ray.tokenizer.encode_instructions([prompt_text(t) for t in texts], L, trunk.tokenizer)``.
    The trunk adds BOS, inserts the projected patches after it and appends the empty token after
    each row's last valid token, so the sequence is the one OpenVLA was trained on. An optional
    ``state`` (B, S) is ignored (OpenVLA has no proprioception input).

    Features are the LM's last hidden state at the readout position, the empty token where
    OpenVLA predicts its first action token: ``feature_dim == hidden_size``. An action head and
    a value head read them like any trunk's features (``VLA`` builds heads on ``feature_dim``).
    ``vision`` is the fused ViT backbone. ``shared_prefixes()`` is a no-op context (there is no
    prefix cache); ``forward_functional`` is ``forward`` (no memo, so export-safe).

    Build: ``OpenVLATrunk(OpenVLA.from_pretrained(directory))`` or
    ``OpenVLATrunk.from_pretrained(directory)``.
    """

    def __init__(self, model: OpenVLA, wrap_prompt: bool = False):
        super().__init__()
        self.model = model
        self.tokenizer = model.tokenizer
        # wrap_prompt: ``instruction`` holds the bare instruction's ids (as an env encodes it
        # with the checkpoint's tokenizer); the trunk puts the prompt's fixed text around them
        self.wrap_prompt = wrap_prompt
        before, after = PROMPT.split("{instruction}")
        self._prompt_before = self._ids(before.strip())
        # tokenised as a continuation (alone, SentencePiece would prefix a word boundary)
        anchor = self._ids("a")
        self._prompt_after = self._ids("a" + after)[len(anchor) :]
        self.vision = model.vision_backbone
        self.hidden_size = model.hidden_size
        self.feature_dim = model.hidden_size
        self.image_size = model.transforms[0].size
        if any(t.size != self.image_size for t in model.transforms):
            raise OpenVLAError(
                f"image_sizes: the trunk needs one size for all backbones, given "
                f"{[t.size for t in model.transforms]}"
            )

    def _ids(self, text: str) -> list[int]:
        if self.tokenizer is None or not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, dtype: torch.dtype | None = None, wrap_prompt=False
    ) -> OpenVLATrunk:
        """Load the checkpoint (see :meth:`OpenVLA.from_pretrained`) and wrap it."""
        return cls(OpenVLA.from_pretrained(directory, dtype=dtype), wrap_prompt=wrap_prompt)

    def shared_prefixes(self) -> contextlib.AbstractContextManager[None]:
        """No prefix cache to share: a null context, for the trunk contract."""
        return contextlib.nullcontext()

    def _check(self, obs: Mapping[str, torch.Tensor]) -> None:
        image = obs["image"]
        B = image.shape[0]
        expected = (B, self.image_size, self.image_size, 3)
        if tuple(image.shape) != expected:
            raise OpenVLAError(
                f"obs['image']: expected shape {expected}, given {tuple(image.shape)}"
            )
        if tuple(obs["instruction"].shape) != tuple(obs["instruction_mask"].shape):
            raise OpenVLAError(
                f"obs['instruction_mask']: expected the shape of obs['instruction'] "
                f"{tuple(obs['instruction'].shape)}, given {tuple(obs['instruction_mask'].shape)}"
            )
        mask = obs["instruction_mask"].long()
        steps = torch.arange(mask.shape[1], device=mask.device)[None]
        if not torch.equal(mask, (steps < mask.sum(1, keepdim=True)).long()):
            raise OpenVLAError(
                "obs['instruction_mask']: expected right padding (ones, then zeros) in every row"
            )

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Features (B, hidden_size), float32."""
        self._check(obs)
        m = self.model
        ids = obs["instruction"].long()
        mask = obs["instruction_mask"].long()
        if self.wrap_prompt:
            ids, mask = self._wrap(ids, mask)
        B, L = ids.shape
        dev = ids.device
        lengths = mask.sum(1)
        bos = m.bos_token_id
        pad = m.config.get("pad_token_id", 0)
        seq = torch.full((B, L + 2), int(pad), dtype=torch.long, device=dev)
        seq[:, 0] = bos
        seq[:, 1 : L + 1] = torch.where(mask.bool(), ids, seq[:, 1 : L + 1])
        rows = torch.arange(B, device=dev)
        seq[rows, lengths + 1] = m.empty_token_id
        seq_mask = (torch.arange(L + 2, device=dev)[None] <= (lengths + 1)[:, None]).long()
        pixel_values = preprocess_batch(obs["image"], m.transforms)
        emb = m.embed(seq, pixel_values)
        P = emb.shape[1] - seq.shape[1]
        full_mask = torch.cat(
            [seq_mask[:, :1], torch.ones(B, P, dtype=torch.long, device=dev), seq_mask[:, 1:]], 1
        )
        out = decoder_of(m.language_model)(inputs_embeds=emb, attention_mask=full_mask)
        readout = P + lengths + 1  # index of the empty token in the full sequence
        return out.last_hidden_state[rows, readout].float()

    def _wrap(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids of the prompt's text before, the instruction, the text after."""
        B, L = ids.shape
        before = torch.tensor(self._prompt_before, dtype=torch.long, device=ids.device)
        after = torch.tensor(self._prompt_after, dtype=torch.long, device=ids.device)
        n0, n1 = len(before), len(after)
        out = torch.zeros(B, n0 + L + n1, dtype=torch.long, device=ids.device)
        out[:, :n0] = before
        out[:, n0 : n0 + L] = ids * mask
        lengths = mask.sum(1)
        cols = n0 + lengths[:, None] + torch.arange(n1, device=ids.device)[None]
        out.scatter_(1, cols, after.expand(B, -1))
        steps = torch.arange(out.shape[1], device=ids.device)[None]
        return out, (steps < (n0 + lengths + n1)[:, None]).long()

    def forward_functional(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The same features as ``forward`` (it keeps no cache), for export."""
        return self.forward(obs)
