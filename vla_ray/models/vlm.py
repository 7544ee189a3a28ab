"""Integrated VLM backbones: a transformers image-text-to-text model as the VLA trunk.

``backbone="vlm"`` replaces the separate vision encoder + projector + causal LM with one
``AutoModelForImageTextToText`` (SmolVLM / Idefics3, LLaVA, PaliGemma, Qwen2-VL), loaded from a
``from_pretrained`` directory (``vlm_path``) or built from a small config of the same class
(``vlm_family`` + ``vlm_config``) for tests and CPU runs.

Each step's prompt follows the family's own chat template and image-token layout, with the
instruction text first where the template allows it::

    <template start> instruction <template middle> <image block> * cameras <template end>
    | state token | action query

The image block is the family's (Idefics3: ``<fake_token_around_image><global-img><image>*n
<fake_token_around_image>``, Qwen2-VL: ``<|vision_start|><|image_pad|>*n<|vision_end|>``, LLaVA:
``<image>*n``); images go through the family's image processor and vision tower, and their
features replace the image tokens' embeddings. The action readout is the language model's last
hidden state at a learned action query token, as in the default trunk.

When the instruction comes before the first image (every family here but PaliGemma, whose
layout puts the image tokens first), the text before the image is an instruction prefix: its
key/value cache is computed once per distinct instruction and reused, as the default trunk does.
PaliGemma runs the whole sequence every step, with its own attention pattern (bidirectional over
the image + prompt prefix, causal over the state token and the action query).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vla_ray.config import ConfigError, VLAConfig
from vla_ray.models.language import (
    LM_LORA_TARGETS,
    cache_keyword,
    enable_activation_checkpointing,
    inject_lora,
    output_cache,
)
from vla_ray.models.prefix import CachedPrefixTrunk, Prefix

# the instruction's place in the rendered chat template
_INSTRUCTION_MARK = "\x01INSTRUCTION\x01"
# tiny text decoder shared by the families' small configs (sized like the default trunk's LM)
_TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
# LoRA targets of the vision towers (SigLIP/CLIP: q/k/v/out_proj, fc1/fc2; Qwen2-VL: qkv, proj)
VISION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "qkv", "proj", "fc1", "fc2")
_TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
)


@dataclass(frozen=True)
class VLMFamily:
    """What differs between VLM architectures: config, tokens, prompt layout and image inputs."""

    name: str
    model_types: tuple[str, ...]
    # special tokens a tiny tokenizer needs (the project tokenizer already has ``<image>``)
    special_tokens: tuple[str, ...]
    # the text one image takes in the rendered template, and the token layout it expands to
    image_marker: str
    image_block: Callable[[int], str]
    chat_template: str | None
    tiny_config: Callable[[int, int, dict[str, Any]], Any]
    tiny_image_processor: Callable[[int, Any], Any]
    # the processor's batch layout: one list of images per sample (Idefics3) or a flat list
    nested_images: bool = False
    # the image placeholder token, and config fields that hold other special tokens' ids
    image_token: str = "<image>"
    token_ids: tuple[tuple[str, str], ...] = ()
    # image features are placed with 3-D (temporal, height, width) rotary positions (Qwen2-VL)
    mrope: bool = False
    extra_image_inputs: tuple[str, ...] = field(default=())


def _patch(image_size: int, cfg: dict[str, Any]) -> int:
    """Patch size of a small config: 8 x 8 patches whatever the image size (at 32 px, patch 8
    left 16 patches and PPO on one-target LangReach barely learned: docs/benchmarks.md)."""
    return int(cfg.get("patch_size", max(2, image_size // 8)))


def _idefics3_config(cls_name: str):
    def build(image_size: int, vocab: int, over: dict[str, Any]):
        import transformers

        cfg = dict(over)
        text = {**_TINY_TEXT, "model_type": "llama", **cfg.pop("text_config", {})}
        vision = {
            **_TINY_VISION,
            "image_size": image_size,
            "patch_size": _patch(image_size, cfg),
            **cfg.pop("vision_config", {}),
        }
        cfg.pop("patch_size", None)
        text.setdefault("vocab_size", vocab)
        return getattr(transformers, cls_name)(
            text_config=text, vision_config=vision, **{"scale_factor": 2, **cfg}
        )

    return build


def _idefics3_processor(cls_name: str):
    def build(image_size: int, config: Any):
        import transformers

        size = {"longest_edge": image_size}
        return getattr(transformers, cls_name)(
            do_image_splitting=False, size=size, max_image_size=size
        )

    return build


def _llava_config(image_size: int, vocab: int, over: dict[str, Any]):
    import transformers

    cfg = dict(over)
    text = {**_TINY_TEXT, "model_type": "llama", **cfg.pop("text_config", {})}
    text.setdefault("vocab_size", vocab)
    vision = {
        **_TINY_VISION,
        "model_type": "clip_vision_model",
        "image_size": image_size,
        "patch_size": _patch(image_size, cfg),
        **cfg.pop("vision_config", {}),
    }
    cfg.pop("patch_size", None)
    return transformers.LlavaConfig(
        text_config=text,
        vision_config=vision,
        **{"vision_feature_layer": -2, "vision_feature_select_strategy": "default", **cfg},
    )


def _clip_processor(image_size: int, config: Any):
    import transformers

    return transformers.CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def _paligemma_config(image_size: int, vocab: int, over: dict[str, Any]):
    import transformers

    cfg = dict(over)
    text = {**_TINY_TEXT, "model_type": "gemma", "head_dim": 16, **cfg.pop("text_config", {})}
    text.setdefault("vocab_size", vocab)
    vision = {
        **_TINY_VISION,
        "image_size": image_size,
        "patch_size": _patch(image_size, cfg),
        **cfg.pop("vision_config", {}),
    }
    cfg.pop("patch_size", None)
    return transformers.PaliGemmaConfig(
        text_config=text,
        vision_config=vision,
        **{"projection_dim": text["hidden_size"], "hidden_size": text["hidden_size"], **cfg},
    )


def _siglip_processor(image_size: int, config: Any):
    import transformers

    return transformers.SiglipImageProcessorPil(size={"height": image_size, "width": image_size})


def _qwen2_vl_config(image_size: int, vocab: int, over: dict[str, Any]):
    import transformers

    cfg = dict(over)
    text = {
        **_TINY_TEXT,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        **cfg.pop("text_config", {}),
    }
    text.setdefault("vocab_size", vocab)
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": text["hidden_size"],
        "num_heads": 2,
        "patch_size": _patch(image_size, cfg),
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        **cfg.pop("vision_config", {}),
    }
    cfg.pop("patch_size", None)
    return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **cfg)


def _qwen2_vl_processor(image_size: int, config: Any):
    import transformers

    v = config.vision_config
    side = image_size - image_size % (v.patch_size * v.spatial_merge_size)
    return transformers.Qwen2VLImageProcessorPil(
        min_pixels=side * side,
        max_pixels=side * side,
        patch_size=v.patch_size,
        merge_size=v.spatial_merge_size,
        temporal_patch_size=v.temporal_patch_size,
    )


# Minimal chat templates for the tiny tokenizers, in the shape of each family's published one.
_SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %} {{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _idefics3_family(name: str, cls_prefix: str) -> VLMFamily:
    """SmolVLM and Idefics3 share their token layout, template and processor (``cls_prefix``
    names the transformers classes: ``{prefix}Config``, ``{prefix}ImageProcessorPil``)."""
    return VLMFamily(
        name=name,
        model_types=(name,),
        special_tokens=(
            "<|im_start|>",
            "<end_of_utterance>",
            "<fake_token_around_image>",
            "<global-img>",
        ),
        image_marker="<image>",
        image_block=lambda n: (
            "<fake_token_around_image><global-img>" + "<image>" * n + "<fake_token_around_image>"
        ),
        chat_template=_SMOLVLM_TEMPLATE,
        tiny_config=_idefics3_config(f"{cls_prefix}Config"),
        tiny_image_processor=_idefics3_processor(f"{cls_prefix}ImageProcessorPil"),
        nested_images=True,
        extra_image_inputs=("pixel_attention_mask",),
    )


FAMILIES: dict[str, VLMFamily] = {
    f.name: f
    for f in (
        _idefics3_family("smolvlm", "SmolVLM"),
        _idefics3_family("idefics3", "Idefics3"),
        VLMFamily(
            name="llava",
            model_types=("llava",),
            special_tokens=(),
            image_marker="<image>",
            image_block=lambda n: "<image>" * n,
            chat_template=_LLAVA_TEMPLATE,
            tiny_config=_llava_config,
            tiny_image_processor=_clip_processor,
        ),
        VLMFamily(
            name="paligemma",
            model_types=("paligemma",),
            special_tokens=(),
            image_marker="<image>",
            image_block=lambda n: "<image>" * n,
            chat_template=None,  # no chat template: image tokens, BOS, prompt, newline
            tiny_config=_paligemma_config,
            tiny_image_processor=_siglip_processor,
        ),
        VLMFamily(
            name="qwen2_vl",
            model_types=("qwen2_vl",),
            special_tokens=(
                "<|im_start|>",
                "<|im_end|>",
                "<|vision_start|>",
                "<|vision_end|>",
                "<|image_pad|>",
            ),
            image_marker="<|vision_start|><|image_pad|><|vision_end|>",
            image_block=lambda n: "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>",
            chat_template=_QWEN2_VL_TEMPLATE,
            tiny_config=_qwen2_vl_config,
            image_token="<|image_pad|>",
            token_ids=(
                ("vision_start_token_id", "<|vision_start|>"),
                ("vision_end_token_id", "<|vision_end|>"),
            ),
            tiny_image_processor=_qwen2_vl_processor,
            mrope=True,
            extra_image_inputs=("image_grid_thw",),
        ),
    )
}
VLM_FAMILIES = tuple(FAMILIES)


def family_of_directory(path: str | Path) -> str:
    """The family of a ``from_pretrained`` VLM directory, from its ``config.json``'s model_type.

    ConfigError naming the directory's ``model_type``/``architectures`` and the supported
    families for any other architecture.
    """
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"vlm_path: {path} has no config.json (expected a from_pretrained VLM)")
    data = json.loads(cfg_file.read_text())
    model_type = data.get("model_type")
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam.name
    raise ConfigError(
        f"vlm_path: {path} holds model_type={model_type!r} "
        f"(architectures={data.get('architectures')}), which is not a supported VLM family; "
        f"supported: {', '.join(VLM_FAMILIES)}"
    )


def vlm_tokenizer(config: VLAConfig):
    """The VLM's tokenizer: the checkpoint's own (``tokenizer_path`` or ``vlm_path``), else the
    project tokenizer extended with the family's special tokens and a chat template (existing
    ids unchanged, so envs that encode with the project tokenizer stay valid)."""
    from vla_ray.tokenizer import load_tokenizer

    path = config.tokenizer_path or config.vlm_path
    tok = load_tokenizer(path)
    fam = FAMILIES[config.vlm_family]
    if path is None:
        # a copy: load_tokenizer's instances are cached and shared by every model and env of
        # the process (adding tokens to it changed their vocabulary size)
        tok = copy.deepcopy(tok)
        if fam.special_tokens:
            tok.add_special_tokens({"additional_special_tokens": list(fam.special_tokens)})
        if fam.chat_template is not None:
            tok.chat_template = fam.chat_template
    return tok


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``VLAConfig.dtype`` name."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def build_vlm(config: VLAConfig, tokenizer: Any) -> nn.Module:
    """The image-text-to-text model: ``from_pretrained(vlm_path)`` or a small config of the
    family's class (``vlm_config`` overrides its keys: ``text_config``, ``vision_config``...),
    whose special-token ids are the tokenizer's."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    fam = FAMILIES[config.vlm_family]
    dtype = torch_dtype(config.dtype)
    if config.vlm_path is not None:
        return AutoModelForImageTextToText.from_pretrained(config.vlm_path, dtype=dtype)
    over = dict(config.vlm_config)
    if "model_type" in over:  # a saved (portable) config: rebuild it exactly
        hf_config = AutoConfig.for_model(**over)
    else:
        ids = {"image_token_id": tokenizer.convert_tokens_to_ids(fam.image_token)}
        ids.update({k: tokenizer.convert_tokens_to_ids(t) for k, t in fam.token_ids})
        text = {
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            **over.pop("text_config", {}),
        }
        hf_config = fam.tiny_config(
            min(config.image_size), len(tokenizer), {**ids, "text_config": text, **over}
        )
    return AutoModelForImageTextToText.from_config(hf_config, dtype=dtype)


