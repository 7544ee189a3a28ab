"""The language backbone: any transformers causal LM, with optional LoRA."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

# The default: a tiny Qwen2-style decoder built locally (no download), sized for CPU RL.
TINY_QWEN2 = dict(
    model_type="qwen2",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)


def build_language_model(
    path: str | None, config: dict[str, Any] | None, vocab_size: int
) -> nn.Module:
    """A causal LM from ``path`` (from_pretrained) or from ``config`` (default: tiny Qwen2).

    ``config`` may name any transformers ``model_type`` (``llama``, ``qwen2``, ...); its keys
    override the tiny defaults when the type is qwen2.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if path is not None:
        return AutoModelForCausalLM.from_pretrained(path)
    cfg = dict(config or {})
    model_type = cfg.pop("model_type", "qwen2")
    base = dict(TINY_QWEN2) if model_type == "qwen2" else {}
    base.pop("model_type", None)
    base.update(cfg)
    base.setdefault("vocab_size", vocab_size)
    for k in ("architectures", "transformers_version", "_name_or_path"):
        base.pop(k, None)
    lm_config = AutoConfig.for_model(model_type, **base)
    return AutoModelForCausalLM.from_config(lm_config)


def apply_lora(lm: nn.Module, lora: dict[str, Any]) -> nn.Module:
    """Inject peft LoRA adapters into ``lm`` in place; returns the peft wrapper.

    Keys: ``r`` (8), ``alpha`` (16), ``dropout`` (0.0), ``target_modules`` (attention + MLP
    projections).
    """
    from peft import LoraConfig, get_peft_model

    check_lora_keys(lora)
    cfg = LoraConfig(
        r=int(lora.get("r", 8)),
        lora_alpha=int(lora.get("alpha", 16)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=lora.get(
            "target_modules",
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        bias="none",
    )
    return get_peft_model(lm, cfg)


LM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "vision")


def check_lora_keys(lora: dict[str, Any]) -> None:
    """ConfigError naming the unknown keys of a ``lora`` config and the valid ones."""
    from vla_ray.config import ConfigError

    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise ConfigError(f"lora: unknown key(s) {unknown}; valid: {', '.join(LORA_KEYS)}")


def inject_lora(module: nn.Module, lora: dict[str, Any], targets: list[str]) -> None:
    """peft LoRA adapters injected in place into ``module``'s ``targets`` (weight names keep the
    module's layout, with ``base_layer`` / ``lora_A`` / ``lora_B`` beside them)."""
    from peft import LoraConfig, inject_adapter_in_model

    check_lora_keys(lora)
    cfg = LoraConfig(
        r=int(lora.get("r", 8)),
        lora_alpha=int(lora.get("alpha", 16)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=targets,
        bias="none",
    )
    inject_adapter_in_model(cfg, module)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing of a transformers model, non-reentrant, under
    either transformers naming."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def cache_keyword(decoder: nn.Module) -> str:
    """The decoder's keyword for a KV cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (older releases, where ``cache`` does not exist)."""
    return _cache_keyword(type(decoder))


@functools.cache
def _cache_keyword(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache of a decoder output, under either transformers naming."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def decoder_of(lm: nn.Module) -> nn.Module:
    """The decoder stack (no LM head) of a causal LM or of its peft wrapper."""
    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return inner.base_model if hasattr(inner, "base_model") else inner


class RotaryTable(nn.Module):
    """A transformers rotary embedding's ``(cos, sin)`` precomputed for positions
    ``0 .. positions - 1`` and looked up by position (for export: a gather instead of the
    per-call outer product, sine and cosine). Only for the position-independent ``default``
    rope type, whose frequencies do not change with the sequence length."""

    def __init__(self, rotary: nn.Module, positions: int):
        super().__init__()
        import torch

        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"RotaryTable: rope_type must be 'default', got {rope_type!r}")
        with torch.no_grad():
            x = torch.zeros(1, dtype=rotary.inv_freq.dtype)
            cos, sin = rotary(x, torch.arange(positions)[None])
        self.register_buffer("cos", cos[0], persistent=False)
        self.register_buffer("sin", sin[0], persistent=False)

    def forward(self, x: Any, position_ids: Any) -> tuple[Any, Any]:
        return self.cos[position_ids].to(x.dtype), self.sin[position_ids].to(x.dtype)


def rotary_table_of(decoder: nn.Module) -> RotaryTable | None:
    """A ``RotaryTable`` over the decoder's ``max_position_embeddings`` for its rotary
    embedding, or None when the decoder has none of the ``default`` type."""
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", None) != "default":
        return None
    return RotaryTable(rotary, int(decoder.config.max_position_embeddings))


class DivRMSNorm(nn.Module):
    """A transformers RMSNorm (``weight``, ``variance_epsilon``) computed as
    ``weight * x / sqrt(mean(x^2) + eps)`` (for export): the division form is the pattern
    onnxruntime fuses into one ``SimplifiedLayerNormalization`` kernel, where ``rsqrt`` leaves
    seven element-wise nodes."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.eps = float(norm.variance_epsilon)

    def forward(self, x: Any) -> Any:
        import torch

        h = x.to(torch.float32)
        h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rms_norms_of(decoder: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, attribute, norm)`` for each transformers RMSNorm in the decoder."""
    found = []
    for name, module in decoder.named_modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            parent, _, attr = name.rpartition(".")
            found.append((decoder.get_submodule(parent), attr, module))
    return found
