"""Export a VLA's deterministic inference path for deployment.

``export(checkpoint, formats, output)`` writes one folder per format, each self-contained: the
model file(s), ``spec.json`` (input/output names, dtypes and shapes, action bounds, chunk size,
normalisation, parity result) and ``tokenizer/``, so a client needs nothing else::

    OUTPUT/
      export.json                  summary: source, model version, per-format parity
      README.md                    model card (Hugging Face front matter; pytorch/ has its own)
      pytorch/                     VLA.save_pretrained copy (the eager reference; Serve's torch backend)
      onnx/model.onnx              torch.onnx (dynamo) graph, run with onnxruntime
      onnx-int8/model.onnx         onnxruntime dynamic INT8 quantisation (weights int8)
      onnx-fp16/model.onnx         float16 weights/activations, float32 inputs and outputs
      torchscript/model.pt         torch.jit.trace of the same graph
      torch-export/model.pt2       torch.export ExportedProgram (TorchScript's successor)
      openvino/model.xml + .bin    OpenVINO IR (optional extra: pip install 'vla-ray[openvino]')
      triton/vla/config.pbtxt      a Triton model repository (onnxruntime backend, dynamic batching,
                                   CPU or GPU instance group)
      triton/vla/1/model.onnx

The exported graph is a plain function of its inputs: observation tensors (``image`` uint8
(B, H, W, 3), ``state`` float32 (B, S), ``instruction`` / ``instruction_mask`` int64 (B, L)) and,
for heads that sample from noise (``diffusion``: DDIM; ``flow_matching``: Euler steps, unrolled),
the initial ``noise`` float32 (B, K*A) (zeros = the deterministic action) -> ``actions`` float32 (B, K, A). The batch axis is dynamic. The trunk's memoised
instruction-prefix cache is not part of the graph (``VLATrunk.forward_functional``); parity against
the memoised PyTorch module is checked for every format on random valid inputs.

The ``onnx`` folder of a ``VLATrunk`` policy also holds the model split in two graphs, so that a
runner can keep the eager module's instruction-prefix cache: ``prefix.onnx`` (``instruction``,
``instruction_mask`` -> ``context`` and each layer's ``past_key_I`` / ``past_value_I``) and
``suffix.onnx`` (the other inputs, ``instruction_mask`` and the prefix's outputs -> ``actions``);
``spec.json``'s ``prefix_cache`` names them and ``vla_ray.runtime.PrefixCachedOnnxRunner`` runs
them (checked for parity like every format, with repeated instructions hitting the cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vla_ray.config import VLAConfig
from vla_ray.fsutil import replace_dir
from vla_ray.model_card import find_eval, write_model_card
from vla_ray.models.heads import takes_noise
from vla_ray.models.language import DivRMSNorm, decoder_of, rms_norms_of, rotary_table_of
from vla_ray.models.prefix import Prefix
from vla_ray.models.projectors import AttentionPoolProjector, FoldedAttentionPool
from vla_ray.models.vision import CNNEncoder, FoldedStemCNN
from vla_ray.models.vla import VLA, WEIGHTS_NAME, VLATrunk

# what runs an export needs without torch (the serving replicas) lives in vla_ray.runtime
from vla_ray.runtime import (  # noqa: F401  (re-exported: the export API)
    EXPORT_FORMATS,
    ONNX_FAMILY,
    PREFIX_CACHE_KEY,
    PYTORCH_DIR,
    SPEC_NAME,
    SUMMARY_NAME,
    TOKENIZER_DIR,
    ExportError,
    OnnxRunner,
    OpenVINORunner,
    PrefixCachedOnnxRunner,
    TorchExportRunner,
    import_openvino,
    onnx_runner,
    read_spec,
)
from vla_ray.tokenizer import save_tokenizer

TRITON_MODEL_NAME = "vla"
OUTPUT_NAME = "actions"

# Maximum absolute difference to the PyTorch module's actions that parity accepts, as a fraction
# of the action range (high - low); fp32 formats use an absolute 1e-4 (the bar). INT8
# dynamic quantisation rounds every weight matrix to 8 bits and every activation to a per-tensor
# uint8 scale, which moves a random model's actions by ~1% of the range; FP16 by ~0.05%.
FP32_TOLERANCE = 1e-4
QUANTISED_TOLERANCE = {"onnx-int8": 0.05, "onnx-fp16": 0.005}

PYTORCH_RUNTIME = "vla_ray.models.vla.VLA.from_pretrained(folder)"
TRITON_KINDS = ("KIND_CPU", "KIND_GPU")
_TRITON_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "int64": "TYPE_INT64"}

Inputs = dict[str, np.ndarray]


# ---- the exported function ----------------------------------------------------------------------
def input_names(config: VLAConfig) -> list[str]:
    """Names of the exported graph's inputs, in order."""
    names = ["image"] if config.vision != "none" else []
    if config.state_dim > 0:
        names.append("state")
    names += ["instruction", "instruction_mask"]
    if takes_noise(config.head):
        names.append("noise")
    return names