class VLMTrunk(CachedPrefixTrunk):
    """An integrated VLM as the VLA trunk: observation dict -> features (B, F)."""

    def __init__(self, config: VLAConfig, tokenizer: Any):
        super().__init__()
        self.config = config
        self.family = FAMILIES[config.vlm_family]
        self.vlm = build_vlm(config, tokenizer)
        if config.lora:
            self._apply_lora(config.lora)
        base = self.vlm.model
        self.decoder = base.get_decoder()
        self.vision = _first_attr(base, ("vision_model", "vision_tower", "visual"))
        self.projector = _first_attr(base, ("connector", "multi_modal_projector"))
        if self.projector is None and hasattr(self.vision, "merger"):
            self.projector = self.vision.merger
        d = int(self.decoder.config.hidden_size)
        self.hidden_size = d
        self.num_cameras = config.num_cameras
        self.image_processor = self._image_processor(config)
        self.state_proj = nn.Linear(config.state_dim, d) if config.state_dim > 0 else None
        mean, std = config.state_mean, config.state_std
        self.register_buffer(
            "state_mean", None if mean is None else torch.tensor(mean), persistent=False
        )
        self.register_buffer(
            "state_std", None if std is None else torch.tensor(std), persistent=False
        )
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.feature_dim = d + (config.state_dim if config.state_skip else 0)
        self._layout(tokenizer)
        self._set_trainable(config)
        if config.gradient_checkpointing:
            enable_activation_checkpointing(self.vlm)
        self._checkpointing = bool(config.gradient_checkpointing)

    # ---- construction -------------------------------------------------------------------------
    def _apply_lora(self, lora: dict[str, Any]) -> None:
        """LoRA adapters (peft) in the language model, and in the vision tower with
        ``lora["vision"]``; injected in place, so weight names keep the VLM's layout."""
        base = self.vlm.model
        try:
            inject_lora(base.get_decoder(), lora, list(lora.get("target_modules", LM_LORA_TARGETS)))
            if lora.get("vision"):
                vision = _first_attr(base, ("vision_model", "vision_tower", "visual"))
                names = {n.rsplit(".", 1)[-1] for n, _ in vision.named_modules()}
                targets = [t for t in VISION_LORA_TARGETS if t in names]
                inject_lora(vision, lora, targets)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _set_trainable(self, config: VLAConfig) -> None:
        lora = bool(config.lora)
        for name, p in self.vlm.named_parameters():
            p.requires_grad_(("lora_" in name) if lora else True)
        if not lora and config.freeze_llm:
            self.decoder.requires_grad_(False)
        if config.freeze_vision and self.vision is not None:
            for name, p in self.vision.named_parameters():
                if not name.startswith("merger."):
                    p.requires_grad_(False)
        if config.freeze_projector and self.projector is not None:
            self.projector.requires_grad_(False)
        # the LM head is not used for the action readout
        out = self.vlm.get_output_embeddings()
        if out is not None and out.weight is not self.decoder.get_input_embeddings().weight:
            out.requires_grad_(False)

    def _image_processor(self, config: VLAConfig):
        """The checkpoint's own image processor (a saved VLA's, else ``vlm_path``'s), or the
        family's built for a small config."""
        path = config.image_processor_path or config.vlm_path
        if path is not None:
            from transformers import AutoImageProcessor

            return AutoImageProcessor.from_pretrained(path)
        vision_size = getattr(self.vlm.config.vision_config, "image_size", None)
        return self.family.tiny_image_processor(
            int(vision_size or min(config.image_size)), self.vlm.config
        )

    def _layout(self, tokenizer: Any) -> None:
        """Token ids of the fixed prompt parts, image-token counts and suffix positions."""
        fam = self.family
        self.image_token_id = int(self.vlm.config.image_token_id)
        with torch.no_grad():  # one image through the processor and the tower
            probe = self._pixels(np.zeros((1, *self.config.image_size, 3), dtype=np.uint8))
            self.tokens_per_image = self._image_features(probe, 1).shape[1]
        block = fam.image_block(self.tokens_per_image)
        if fam.chat_template is None:
            # PaliGemma: image tokens, BOS, prompt, newline
            bos = tokenizer.bos_token or ""
            pre, mid, post = "", bos, "\n"
            images_first = True
        else:
            content = [{"type": "text", "text": _INSTRUCTION_MARK}]
            content += [{"type": "image"}] * self.num_cameras
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}],
                add_generation_prompt=True,
                tokenize=False,
            )
            pre, rest = text.split(_INSTRUCTION_MARK)
            first = rest.index(fam.image_marker)
            mid, images_and_post = rest[:first], rest[first:]
            post = images_and_post.replace(fam.image_marker, "", self.num_cameras)
            images_first = False
        self.images_first = images_first

        def ids(s: str) -> list[int]:
            return tokenizer(s, add_special_tokens=False)["input_ids"] if s else []

        block_ids = ids(block)
        n_img = sum(1 for t in block_ids if t == self.image_token_id)
        if n_img != self.tokens_per_image:
            raise ConfigError(
                f"vlm_family {fam.name!r}: the tokenizer splits the image block into {n_img} "
                f"image tokens, the vision tower gives {self.tokens_per_image}"
            )
        images = block_ids * self.num_cameras
        if images_first:  # images, then BOS + instruction + newline (see _full)
            self.prefix_ids: list[int] = ids(mid)
            self.mid_ids = []
            self.suffix_text_ids = images
            self.post_ids = ids(post)
        else:
            self.prefix_ids = ids(pre)
            self.mid_ids = ids(mid)
            self.suffix_text_ids = images + ids(post)
            self.post_ids = []
        n_extra = (1 if self.state_proj is not None else 0) + 1
        suffix = torch.tensor(self.suffix_text_ids + [0] * n_extra)
        self.register_buffer("suffix_ids", suffix, persistent=False)
        rel = self._relative_positions(suffix, probe.get("image_grid_thw"))
        self.register_buffer("suffix_rel_pos", rel, persistent=False)

    def _relative_positions(self, suffix: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
        """Positions of the suffix tokens relative to its first: (S,), or (3, S) for mrope,
        from the patch grid the image processor gives one image (``grid`` (1, 3))."""
        if not self.family.mrope:
            return torch.arange(len(suffix))
        is_image = (suffix == self.image_token_id).long()[None]
        pos, _ = self.vlm.model.get_rope_index(
            suffix[None],
            is_image,
            image_grid_thw=grid.repeat(self.num_cameras, 1),
            attention_mask=None,
        )
        return pos[:, 0]

    # ---- images -------------------------------------------------------------------------------
    def _pixels(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        """uint8 (B, N, H, W, 3) or (B, H, W, 3) -> the image processor's tensors."""
        if images.ndim == 4:
            images = images[:, None]
        B, N = images.shape[:2]
        if self.family.nested_images:
            arg = [[images[b, n] for n in range(N)] for b in range(B)]
        else:
            arg = [images[b, n] for b in range(B) for n in range(N)]
        out = self.image_processor(arg, return_tensors="pt")
        keep = ("pixel_values", *self.family.extra_image_inputs)
        return {k: v for k, v in out.items() if k in keep}

    def _image_features(self, pixels: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
        """Projected image features (B, N * tokens_per_image, d) in the LM's embedding space."""
        out = self.vlm.model.get_image_features(**pixels).pooler_output
        # a tensor (B*N, n, d) (PaliGemma), or one (n, d) per image (LLaVA, Qwen2-VL) or per
        # sample (Idefics3: its N images' tokens in a row)
        feats = out if torch.is_tensor(out) else torch.stack(list(out))
        return feats.reshape(batch, -1, feats.shape[-1])

    # ---- prefix (instruction) -----------------------------------------------------------------
    def _prefix_params(self) -> list[nn.Parameter]:
        return list(self.decoder.parameters())

    def _text_embeds(self, ids: list[int], B: int, like: torch.Tensor) -> torch.Tensor:
        t = torch.tensor(ids, dtype=torch.long, device=like.device)
        return self.decoder.get_input_embeddings()(t)[None].expand(B, -1, -1)

    def _instruction_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Attention mask of [template start] instruction [template middle]."""
        ones = torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=mask.device)
        return torch.cat(
            [ones.expand(-1, len(self.prefix_ids)), mask, ones.expand(-1, len(self.mid_ids))], 1
        )

    def _instruction_part(
        self, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and mask of [template start] instruction [template middle]."""
        B = ids.shape[0]
        emb = self.decoder.get_input_embeddings()(ids)
        pre = self._text_embeds(self.prefix_ids, B, ids)
        mid = self._text_embeds(self.mid_ids, B, ids)
        return torch.cat([pre, emb, mid], dim=1), self._instruction_mask(mask)

    def _encode_prefix(self, ids: torch.Tensor, mask: torch.Tensor) -> Prefix:
        emb, m = self._instruction_part(ids, mask)
        pos = (m.cumsum(1) - 1).clamp(min=0)
        out = self.decoder(inputs_embeds=emb, attention_mask=m, position_ids=pos, use_cache=True)
        h = out.last_hidden_state
        w = m.unsqueeze(-1).to(h.dtype)
        context = (h * w).sum(1) / w.sum(1)
        kv = [(layer.keys, layer.values) for layer in output_cache(out).layers]
        return Prefix(kv, context)

    # ---- full trunk ---------------------------------------------------------------------------
    def _suffix_embeds(self, obs: Mapping[str, torch.Tensor], B: int) -> torch.Tensor:
        """Image blocks, the template's end, the state token and the action query."""
        images = obs["images"] if self.num_cameras > 1 else obs["image"]
        pixels = self._pixels(images.cpu().numpy())
        dev = self.query.device
        pixels = {k: v.to(dev) for k, v in pixels.items()}
        feats = self._image_features(pixels, B)
        text_ids = self.suffix_ids[: len(self.suffix_text_ids)]
        emb = self.decoder.get_input_embeddings()(text_ids)[None].expand(B, -1, -1).clone()
        slots = (text_ids == self.image_token_id).nonzero().squeeze(-1)
        emb[:, slots] = feats.to(emb.dtype)
        parts = [emb]
        if self.state_proj is not None:
            parts.append(self.state_proj(self._state(obs))[:, None].to(emb.dtype))
        parts.append(self.query.expand(B, -1, -1).to(emb.dtype))
        return torch.cat(parts, dim=1)

    def _state(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        state = obs["state"].float()
        if self.state_mean is not None:
            state = (state - self.state_mean) / self.state_std
        return state

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Features (B, F); the instruction prefix is cached when it comes before the images
        (and no gradient checkpointing is running, which needs the whole sequence)."""
        from vla_ray.models.vla import validate_observation

        validate_observation(obs, self.config)
        mask = obs["instruction_mask"].long()
        ids = obs["instruction"].long() * mask
        checkpointing = self._checkpointing and self.training
        if self.images_first or (checkpointing and torch.is_grad_enabled()):
            return self._full(obs, ids, mask)
        return self._with_prefix(obs, self.prefix(ids, mask), mask)

    def forward_functional(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The same features as ``forward``, the whole sequence in one pass (no cache)."""
        mask = obs["instruction_mask"].long()
        return self._full(obs, obs["instruction"].long() * mask, mask)

    def _suffix_positions(self, start: torch.Tensor) -> torch.Tensor:
        """Positions of the suffix tokens after ``start`` (B, 1) prompt tokens."""
        rel = self.suffix_rel_pos
        return start[None] + rel[:, None] if rel.ndim == 2 else start + rel[None]

    def _with_prefix(
        self, obs: Mapping[str, torch.Tensor], prefix: Prefix, mask: torch.Tensor
    ) -> torch.Tensor:
        from transformers import DynamicCache

        B = mask.shape[0]
        suffix = self._suffix_embeds(obs, B)
        cache = DynamicCache()
        for li, (k, v) in enumerate(prefix.kv):
            cache.update(k, v, li)
        pm = self._instruction_mask(mask)
        ones = torch.ones(B, suffix.shape[1], dtype=pm.dtype, device=pm.device)
        out = self.decoder(
            inputs_embeds=suffix,
            attention_mask=torch.cat([pm, ones], 1),
            position_ids=self._suffix_positions(pm.sum(1, keepdim=True)),
            use_cache=True,
            **{cache_keyword(self.decoder): cache},
        )
        return self._features(out.last_hidden_state, obs)

    def _full(
        self, obs: Mapping[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The whole prompt + state + query in one pass."""
        B = ids.shape[0]
        suffix = self._suffix_embeds(obs, B)
        text, tm = self._instruction_part(ids, mask)
        if not self.images_first:  # [template, instruction] [images, template end, state, query]
            emb = torch.cat([text, suffix.to(text.dtype)], dim=1)
            ones = torch.ones(B, suffix.shape[1], dtype=tm.dtype, device=tm.device)
            m = torch.cat([tm, ones], dim=1)
            text_pos = (tm.cumsum(1) - 1).clamp(min=0)
            suffix_pos = self._suffix_positions(tm.sum(1, keepdim=True))
            if suffix_pos.ndim == 3:
                text_pos = text_pos[None].expand(3, -1, -1)
            pos = torch.cat([text_pos, suffix_pos], dim=-1)
            out = self.decoder(
                inputs_embeds=emb, attention_mask=m, position_ids=pos, use_cache=False
            )
            return self._features(out.last_hidden_state, obs)
        # PaliGemma: images, BOS + instruction, newline | state, query. 1-indexed positions;
        # bidirectional attention over the prompt, causal over the state token and the query,
        # as the model was trained
        from transformers.masking_utils import create_causal_mask

        n_img = len(self.suffix_text_ids)
        post = self._text_embeds(self.post_ids, B, ids).to(text.dtype)
        emb = torch.cat([suffix[:, :n_img], text, post, suffix[:, n_img:]], dim=1)
        n_prompt = emb.shape[1] - (suffix.shape[1] - n_img)
        ones = torch.ones(B, emb.shape[1], dtype=tm.dtype, device=tm.device)
        m = torch.cat([ones[:, :n_img], tm, ones[:, n_img + tm.shape[1] :]], dim=1)
        pos = m.cumsum(1)
        block = torch.zeros_like(m)
        block[:, n_prompt:] = -1
        attention = create_causal_mask(
            config=self.decoder.config,
            inputs_embeds=emb,
            attention_mask=m,
            cache=None,
            position_ids=pos,
            block_sequence_ids=block,
        )
        out = self.decoder(
            inputs_embeds=emb, attention_mask=attention, position_ids=pos, use_cache=False
        )
        return self._features(out.last_hidden_state, obs)

    def _features(self, hidden: torch.Tensor, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        feats = [hidden[:, -1].float()]
        if self.config.state_skip and self.state_proj is not None:
            feats.append(self._state(obs))
        return torch.cat(feats, dim=-1)

    # ---- persistence --------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """The VLM's full transformers config (rebuilds the same architecture offline)."""
        return self.vlm.config.to_dict()


def _first_attr(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for n in names:
        sub = getattr(module, n, None)
        if isinstance(sub, nn.Module):
            return sub
    return None
