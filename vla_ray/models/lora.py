"""LoRA adapters at training time: which parameters are adapters, switching them off, and
bf16 autocast of the trunk.

The trunks inject peft LoRA layers (``vla_ray.models.language``); this module works on any
module that holds them, whichever way they were injected (``get_peft_model`` or
``inject_adapter_in_model``), so GRPO's reference forward and the benches need no trunk-specific
code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from vla_ray.config import ConfigError

# peft's parameter names for LoRA weights (``...q_proj.lora_A.default.weight``)
ADAPTER_MARK = "lora_"


def is_adapter_param(name: str) -> bool:
    """Whether the parameter ``name`` is a LoRA adapter weight."""
    return ADAPTER_MARK in name


def lora_layers(module: nn.Module) -> list[nn.Module]:
    """The peft tuner layers (LoRA-wrapped linears) inside ``module``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` holds LoRA adapters."""
    return any(is_adapter_param(n) for n, _ in module.named_parameters())


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Within the block, every LoRA layer of ``module`` computes its base layer only (the model
    as it was before adapters: peft's ``disable_adapter()``, for adapters injected either way).

    No weight is copied or changed. The adapters' ``requires_grad`` flags (which peft switches
    off while disabled) are restored on exit, and the instruction-prefix memo of every trunk
    inside ``module`` keys on the adapter state, so no prefix cached with adapters on is reused.
    """
    from vla_ray.models.prefix import CachedPrefixTrunk

    layers = lora_layers(module)
    if not layers:
        raise ConfigError("lora: the model has no LoRA adapters to disable (set model.lora)")
    grads = {n: p.requires_grad for n, p in module.named_parameters() if is_adapter_param(n)}
    trunks = [m for m in module.modules() if isinstance(m, CachedPrefixTrunk)]
    for layer in layers:
        layer.enable_adapters(False)
    for t in trunks:
        t.adapters_off = True
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for t in trunks:
            t.adapters_off = False
        for n, p in module.named_parameters():
            if n in grads:
                p.requires_grad_(grads[n])


@torch.no_grad()
def fold_adapters(module: nn.Module) -> int:
    """Add every nonzero LoRA update ``B @ A * scale`` of ``module`` into its base weight and zero
    ``B``: the same function, with the adapters back at their initial (zero) update, so that
    disabling them gives this model. Returns the number of layers folded."""
    folded = 0
    for layer in lora_layers(module):
        for name in layer.active_adapters:
            if name not in getattr(layer, "lora_B", {}):
                continue
            b = layer.lora_B[name].weight
            if not bool(b.any()):
                continue
            base = layer.get_base_layer().weight
            base.add_(layer.get_delta_weight(name).to(base.dtype))
            b.zero_()
            folded += 1
    return folded


@contextlib.contextmanager
def parameters_replaced(module: nn.Module, replacements: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, ``module``'s parameters named in ``replacements`` are those tensors
    (the original ``Parameter`` objects are put back on exit, untouched: graphs built on them
    before the block stay valid)."""
    saved = []
    try:
        for name, value in replacements.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            saved.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        yield
    finally:
        for owner, leaf, original in reversed(saved):
            owner._parameters[leaf] = original


def autocast(mode: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bfloat16 on ``device``'s type for ``mode="bf16"``; a no-op for
    ``"none"``."""
    if mode == "none":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