class InferenceGraph(nn.Module):
    """The deterministic inference path of a VLA as a function of plain tensors (for export).

    ``forward(*inputs)`` takes the tensors named by ``input_names(config)`` and returns the action
    chunk (B, K, A). It uses ``VLATrunk.forward_functional``: no prefix memo, no deduplication.
    """

    def __init__(self, vla: VLA):
        super().__init__()
        self.vla = vla
        self.names = input_names(vla.config)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.names, inputs, strict=True))
        features = self.vla.trunk.forward_functional(named)
        if "noise" in named:
            return self.vla.head.sample(features, named["noise"])
        return self.vla.head.predict(features, deterministic=True)


def prefix_output_names(num_layers: int) -> list[str]:
    """Outputs of the exported prefix encoder: the pooled context, then per decoder layer its
    keys and values."""
    names = ["context"]
    for i in range(num_layers):
        names += [f"past_key_{i}", f"past_value_{i}"]
    return names


class PrefixGraph(nn.Module):
    """The trunk's instruction-prefix encoder as a function of plain tensors (for export):
    ``forward(instruction, instruction_mask) -> (context, past_key_0, past_value_0, ...)``."""

    names = ["instruction", "instruction_mask"]

    def __init__(self, vla: VLA):
        super().__init__()
        self.vla = vla

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ids, mask = inputs[0], inputs[1].long()
        prefix = self.vla.trunk._encode_prefix(ids.long() * mask, mask)
        return (prefix.context, *(t for kv in prefix.kv for t in kv))


class SuffixGraph(nn.Module):
    """The rest of the inference path given an encoded prefix (for export): the inputs of
    ``InferenceGraph`` less ``instruction``, with the prefix's outputs before ``noise``."""

    def __init__(self, vla: VLA, num_layers: int):
        super().__init__()
        self.vla = vla
        self.num_layers = num_layers
        obs = [n for n in input_names(vla.config) if n not in ("instruction", "noise")]
        noise = ["noise"] if takes_noise(vla.config.head) else []
        self.names = obs + prefix_output_names(num_layers) + noise

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.names, inputs, strict=True))
        kv = [(named[f"past_key_{i}"], named[f"past_value_{i}"]) for i in range(self.num_layers)]
        features = self.vla.trunk._suffix(named, Prefix(kv, named["context"]))
        if "noise" in named:
            return self.vla.head.sample(features, named["noise"])
        return self.vla.head.predict(features, deterministic=True)


def reference_actions(vla: VLA, inputs: Inputs) -> np.ndarray:
    """The PyTorch module's actions (B, K, A) for ``inputs`` (memoised trunk, the eager path)."""
    obs = {k: torch.as_tensor(v) for k, v in inputs.items() if k != "noise"}
    with torch.no_grad():
        features = vla.features(obs)
        if "noise" in inputs:
            out = vla.head.sample(features, torch.as_tensor(inputs["noise"]))
        else:
            out = vla.head.predict(features, deterministic=True)
    return out.cpu().numpy()


def random_inputs(config: VLAConfig, vocab_size: int, batch: int, seed: int = 0) -> Inputs:
    """Random valid inputs: uint8 images, normal states, random token ids of random lengths
    (right-padded with id 0, mask 1 on the tokens) and normal noise for heads that take it."""
    rng = np.random.default_rng(seed)
    h, w = config.image_size
    L = config.instruction_max_length
    lengths = rng.integers(1, L + 1, size=batch)
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int64)
    out: Inputs = {}
    if config.vision != "none":
        out["image"] = rng.integers(0, 256, size=(batch, h, w, 3), dtype=np.uint8)
    if config.state_dim > 0:
        out["state"] = rng.normal(size=(batch, config.state_dim)).astype(np.float32)
    out["instruction"] = rng.integers(1, vocab_size, size=(batch, L)).astype(np.int64) * mask
    out["instruction_mask"] = mask
    if takes_noise(config.head):
        shape = (batch, config.chunk_size * config.action_dim)
        out["noise"] = rng.normal(size=shape).astype(np.float32)
    return {k: out[k] for k in input_names(config)}


def zero_noise(spec: dict[str, Any], batch: int) -> np.ndarray | None:
    """The deterministic noise input (zeros) for ``batch`` rows, or None without a noise input."""
    for item in spec["inputs"]:
        if item["name"] == "noise":
            return np.zeros((batch, *item["shape"][1:]), dtype=np.float32)
    return None


