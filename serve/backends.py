"""Inference backends for the Serve app: onnxruntime over an exported ONNX model, OpenVINO over
an exported IR, or eager PyTorch.

Each takes batched model inputs (the names in the spec) and returns action chunks (B, K, A).
The ONNX and OpenVINO backends import neither torch nor transformers (``vla_ray.runtime``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vla_ray.runtime import (
    ONNX_FAMILY,
    PYTORCH_DIR,
    SPEC_NAME,
    SUMMARY_NAME,
    OpenVINORunner,
    load_export_tokenizer,
    onnx_runner,
    read_spec,
)
from vla_ray.sequence import CONTEXT_KEY, DEFAULT_MAX_SESSIONS, SessionWindows, WindowRunner

BACKENDS = ("onnx", "openvino", "torch")
# the export formats each backend runs, and the sub-folder of an export root it picks
_FORMATS = {"onnx": ONNX_FAMILY, "openvino": ("openvino",), "torch": (PYTORCH_DIR,)}
_SUBDIR = {"onnx": "onnx", "openvino": "openvino", "torch": PYTORCH_DIR}
# the exported window graphs of a sequence policy (the Decision Transformer): torch backend
SEQUENCE_FORMATS = ("torchscript", "torch-export")


class BackendError(ValueError):
    """The model folder does not fit the requested backend (the message says what would)."""


def resolve_model_dir(model: str | Path, backend: str) -> Path:
    """The folder a backend loads: an export root picks ``onnx/``, ``openvino/`` or ``pytorch/``;
    a format folder with a ``spec.json`` is used as is; the torch backend also takes a
    ``save_pretrained`` folder or an RLlib checkpoint."""
    if backend not in BACKENDS:
        raise BackendError(
            f"backend: unknown {backend!r}; valid backends are {', '.join(BACKENDS)}"
        )
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model: {path} does not exist")
    if (path / SUMMARY_NAME).is_file():
        sub = path / _SUBDIR[backend]
        if not (sub / SPEC_NAME).is_file():
            raise BackendError(
                f"model: the export {path} has no {sub.name}/ folder; export with "
                f"--format {_SUBDIR[backend] if backend != 'torch' else 'onnx'} or use "
                "--backend torch"
            )
        return sub
    if (path / SPEC_NAME).is_file():
        spec = read_spec(path)
        fmt = spec["format"]
        if backend == "torch" and CONTEXT_KEY in spec and fmt in SEQUENCE_FORMATS:
            return path  # a sequence policy's window graph
        if fmt not in _FORMATS[backend]:
            want = ", ".join(_FORMATS[backend])
            raise BackendError(
                f"model: {path} holds format {fmt!r}; the {backend} backend needs {want}"
            )
        return path
    if backend == "torch":
        return path  # a save_pretrained folder or RLlib checkpoint: load_policy decides
    raise BackendError(
        f"model: {path} is not an export (no {SUMMARY_NAME} or {SPEC_NAME}); run "
        "`vla-ray export --checkpoint CKPT --format onnx --output DIR` first"
    )


class Backend:
    """Loaded model + its spec + tokenizer; ``predict(inputs) -> (B, K, A)``."""

    name: str
    spec: dict[str, Any]
    tokenizer: Any

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError  # pragma: no cover


# formats whose activations are quantised with ranges computed over the whole input tensor
# (ONNX DynamicQuantizeLinear): in a batch, one request's values would change the others'
# answers, so such models run one request at a time
PER_REQUEST_FORMATS = ("onnx-int8",)


class OnnxBackend(Backend):
    """onnxruntime (CPU) over an ONNX-family export folder: its prefix and suffix graphs with
    an instruction-prefix cache where the export has them, else ``model.onnx``."""

    name = "onnx"

    def __init__(self, folder: Path, threads: int = 1):
        self.spec = read_spec(folder)
        self.runner = onnx_runner(folder, self.spec, threads=threads)
        self.tokenizer = load_export_tokenizer(folder / self.spec["instruction"]["tokenizer"])
        self.per_request = self.spec["format"] in PER_REQUEST_FORMATS

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        n = len(next(iter(inputs.values())))
        if self.per_request and n > 1:
            rows = [self.runner({k: v[i : i + 1] for k, v in inputs.items()}) for i in range(n)]
            return np.concatenate(rows)
        return self.runner(inputs)


class OpenVINOBackend(Backend):
    """OpenVINO (CPU, f32) over ``model.xml`` of an ``openvino`` export folder."""

    name = "openvino"

    def __init__(self, folder: Path, threads: int = 1):
        self.spec = read_spec(folder)
        self.runner = OpenVINORunner(folder / self.spec["model_file"], threads=threads)
        self.tokenizer = load_export_tokenizer(folder / self.spec["instruction"]["tokenizer"])

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.runner(inputs)


class TorchBackend(Backend):
    """Eager PyTorch ``VLA`` (memoised instruction prefix), from ``pytorch/`` or a checkpoint."""

    name = "torch"

    def __init__(self, folder: Path, threads: int = 1, policy: Any = None):
        import torch

        from vla_ray.evaluate import load_policy
        from vla_ray.export import build_spec, reference_actions, weights_version

        torch.set_num_threads(int(threads))
        self._reference_actions = reference_actions
        policy = policy or load_policy(folder)
        self.vla = policy.model.cpu().float().eval()
        self.tokenizer = self.vla.tokenizer
        if (folder / SPEC_NAME).is_file():
            self.spec = read_spec(folder)
        else:
            version = (
                weights_version(folder, policy.meta)
                if (folder / "model.safetensors").is_file()
                else f"{policy.meta.get('preset') or 'vla'}-{policy.source}"
            )
            meta = {"model_version": version, "source": str(folder), "env": policy.meta.get("env")}
            self.spec = build_spec(self.vla, PYTORCH_DIR, "model.safetensors", meta)

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._reference_actions(self.vla, inputs)


class SequenceBackend(Backend):
    """A sequence policy (the Decision Transformer) with one context window per session id
    (``act_session``: the session's last K observations, actions and rewards); ``predict``
    answers each row as the first step of an episode (no session: warm-up, probes,
    ``/v1/act_batch``). Its window graph (torchscript / torch-export) or its eager module."""

    name = "torch"

    def __init__(
        self,
        spec: dict[str, Any],
        tokenizer: Any,
        make_runner: Any,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
    ):
        self.spec, self.tokenizer = spec, tokenizer
        self.make_runner = make_runner
        self.sessions = SessionWindows(make_runner, max_sessions)

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        from vla_ray.export_dt import first_step_windows

        runner: WindowRunner = self.make_runner()
        return np.asarray(runner.act(first_step_windows(inputs, runner)))[:, None]

    def act_session(
        self,
        sid: str,
        inputs: dict[str, np.ndarray],
        reward: float | None = None,
        episode_start: bool = False,
    ) -> np.ndarray:
        """The session's next action (1, 1, A); ``reward``: that of its previous action."""
        return self.sessions.act(sid, inputs, reward, episode_start)[:, None]


def _sequence_backend(
    folder: Path, threads: int, target_return: float | None, policy: Any = None
) -> SequenceBackend:
    """A SequenceBackend over an exported window graph (``policy`` None) or a loaded DT."""
    import torch

    from vla_ray import export_dt

    torch.set_num_threads(int(threads))
    if policy is None:
        spec = read_spec(folder)
        make = export_dt.sequence_runner(folder, threads, target_return)
        tokenizer = load_export_tokenizer(folder / spec["instruction"]["tokenizer"])
        if target_return is not None:
            spec[CONTEXT_KEY] = {**spec[CONTEXT_KEY], "target_return": float(target_return)}
        return SequenceBackend(spec, tokenizer, make)
    from vla_ray.algorithms.dt import ContextRunner

    ctx = policy.context
    module = ctx.module.cpu().float().eval()
    training = {"context_length": ctx.K, "target_return": ctx.target, "return_scale": ctx.scale}
    meta = {
        "model_version": export_dt.weights_version(module, policy.meta),
        "source": str(folder),
        "env": policy.meta.get("env"),
    }
    spec = export_dt.build_spec(
        module, PYTORCH_DIR, ".", meta, export_dt.context_settings(module, training)
    )

    def make() -> WindowRunner:
        return ContextRunner(module, ctx.K, ctx.target, ctx.scale)

    return SequenceBackend(spec, module.tokenizer, make)


def load_backend(
    model: str | Path,
    backend: str = "onnx",
    threads: int = 1,
    target_return: float | None = None,
) -> Backend:
    """Load ``model`` (see ``resolve_model_dir``) with ``backend`` (one of ``BACKENDS``).
    ``target_return``: the return a sequence policy (Decision Transformer) conditions on
    (default: the one it was trained or exported with)."""
    folder = resolve_model_dir(model, backend)
    if backend == "torch":
        if (folder / SPEC_NAME).is_file() and read_spec(folder)["format"] in SEQUENCE_FORMATS:
            return _sequence_backend(folder, threads, target_return)
        from vla_ray.evaluate import load_policy

        policy = load_policy(folder, target_return=target_return)
        if policy.context is not None:
            return _sequence_backend(folder, threads, target_return, policy)
        return TorchBackend(folder, threads, policy)
    if target_return is not None:
        raise BackendError(
            f"target_return: only a Decision Transformer conditions on a return, served by the "
            f"torch backend; the {backend} backend runs a VLA"
        )
    cls = {"onnx": OnnxBackend, "openvino": OpenVINOBackend}[backend]
    return cls(folder, threads)
