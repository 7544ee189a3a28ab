"""Running an exported policy without torch or transformers: the export layout's names, its
``spec.json``, the onnxruntime / OpenVINO runners and the instruction tokenizer.

The Serve replicas of the ONNX and OpenVINO backends import only this module (numpy,
onnxruntime or openvino, and the ``tokenizers`` library); ``vla_ray.export`` writes what it reads.
torch is imported only by the ``torch-export`` runner, when one is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

EXPORT_FORMATS = (
    "onnx",
    "torchscript",
    "onnx-int8",
    "onnx-fp16",
    "openvino",
    "triton",
    "torch-export",
)
ONNX_FAMILY = ("onnx", "onnx-int8", "onnx-fp16", "triton")
PYTORCH_DIR = "pytorch"
SPEC_NAME = "spec.json"
SUMMARY_NAME = "export.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"
# spec.json key of an onnx export split into prefix and suffix graphs (vla_ray.export)
PREFIX_CACHE_KEY = "prefix_cache"

Inputs = dict[str, np.ndarray]


class ExportError(ValueError):
    """An export request or an exported model is invalid (the message names what and why)."""


def read_spec(format_dir: str | Path) -> dict[str, Any]:
    """The ``spec.json`` of an exported format folder (or of the ``pytorch`` folder)."""
    path = Path(format_dir) / SPEC_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{format_dir}: no {SPEC_NAME}; expected a folder written by export"
        )
    return json.loads(path.read_text())


def import_openvino():
    """The ``openvino`` module, or an ExportError that says how to install it."""
    try:
        import openvino as ov
    except ImportError as err:
        raise ExportError(
            "format 'openvino' needs the openvino package, which is not installed: "
            "pip install 'vla-ray[openvino]' (or pick other formats)"
        ) from err
    return ov


class OnnxRunner:
    """onnxruntime session over an exported ``model.onnx`` (fp32, INT8 or FP16)."""

    def __init__(self, path: str | Path, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, inputs: Inputs) -> np.ndarray:
        return self.session.run(None, {k: inputs[k] for k in self.names})[0]


class PrefixCachedOnnxRunner:
    """The ``onnx`` export's split graphs with an instruction-prefix cache, as the eager trunk
    keeps one: each distinct instruction (ids and mask) is encoded by ``prefix.onnx`` once,
    and its outputs are reused by every later row that carries it (``suffix.onnx`` runs every
    row)."""

    # cached prefixes beyond this many are dropped (bounds memory)
    MAX_CACHED = 4096

    def __init__(self, folder: str | Path, entry: dict[str, Any], threads: int = 1):
        folder = Path(folder)
        self.prefix = OnnxRunner(folder / entry["prefix_model"], threads)
        self.suffix = OnnxRunner(folder / entry["suffix_model"], threads)
        self.outputs = list(entry["prefix_outputs"])
        self.names = list(entry["suffix_inputs"])
        self._cache: dict[bytes, list[np.ndarray]] = {}
        self.encoded = 0  # instructions run through prefix.onnx (cache misses)

    def _prefixes(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        """The prefix outputs for every row, each distinct row encoded at most once."""
        ids = ids.astype(np.int64) * mask
        keys = [ids[i].tobytes() + mask[i].tobytes() for i in range(len(ids))]
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        missing = [i for k, i in first.items() if k not in self._cache]
        if missing:
            if len(self._cache) + len(missing) > self.MAX_CACHED:
                self._cache.clear()
                missing = list(first.values())
            sel = np.asarray(missing)
            feed = {"instruction": ids[sel], "instruction_mask": mask[sel].astype(np.int64)}
            new = self.prefix.session.run(self.outputs, feed)
            for j, i in enumerate(missing):
                self._cache[keys[i]] = [out[j : j + 1] for out in new]
            self.encoded += len(missing)
        order = list(first)
        if len(order) == 1:  # one instruction for the whole batch: broadcast it
            cached = self._cache[order[0]]
            return [np.repeat(a, len(keys), axis=0) for a in cached]
        slot = {k: j for j, k in enumerate(order)}
        inverse = np.fromiter((slot[k] for k in keys), dtype=np.int64, count=len(keys))
        rows = [self._cache[k] for k in order]
        return [np.concatenate([r[n] for r in rows])[inverse] for n in range(len(self.outputs))]

    def __call__(self, inputs: Inputs) -> np.ndarray:
        mask = np.asarray(inputs["instruction_mask"]).astype(np.int64)
        encoded = self._prefixes(np.asarray(inputs["instruction"]), mask)
        feed = {**inputs, "instruction_mask": mask, **dict(zip(self.outputs, encoded, strict=True))}
        return self.suffix.session.run(None, {k: feed[k] for k in self.names})[0]


def onnx_runner(
    folder: str | Path, spec: dict[str, Any], threads: int = 1
) -> OnnxRunner | PrefixCachedOnnxRunner:
    """The runner of an ONNX-family export folder: the prefix-cached split graphs where the
    spec names them, else the single graph ``model_file``."""
    folder = Path(folder)
    entry = spec.get(PREFIX_CACHE_KEY)
    if entry is not None:
        return PrefixCachedOnnxRunner(folder, entry, threads)
    return OnnxRunner(folder / spec["model_file"], threads)


class OpenVINORunner:
    """OpenVINO IR compiled for the CPU in f32 (the default on bf16-capable CPUs is bf16)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        ov = import_openvino()
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.names = [p.get_any_name() for p in self.compiled.inputs]

    def __call__(self, inputs: Inputs) -> np.ndarray:
        result = self.request.infer({k: inputs[k] for k in self.names})
        return np.asarray(result[self.compiled.outputs[0]])


class TorchExportRunner:
    """A ``torch.export`` ExportedProgram (``model.pt2``): needs torch (imported here, on first
    use), not transformers nor the model's code."""

    def __init__(self, path: str | Path, names: list[str], threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        self.torch = torch
        self.module = torch.export.load(str(path)).module()
        self.names = names

    def __call__(self, inputs: Inputs) -> np.ndarray:
        with self.torch.no_grad():
            args = (self.torch.as_tensor(inputs[k]) for k in self.names)
            return self.module(*args).numpy()


class FastTokenizer:
    """An export's ``tokenizer.json`` through the ``tokenizers`` library, called as a
    transformers tokenizer is for one text: ``tok(text, add_special_tokens=False)["input_ids"]``."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(path))
        # a tokenizer.json keeps the padding/truncation its tokenizer last used (transformers
        # sets them per call); ids are padded and checked by the runner, not here
        self.backend.no_padding()
        self.backend.no_truncation()

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": list(enc.ids), "attention_mask": list(enc.attention_mask)}


def load_export_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved with an export: ``tokenizer.json`` without transformers; a folder
    without one (a slow-only tokenizer) falls back to transformers' AutoTokenizer."""
    folder = Path(folder)
    if (folder / TOKENIZER_FILE).is_file():
        return FastTokenizer(folder / TOKENIZER_FILE)
    from vla_ray.tokenizer import load_tokenizer

    return load_tokenizer(str(folder))