# ---- runners (load an exported format and call it on numpy inputs) ------------------------------
class TorchScriptRunner:
    """A ``torch.jit`` model saved by the export."""

    def __init__(self, path: str | Path, names: list[str], threads: int | None = None):
        if threads:
            torch.set_num_threads(int(threads))
        self.module = torch.jit.load(str(path)).eval()
        self.names = names

    def __call__(self, inputs: Inputs) -> np.ndarray:
        with torch.no_grad():
            return self.module(*(torch.as_tensor(inputs[k]) for k in self.names)).numpy()


def load_runner(format_dir: str | Path, threads: int = 1) -> Callable[[Inputs], np.ndarray]:
    """A callable ``inputs -> actions (B, K, A)`` for an exported format folder (by its spec)."""
    format_dir = Path(format_dir)
    spec = read_spec(format_dir)
    fmt = spec["format"]
    if fmt not in FORMATS:
        raise ExportError(
            f"{format_dir}: format {fmt!r} has no runner; runnable: {', '.join(FORMATS)}"
        )
    if fmt in ONNX_FAMILY:  # the prefix-cached split graphs where the spec names them
        return onnx_runner(format_dir, spec, threads)
    names = [i["name"] for i in spec["inputs"]]
    return FORMATS[fmt].load(format_dir / spec["model_file"], names, threads)


def parse_formats(formats: str | Iterable[str]) -> list[str]:
    """``"onnx,triton"`` or a list -> validated, de-duplicated format names in the given order."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    names = [f.strip() for f in items if f.strip()]
    unknown = [f for f in names if f not in EXPORT_FORMATS]
    if unknown or not names:
        raise ExportError(
            f"format: unknown {unknown or 'empty list'}; valid formats are {', '.join(EXPORT_FORMATS)}"
        )
    return list(dict.fromkeys(names))


# ---- spec ---------------------------------------------------------------------------------------
def instruction_spec(tok: Any, max_tokens: int) -> dict[str, Any]:
    """The spec's ``instruction`` block: how a client tokenises the instruction for the graph."""
    return {
        "max_tokens": max_tokens,
        "tokenizer": TOKENIZER_DIR,
        "add_special_tokens": False,
        "padding": "right",
        "pad_token_id": int(tok.pad_token_id or 0),
        "vocab_size": len(tok),
    }


def _normalisation(vla: VLA) -> dict[str, Any]:
    from vla_ray.models.vision import _NORM

    vision = vla.trunk.vision
    norm: dict[str, Any] = {
        "state": {"applied": "none", "note": "raw env state, as the policy was trained on"},
        "actions": {"applied": "none", "note": "actions are in [low, high] of the action space"},
    }
    cfg = vla.config
    if cfg.state_mean is not None:
        norm["state"] = {
            "applied": "inside the model",
            "steps": "(state - mean) / std per dimension; send the raw env state",
            "mean": list(cfg.state_mean),
            "std": list(cfg.state_std),
        }
    if vision is None:  # state-only VLA
        return norm
    processor = getattr(vla.trunk, "image_processor", None)
    if processor is not None:  # backbone="vlm": the VLM's own image processor
        image = {
            "applied": "inside the model",
            "steps": f"the VLM's image processor ({type(processor).__name__}): resize, x / 255, "
            "then (x - mean) / std per RGB channel",
            "mean": list(processor.image_mean),
            "std": list(processor.image_std),
        }
        return {"image": image, **norm}
    mean, std = _NORM[vision.family]
    image = {
        "applied": "inside the model",
        "steps": "x / 255, then (x - mean) / std per RGB channel",
        "mean": list(mean),
        "std": list(std),
    }
    if hasattr(vision, "input_size"):
        image["resize"] = f"bilinear to {vision.input_size}x{vision.input_size} inside the model"
    return {"image": image, **norm}


def build_spec(vla: VLA, fmt: str, model_file: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON spec written beside every exported model."""
    cfg = vla.config
    h, w = cfg.image_size
    L, K, A = cfg.instruction_max_length, cfg.chunk_size, cfg.action_dim
    descriptions = {
        "image": ("uint8", ["batch", h, w, 3], "RGB image, HWC, values 0-255"),
        "state": ("float32", ["batch", cfg.state_dim], "proprioceptive state"),
        "instruction": (
            "int64",
            ["batch", L],
            f"token ids from tokenizer/, no special tokens, right-padded with 0 to {L}",
        ),
        "instruction_mask": ("int64", ["batch", L], "1 on instruction tokens, 0 on padding"),
        "noise": (
            "float32",
            ["batch", K * A],
            "initial sampler noise; zeros give the deterministic action, N(0, 1) samples",
        ),
    }
    tok = vla.tokenizer
    head: dict[str, Any] = {"name": cfg.head, "deterministic": True}
    if takes_noise(cfg.head):
        head.update(inference_steps=int(vla.head.inference_steps), noise_input="noise")
    elif cfg.head in ("gaussian", "tanh_gaussian"):
        head["output"] = "distribution mean" + (
            " (squashed)" if cfg.head == "tanh_gaussian" else ""
        )
    return {
        "format": fmt,
        "model_file": model_file,
        "runtime": RUNTIME_NOTES[fmt],
        "model_version": meta["model_version"],
        "source": meta.get("source"),
        "exported_at": meta.get("exported_at"),
        "env": meta.get("env"),
        "inputs": [
            {"name": n, "dtype": d[0], "shape": d[1], "description": d[2]}
            for n, d in ((n, descriptions[n]) for n in input_names(cfg))
        ],
        "outputs": [
            {
                "name": OUTPUT_NAME,
                "dtype": "float32",
                "shape": ["batch", K, A],
                "description": f"action chunk: {K} step(s) of {A} dims",
            }
        ],
        "action": {
            "dim": A,
            "chunk_size": K,
            "low": [float(cfg.action_low)] * A,
            "high": [float(cfg.action_high)] * A,
        },
        "instruction": instruction_spec(tok, L),
        "normalisation": _normalisation(vla),
        "head": head,
        "vla_config": vla.portable_config().to_dict(),
    }


@dataclass(frozen=True)
class TritonInstanceGroup:
    """Triton's ``instance_group``: ``count`` model instances of ``kind`` (on every GPU for
    KIND_GPU, unless ``gpus`` lists device ids)."""

    kind: str = "KIND_CPU"
    count: int = 1
    gpus: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in TRITON_KINDS:
            raise ExportError(
                f"triton instance group kind: expected one of {', '.join(TRITON_KINDS)}, "
                f"got {self.kind!r}"
            )
        if not isinstance(self.count, int) or self.count < 1:
            raise ExportError(
                f"triton instance group count: expected an integer >= 1, got {self.count!r}"
            )
        if self.gpus and self.kind != "KIND_GPU":
            raise ExportError(
                f"triton instance group gpus: only with kind=KIND_GPU, not {self.kind}"
            )

    @classmethod
    def parse(cls, text: str) -> TritonInstanceGroup:
        """``"kind=KIND_GPU,count=2"`` (``kind=gpu`` works too; ``gpus=0:1`` pins devices)."""
        fields: dict[str, Any] = {}
        for item in (t.strip() for t in text.split(",") if t.strip()):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in ("kind", "count", "gpus"):
                raise ExportError(
                    f"triton instance group: expected kind=KIND_CPU|KIND_GPU,count=N[,gpus=0:1], "
                    f"got {item!r} in {text!r}"
                )
            value = value.strip()
            try:
                if key == "kind":
                    upper = value.upper()
                    fields["kind"] = upper if upper.startswith("KIND_") else f"KIND_{upper}"
                elif key == "count":
                    fields["count"] = int(value)
                else:
                    fields["gpus"] = tuple(int(g) for g in value.split(":"))
            except ValueError:
                raise ExportError(
                    f"triton instance group {key}: expected integers, got {value!r}"
                ) from None
        return cls(**fields)

    def pbtxt(self) -> str:
        gpus = f"    gpus: [ {', '.join(map(str, self.gpus))} ]\n" if self.gpus else ""
        return f"instance_group [\n  {{\n    count: {self.count}\n    kind: {self.kind}\n{gpus}  }}\n]\n"


def triton_config(
    spec: dict[str, Any],
    max_batch_size: int = 64,
    instance_group: TritonInstanceGroup | None = None,
) -> str:
    """``config.pbtxt`` for Triton's onnxruntime backend with dynamic batching (one CPU
    instance unless ``instance_group`` says otherwise)."""

    def tensor(item: dict[str, Any]) -> str:
        dims = ", ".join(str(d) for d in item["shape"][1:])
        return (
            f'  {{\n    name: "{item["name"]}"\n    data_type: {_TRITON_TYPES[item["dtype"]]}\n'
            f"    dims: [ {dims} ]\n  }}"
        )

    return (
        f'name: "{TRITON_MODEL_NAME}"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {int(max_batch_size)}\n"
        "input [\n" + ",\n".join(tensor(i) for i in spec["inputs"]) + "\n]\n"
        "output [\n" + ",\n".join(tensor(o) for o in spec["outputs"]) + "\n]\n"
        "dynamic_batching {\n  max_queue_delay_microseconds: 2000\n}\n"
        + (instance_group or TritonInstanceGroup()).pbtxt()
    )


# ---- export steps -------------------------------------------------------------------------------


@contextlib.contextmanager
def export_variants(vla: VLA):
    """Within the block, the trunk's parts that have a faster equivalent for export are swapped
    for it (same outputs up to float rounding): a ``cnn`` encoder for ``FoldedStemCNN`` (its
    input normalisation and CoordConv channels folded into the first conv), an ``attention``
    projector for ``FoldedAttentionPool`` (its key, value and output maps composed), a
    ``default`` rotary embedding for a ``RotaryTable`` (a lookup by position), each RMSNorm for a
    ``DivRMSNorm`` (a form onnxruntime fuses). The eager module is restored on exit."""
    trunk = vla.trunk
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    if isinstance(trunk, VLATrunk):
        if isinstance(trunk.vision, CNNEncoder):
            swaps.append((trunk, "vision", FoldedStemCNN(trunk.vision).eval()))
        if isinstance(trunk.projector, AttentionPoolProjector):
            swaps.append((trunk, "projector", FoldedAttentionPool(trunk.projector).eval()))
        decoder = decoder_of(trunk.lm)
        table = rotary_table_of(decoder)
        if table is not None:
            swaps.append((decoder, "rotary_emb", table))
        swaps += [(owner, name, DivRMSNorm(norm)) for owner, name, norm in rms_norms_of(decoder)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
    try:
        for owner, name, module in swaps:
            setattr(owner, name, module)
        yield vla
    finally:
        for owner, name, module in saved:
            setattr(owner, name, module)


def export_onnx(vla: VLA, path: Path, opset: int | None = None) -> Path:
    """torch.onnx (dynamo) export of ``InferenceGraph(vla)`` with a dynamic batch axis."""
    graph = InferenceGraph(vla).eval()
    example = random_inputs(vla.config, len(vla.tokenizer), batch=3, seed=1)
    args = tuple(torch.as_tensor(example[n]) for n in graph.names)
    with export_variants(vla):
        return _onnx_graph(graph, args, graph.names, [OUTPUT_NAME], path, opset)


def can_split_prefix(vla: VLA) -> bool:
    """Whether the policy's trunk encodes the instruction as a cacheable key/value prefix."""
    return isinstance(vla.trunk, VLATrunk)


def export_onnx_split(vla: VLA, folder: Path, opset: int | None = None) -> dict[str, Any]:
    """``prefix.onnx`` and ``suffix.onnx`` in ``folder`` (see the module docstring); returns
    the spec's ``prefix_cache`` entry."""
    with export_variants(vla):
        return _export_split(vla, folder, opset)


def _export_split(vla: VLA, folder: Path, opset: int | None) -> dict[str, Any]:
    example = random_inputs(vla.config, len(vla.tokenizer), batch=3, seed=1)
    prefix = PrefixGraph(vla).eval()
    prefix_args = tuple(torch.as_tensor(example[n]) for n in prefix.names)
    with torch.no_grad():
        encoded = prefix(*prefix_args)
    num_layers = (len(encoded) - 1) // 2
    outputs = prefix_output_names(num_layers)
    _onnx_graph(prefix, prefix_args, prefix.names, outputs, folder / "prefix.onnx", opset)
    suffix = SuffixGraph(vla, num_layers).eval()
    named = {k: torch.as_tensor(v) for k, v in example.items()}
    named.update(zip(outputs, encoded, strict=True))
    suffix_args = tuple(named[n] for n in suffix.names)
    _onnx_graph(suffix, suffix_args, suffix.names, [OUTPUT_NAME], folder / "suffix.onnx", opset)
    return {
        "prefix_model": "prefix.onnx",
        "suffix_model": "suffix.onnx",
        "prefix_inputs": prefix.names,
        "prefix_outputs": outputs,
        "suffix_inputs": suffix.names,
    }


def _onnx_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    names: list[str],
    outputs: list[str],
    path: Path,
    opset: int | None,
) -> Path:
    """torch.onnx (dynamo) export of ``module(*args)``, axis 0 of every input dynamic."""
    import onnx

    batch = torch.export.Dim("batch", min=1, max=65536)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=names,
            output_names=outputs,
            dynamic_shapes={"inputs": tuple({0: batch} for _ in args)},
            dynamo=True,
            external_data=False,
            opset_version=opset,
            verbose=False,
        )
    model = onnx.load(str(path))
    # the exporter records intermediate shapes of the example batch; onnxruntime's quantiser
    # re-infers shapes and rejects those, so keep only the graph's inputs/outputs typed
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def export_torchscript(vla: VLA, path: Path) -> Path:
    """torch.jit.trace of ``InferenceGraph(vla)`` (shape ops stay symbolic: any batch size)."""
    graph = InferenceGraph(vla).eval()
    example = random_inputs(vla.config, len(vla.tokenizer), batch=3, seed=1)
    args = tuple(torch.as_tensor(example[n]) for n in graph.names)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(graph, args, check_trace=False)
    traced.save(str(path))
    return path


def export_program(vla: VLA, path: Path) -> Path:
    """``torch.export`` of ``InferenceGraph(vla)`` (an ExportedProgram, batch axis dynamic),
    saved with ``torch.export.save``."""
    graph = InferenceGraph(vla).eval()
    example = random_inputs(vla.config, len(vla.tokenizer), batch=3, seed=1)
    args = tuple(torch.as_tensor(example[n]) for n in graph.names)
    batch = torch.export.Dim("batch", min=1, max=65536)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(), torch.no_grad():
        program = torch.export.export(
            graph, args, dynamic_shapes={"inputs": tuple({0: batch} for _ in args)}, strict=False
        )
    torch.export.save(program, str(path))
    return path


def quantize_int8(src: Path, dst: Path) -> Path:
    """onnxruntime dynamic quantisation: int8 weights (7-bit range), per-batch uint8 activation
    scales. ``reduce_range``: on x86 CPUs without VNNI (AVX2 only) onnxruntime's u8s8 kernels
    saturate 16-bit sums with full-range weights (parity 0.19 against a 0.1 tolerance on an
    AVX2-only EPYC); the exported model must hold wherever it is served."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True
        )
    return dst


def convert_fp16(src: Path, dst: Path) -> Path:
    """float16 weights and compute (onnxruntime's converter), float32 inputs/outputs kept."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    dst.parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    return dst


def convert_openvino(src: Path, dst: Path) -> Path:
    """OpenVINO IR from the ONNX graph, weights kept in fp32."""
    ov = import_openvino()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
        model = ov.convert_model(str(src))
        ov.save_model(model, str(dst), compress_to_fp16=False)
    return dst


@contextlib.contextmanager
def _quiet():
    """Silence exporter chatter (progress prints, warnings, INFO logs)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxruntime", "root")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@dataclass(frozen=True)
class ExportFormat:
    """One export format: its model file, how it is written and how it is run."""

    model_file: str
    runtime: str
    # (vla, target file, the shared ONNX graph or None) -> target file
    write: Callable[[VLA, Path, Path | None], Path]
    # (model file, input names in order, threads) -> inputs -> actions
    load: Callable[[Path, list[str], int | None], Callable[[Inputs], np.ndarray]]
    from_onnx: bool = False  # converted from the ONNX graph that is exported once


def _copy_onnx(_vla: VLA, target: Path, onnx_path: Path | None) -> Path:
    shutil.copyfile(onnx_path, target)
    return target


def _onnx_runner(path: Path, _names: list[str], threads: int | None) -> OnnxRunner:
    return OnnxRunner(path, threads or 1)


def _openvino_runner(path: Path, _names: list[str], threads: int | None) -> OpenVINORunner:
    return OpenVINORunner(path, threads)


FORMATS: dict[str, ExportFormat] = {
    "onnx": ExportFormat(
        "model.onnx",
        "onnxruntime (CPUExecutionProvider or any other)",
        _copy_onnx,
        _onnx_runner,
        from_onnx=True,
    ),
    "torchscript": ExportFormat(
        "model.pt",
        "torch.jit.load(model.pt)(*inputs) in the spec's input order",
        lambda vla, target, _onnx: export_torchscript(vla, target),
        TorchScriptRunner,
    ),
    "onnx-int8": ExportFormat(
        "model.onnx",
        "onnxruntime CPU (dynamic quantisation: MatMulInteger/ConvInteger kernels)",
        lambda _vla, target, onnx_path: quantize_int8(onnx_path, target),
        _onnx_runner,
        from_onnx=True,
    ),
    "onnx-fp16": ExportFormat(
        "model.onnx",
        "onnxruntime; meant for GPUs (CPU kernels upcast, so it is slower there)",
        lambda _vla, target, onnx_path: convert_fp16(onnx_path, target),
        _onnx_runner,
        from_onnx=True,
    ),
    "openvino": ExportFormat(
        "model.xml",
        "openvino Core().compile_model(model.xml, 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'}) "
        "for fp32 parity (bf16-capable CPUs default to bf16)",
        lambda _vla, target, onnx_path: convert_openvino(onnx_path, target),
        _openvino_runner,
        from_onnx=True,
    ),
    "triton": ExportFormat(
        "1/model.onnx",  # inside triton/vla/
        "Triton Inference Server, onnxruntime backend: triton/ is the model repository",
        _copy_onnx,
        _onnx_runner,
        from_onnx=True,
    ),
    "torch-export": ExportFormat(
        "model.pt2",
        "torch.export.load(model.pt2).module()(*inputs) in the spec's input order "
        "(torch only: no transformers, no vla_ray)",
        lambda vla, target, _onnx: export_program(vla, target),
        TorchExportRunner,
    ),
}
assert tuple(FORMATS) == EXPORT_FORMATS, "vla_ray.runtime.EXPORT_FORMATS lists every format"
MODEL_FILES = {name: f.model_file for name, f in FORMATS.items()}
RUNTIME_NOTES = {**{name: f.runtime for name, f in FORMATS.items()}, PYTORCH_DIR: PYTORCH_RUNTIME}


def tolerance(fmt: str, spec: dict[str, Any]) -> float:
    """Parity tolerance (max abs difference to the PyTorch module) of a format."""
    if fmt in QUANTISED_TOLERANCE:
        span = max(
            h - lo for h, lo in zip(spec["action"]["high"], spec["action"]["low"], strict=True)
        )
        return QUANTISED_TOLERANCE[fmt] * span
    return FP32_TOLERANCE


def check_parity(
    vla: VLA,
    runner: Callable[[Inputs], np.ndarray],
    batches: Iterable[Inputs],
) -> float:
    """Max absolute difference between ``runner`` and the PyTorch module over ``batches``."""
    worst = 0.0
    for inputs in batches:
        ref = reference_actions(vla, inputs)
        got = np.asarray(runner(inputs))
        if got.shape != ref.shape:
            raise ExportError(f"parity: output shape {got.shape}, the module gives {ref.shape}")
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - ref))))
    return worst


def parity_batches(vla: VLA, seed: int = 0) -> list[Inputs]:
    """Random valid input batches of sizes 1, 5 and 16 (the batch axis must be dynamic)."""
    return [
        random_inputs(vla.config, len(vla.tokenizer), b, seed=seed + i)
        for i, b in enumerate((1, 5, 16))
    ]


def repeated_instruction_batches(vla: VLA, seed: int = 0) -> list[Inputs]:
    """Batches whose rows share a few instructions (in an order that differs from batch to
    batch), so that a prefix cache is hit within a batch and across batches."""
    out = []
    for i, (b, distinct) in enumerate(((8, 3), (12, 2), (1, 1))):
        x = random_inputs(vla.config, len(vla.tokenizer), b, seed=seed + 10 + i)
        pick = np.random.default_rng(seed + i).integers(0, distinct, size=b)
        x["instruction"] = x["instruction"][pick]
        x["instruction_mask"] = x["instruction_mask"][pick]
        out.append(x)
    return out


def weights_version(directory: Path, meta: dict[str, Any]) -> str:
    """``PRESET[-itN]-SHA12``: names the run and pins the exact weights of a save_pretrained dir."""
    digest = hashlib.sha256((directory / WEIGHTS_NAME).read_bytes()).hexdigest()[:12]
    name = meta.get("preset") or "vla"
    it = meta.get("iteration")
    return f"{name}{f'-it{it}' if it is not None else ''}-{digest}"


def export(
    checkpoint: str | os.PathLike,
    formats: str | Iterable[str],
    output: str | os.PathLike,
    *,
    triton_max_batch_size: int = 64,
    triton_instance_group: TritonInstanceGroup | str | None = None,
    opset: int | None = None,
    prefix_cache: bool = True,
    target_return: float | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Export ``checkpoint`` (RLlib checkpoint or save_pretrained dir) to ``output``.

    A Decision Transformer's checkpoint exports its window graph (``vla_ray.export_dt``: formats
    torchscript and torch-export; ``target_return`` overrides the return it conditions on,
    default the trained ``training.target_return``).

    Every format is checked against the PyTorch module; one that misses its tolerance raises
    ExportError and nothing is written. ``output`` is replaced atomically; an existing folder that
    is not an earlier export is refused. ``prefix_cache=False`` leaves the split prefix/suffix
    graphs out of ``onnx/`` (a faster export; runners then encode every row's instruction).
    Returns the summary written to ``export.json``.
    """
    from vla_ray.evaluate import load_policy

    fmts = parse_formats(formats)
    if isinstance(triton_instance_group, str):
        triton_instance_group = TritonInstanceGroup.parse(triton_instance_group)
    if "openvino" in fmts:
        import_openvino()
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not (out / SUMMARY_NAME).is_file():
        raise ExportError(
            f"output: {out} exists and is not an earlier export (no {SUMMARY_NAME}); "
            "pick an empty or new folder"
        )
    say = progress or (lambda _msg: None)
    policy = load_policy(checkpoint, target_return=target_return)
    vla = policy.model
    if vla is None and policy.context is not None:  # a sequence policy: the window graph
        from vla_ray.export_dt import export_sequence

        return export_sequence(checkpoint, policy, fmts, out, progress=progress)
    if vla is None:  # pragma: no cover - load_policy sets it for every other policy
        raise ExportError(f"checkpoint: {checkpoint} did not yield a VLA model")
    vla = vla.cpu().float().eval()
    if vla.config.backbone == "vlm":
        raise ExportError(
            f"format: {', '.join(fmts)} cannot hold a backbone='vlm' policy (its VLM image "
            "processor runs in Python, outside the graph); serve its save_pretrained folder "
            f"(the checkpoint's vla/) with `vla-ray serve --model DIR --backend torch`"
        )
    if vla.config.sensors:
        raise ExportError(
            f"format: {', '.join(fmts)}: the exported graphs take image, state and instruction "
            f"only, not the driving sensors {sorted(vla.config.sensors)} yet; use the "
            "checkpoint's vla/ folder from Python (VLA.from_pretrained)"
        )
    if vla.config.num_cameras > 1:
        raise ExportError(
            f"format: {', '.join(fmts)}: the exported graphs take one image, not the "
            f"{vla.config.num_cameras} cameras of this policy (num_cameras) yet; use the "
            "checkpoint's vla/ folder from Python (VLA.from_pretrained)"
        )
    if vla.config.backbone in ("smolvla", "pi0"):
        raise ExportError(
            f"format: {', '.join(fmts)} cannot hold a backbone={vla.config.backbone!r} policy: "
            "vla-ray's exporters do not trace a LeRobot checkpoint's flow expert (its Euler loop "
            "over the VLM's key/value cache) yet; use its save_pretrained folder (the "
            "checkpoint's vla/) from Python (VLA.from_pretrained)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        vla.save_pretrained(tmp / PYTORCH_DIR, meta=policy.meta or None)
        meta = {
            "model_version": weights_version(tmp / PYTORCH_DIR, policy.meta),
            "source": str(Path(checkpoint).resolve()),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "env": policy.meta.get("env"),
            "preset": policy.meta.get("preset"),
        }
        spec = build_spec(vla, PYTORCH_DIR, "model.safetensors", meta)
        (tmp / PYTORCH_DIR / SPEC_NAME).write_text(json.dumps(spec, indent=2))
        batches = parity_batches(vla)
        summary: dict[str, Any] = {**meta, "formats": {}}
        onnx_path: Path | None = None
        if any(FORMATS[f].from_onnx for f in fmts):
            say("export: onnx (torch.onnx, dynamo) ...")
            t0 = time.time()
            onnx_path = export_onnx(vla, tmp / ".onnx-base" / "model.onnx", opset)
            say(f"export: onnx graph in {time.time() - t0:.1f}s")
        for fmt in fmts:
            t0 = time.time()
            folder = tmp / (f"triton/{TRITON_MODEL_NAME}" if fmt == "triton" else fmt)
            model_file = FORMATS[fmt].model_file
            target = folder / model_file
            target.parent.mkdir(parents=True, exist_ok=True)
            FORMATS[fmt].write(vla, target, onnx_path)
            spec = build_spec(vla, fmt, model_file, meta)
            tol = tolerance(fmt, spec)
            split = prefix_cache and fmt == "onnx" and can_split_prefix(vla)
            if split:
                spec[PREFIX_CACHE_KEY] = export_onnx_split(vla, folder, opset)
            (folder / SPEC_NAME).write_text(json.dumps(spec, indent=2))
            runner = OnnxRunner(target) if split else load_runner(folder)
            diff = check_parity(vla, runner, batches)
            spec["parity"] = {
                "max_abs_diff": diff,
                "tolerance": tol,
                "reference": "PyTorch VLA (memoised trunk), random valid inputs, batch 1, 5, 16",
            }
            if split:
                # the split graphs with the runner's cache, each batch twice (the second
                # time every prefix comes from the cache)
                cached = PrefixCachedOnnxRunner(folder, spec[PREFIX_CACHE_KEY])
                repeated = batches + repeated_instruction_batches(vla)
                cached_diff = check_parity(vla, cached, repeated + repeated)
                spec["parity"]["prefix_cache_max_abs_diff"] = cached_diff
                diff = max(diff, cached_diff)
            (folder / SPEC_NAME).write_text(json.dumps(spec, indent=2))
            save_tokenizer(vla.tokenizer, folder / TOKENIZER_DIR)
            if fmt == "triton":
                (folder / "config.pbtxt").write_text(
                    triton_config(spec, triton_max_batch_size, triton_instance_group)
                )
            rel = folder.relative_to(tmp)
            summary["formats"][fmt] = {
                "path": str(rel),
                "model_file": str(rel / model_file),
                "max_abs_diff": diff,
                "tolerance": tol,
                "seconds": round(time.time() - t0, 2),
            }
            say(f"export: {fmt:<12} max |diff| {diff:.2e} (tolerance {tol:.0e}) -> {rel}")
            if not diff <= tol:
                raise ExportError(
                    f"parity: format {fmt!r} differs from the PyTorch module by {diff:.3g}, "
                    f"above its tolerance {tol:.3g}; nothing was written"
                )
        shutil.rmtree(tmp / ".onnx-base", ignore_errors=True)
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
        # model cards: the eval.json of the run the checkpoint comes from, when there is one
        evaluation = find_eval(checkpoint)
        write_model_card(tmp / PYTORCH_DIR, meta=policy.meta, eval_result=evaluation)
        write_model_card(tmp, meta=policy.meta, eval_result=evaluation, formats=summary["formats"])
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    summary["output"] = str(out)
    return summary
