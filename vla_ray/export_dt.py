"""Export of a sequence policy (the Decision Transformer): the graph over its context window,
and the runner that keeps the window.

The exported graph is a plain function of one window per row: each observation input over the
``K = context_length`` steps (``state`` float32 (B, K, S), ``instruction`` /
``instruction_mask`` int64 (B, K, L), ``image`` uint8 (B, K, H, W, 3)), the previous actions
``dt_actions`` float32 (B, K, A), the returns-to-go ``dt_rtg`` float32 (B, K), the episode
timesteps ``dt_timesteps`` int64 (B, K) and ``dt_mask`` float32 (B, K) (1 on real steps) ->
``actions`` float32 (B, 1, A). The window itself is kept by the runner
(``vla_ray.sequence.WindowRunner``: the last K observations, actions and rewards of the
episode), whose settings (context length, the target return and its scale) are ``spec.json``'s
``context``; ``spec.json``'s ``inputs`` are what a client sends per step (as for a VLA) and its
``graph_inputs`` what the model file takes::

    OUTPUT/
      export.json              summary: source, model version, per-format parity
      pytorch/                 the RLModule (RLModule.from_checkpoint; Serve's torch backend)
      torchscript/model.pt     torch.jit.trace of the window graph
      torch-export/model.pt2   torch.export ExportedProgram of the same graph

Parity is checked over a multi-step episode (the window filling up, then sliding) against the
eager module playing the same observations and rewards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vla_ray.runtime import (
    PYTORCH_DIR,
    SPEC_NAME,
    SUMMARY_NAME,
    TOKENIZER_DIR,
    ExportError,
    TorchExportRunner,
    read_spec,
)
from vla_ray.sequence import (
    CONTEXT_KEY,
    MASK,
    PREV_ACTIONS,
    RTG,
    TIMESTEPS,
    WINDOW_INPUTS,
    WindowRunner,
    stack,
)

POLICY_KIND = "decision_transformer"  # export.json / spec.json "policy"
SEQUENCE_FORMATS = ("torchscript", "torch-export")
_MODEL_FILES = {"torchscript": "model.pt", "torch-export": "model.pt2"}
_RUNTIME = {
    "torchscript": "torch.jit.load(model.pt)(*graph_inputs), the window kept by the caller "
    "(vla_ray.export_dt.sequence_runner)",
    "torch-export": "torch.export.load(model.pt2).module()(*graph_inputs), the window kept by "
    "the caller (vla_ray.export_dt.sequence_runner)",
    PYTORCH_DIR: "ray.rllib RLModule.from_checkpoint(folder) (vla_ray.evaluate.load_policy)",
}
FP32_TOLERANCE = 1e-4
PARITY_STEPS = 3  # the parity episode: PARITY_STEPS * context_length steps (at least 12)


def observation_names(config: Any) -> list[str]:
    """The per-step observation inputs of a sequence policy's VLA trunk, in order."""
    from vla_ray.export import input_names

    return [n for n in input_names(config) if n != "noise"]


def graph_input_names(config: Any) -> list[str]:
    """The exported graph's inputs, in order: observations over the window, then the window's."""
    return [*observation_names(config), *WINDOW_INPUTS]


def graph_inputs(w: dict[str, Any], names: list[str]) -> dict[str, np.ndarray]:
    """A batched window (``vla_ray.sequence.context_window``'s keys) -> the graph's inputs."""
    named = {PREV_ACTIONS: w["actions"], RTG: w["rtg"], TIMESTEPS: w["timesteps"], MASK: w["mask"]}
    obs = w["obs"]
    return {n: np.asarray(named[n] if n in named else obs[n]) for n in names}


class DTGraph(nn.Module):
    """The DT's deterministic action as a function of plain window tensors (for export):
    ``forward(*inputs)`` in ``graph_input_names`` order -> actions (B, 1, A)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.names = graph_input_names(module.config)
        self.obs_names = observation_names(module.config)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        from ray.rllib.core.columns import Columns

        named = dict(zip(self.names, inputs, strict=True))
        batch = {Columns.OBS: {k: named[k] for k in self.obs_names}}
        batch.update({k: named[k] for k in WINDOW_INPUTS})
        return self.module.predict(batch, functional=True)[:, -1:]


def random_windows(module: Any, K: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random valid graph inputs for ``module`` (a ``DTModule``): windows of length ``K`` and
    random fill (left-padded), random observations, actions, returns-to-go and timesteps."""
    from vla_ray.export import random_inputs

    rng = np.random.default_rng(seed)
    obs = random_inputs(module.config, len(module.tokenizer), batch * K, seed=seed)
    out = {k: v.reshape(batch, K, *v.shape[1:]) for k, v in obs.items() if k != "noise"}
    fill = rng.integers(1, K + 1, size=batch)
    mask = (np.arange(K)[None] >= (K - fill)[:, None]).astype(np.float32)
    actions = rng.uniform(-1, 1, (batch, K, module.act_dim)).astype(np.float32)
    out[PREV_ACTIONS] = actions * mask[..., None]
    out[RTG] = rng.normal(size=(batch, K)).astype(np.float32) * mask
    start = rng.integers(0, max(1, module.max_timestep - K), size=batch)
    out[TIMESTEPS] = ((start[:, None] + np.arange(K)[None]) * mask).astype(np.int64)
    out[MASK] = mask
    return {n: out[n] for n in graph_input_names(module.config)}


def _trace_args(module: Any, K: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(v) for v in random_windows(module, K, batch=3, seed=1).values())


def export_torchscript(module: Any, K: int, path: Path) -> Path:
    """``torch.jit.trace`` of ``DTGraph(module)`` on windows of length ``K``."""
    from vla_ray.export import _quiet

    graph = DTGraph(module).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(graph, _trace_args(module, K), check_trace=False)
    traced.save(str(path))
    return path


def export_program(module: Any, K: int, path: Path) -> Path:
    """``torch.export`` of ``DTGraph(module)`` (batch axis dynamic), ``torch.export.save``d."""
    from vla_ray.export import _quiet

    graph = DTGraph(module).eval()
    args = _trace_args(module, K)
    batch = torch.export.Dim("batch", min=1, max=65536)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(), torch.no_grad():
        program = torch.export.export(
            graph, args, dynamic_shapes={"inputs": tuple({0: batch} for _ in args)}, strict=False
        )
    torch.export.save(program, str(path))
    return path


_WRITERS: dict[str, Callable[[Any, int, Path], Path]] = {
    "torchscript": export_torchscript,
    "torch-export": export_program,
}


class _TorchScriptWindow:
    def __init__(self, path: Path, names: list[str], threads: int | None = None):
        if threads:
            torch.set_num_threads(int(threads))
        self.module = torch.jit.load(str(path)).eval()
        self.names = names

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return self.module(*(torch.as_tensor(inputs[k]) for k in self.names)).numpy()


_LOADERS = {"torchscript": _TorchScriptWindow, "torch-export": TorchExportRunner}


def context_settings(
    module: Any, training: dict[str, Any], target_return: float | None = None
) -> dict[str, Any]:
    """A sequence policy's window settings (spec.json ``context``) from its training settings;
    ``target_return`` overrides the trained one."""
    return {
        "context_length": int(training["context_length"]),
        "target_return": float(
            training["target_return"] if target_return is None else target_return
        ),
        "return_scale": float(training["return_scale"]),
        "max_timestep": int(module.max_timestep),
        "note": "the runner keeps each episode's (Serve: each session's) last context_length "
        "observations, actions and rewards; returns-to-go are (target_return - rewards so far) "
        "/ return_scale",
    }


def build_spec(
    module: Any, fmt: str, model_file: str, meta: dict[str, Any], context: dict[str, Any]
) -> dict[str, Any]:
    """The JSON spec written beside an exported sequence policy (the keys of a VLA's spec, plus
    ``policy``, ``graph_inputs`` and ``context``)."""
    from vla_ray.export import _normalisation, instruction_spec

    cfg = module.config
    h, w = cfg.image_size
    L, A, K = cfg.instruction_max_length, module.act_dim, context["context_length"]
    per_step = {
        "image": ("uint8", [h, w, 3], "RGB image, HWC, values 0-255"),
        "state": ("float32", [cfg.state_dim], "proprioceptive state"),
        "instruction": ("int64", [L], f"token ids from tokenizer/, right-padded with 0 to {L}"),
        "instruction_mask": ("int64", [L], "1 on instruction tokens, 0 on padding"),
    }
    window = {
        PREV_ACTIONS: ("float32", [K, A], "actions taken at the window's steps (current: 0)"),
        RTG: ("float32", [K], "returns-to-go, (target_return - rewards so far) / return_scale"),
        TIMESTEPS: ("int64", [K], "episode timestep of each window step"),
        MASK: ("float32", [K], "1 on real steps, 0 on the left padding"),
    }
    obs = observation_names(cfg)
    tok = module.tokenizer
    return {
        "format": fmt,
        "model_file": model_file,
        "runtime": _RUNTIME[fmt],
        "policy": POLICY_KIND,
        "model_version": meta["model_version"],
        "source": meta.get("source"),
        "exported_at": meta.get("exported_at"),
        "env": meta.get("env"),
        "inputs": [
            {"name": n, "dtype": per_step[n][0], "shape": ["batch", *per_step[n][1]]}
            | {"description": per_step[n][2]}
            for n in obs
        ],
        "graph_inputs": [
            {"name": n, "dtype": per_step[n][0], "shape": ["batch", K, *per_step[n][1]]}
            for n in obs
        ]
        + [
            {"name": n, "dtype": d[0], "shape": ["batch", *d[1]], "description": d[2]}
            for n, d in window.items()
        ],
        "outputs": [
            {
                "name": "actions",
                "dtype": "float32",
                "shape": ["batch", 1, A],
                "description": f"the action of the window's last step ({A} dims)",
            }
        ],
        "action": {
            "dim": A,
            "chunk_size": 1,
            "low": [float(module._low)] * A,
            "high": [float(module._high)] * A,
        },
        "instruction": instruction_spec(tok, L),
        CONTEXT_KEY: context,
        "normalisation": _normalisation(module),
        "head": {"name": "dt", "deterministic": True},
        "vla_config": cfg.to_dict(),
    }


def graph_runner(folder: str | Path, threads: int = 1) -> Callable[[dict], np.ndarray]:
    """The exported window graph of ``folder`` (torchscript or torch-export):
    graph inputs -> actions (B, 1, A)."""
    folder = Path(folder)
    spec = read_spec(folder)
    if CONTEXT_KEY not in spec or spec["format"] not in _LOADERS:
        raise ExportError(
            f"{folder}: not an exported sequence policy (expected spec.json with "
            f"{CONTEXT_KEY!r} and format one of {', '.join(_LOADERS)})"
        )
    names = [i["name"] for i in spec["graph_inputs"]]
    return _LOADERS[spec["format"]](folder / spec["model_file"], names, threads)


def window_act(run: Callable[[dict], np.ndarray], names: list[str]) -> Callable[[dict], np.ndarray]:
    """A graph runner as a ``WindowRunner``'s ``act``: batched window -> actions (B, A)."""

    def act(w: dict[str, Any]) -> np.ndarray:
        return np.asarray(run(graph_inputs(w, names)))[:, -1]

    return act


def sequence_runner(
    folder: str | Path, threads: int = 1, target_return: float | None = None
) -> Callable[[], WindowRunner]:
    """A factory of step-by-step runners (one per episode or session) over the exported graph
    of ``folder``; ``target_return`` overrides the spec's."""
    spec = read_spec(folder)
    ctx = spec[CONTEXT_KEY]
    act = window_act(graph_runner(folder, threads), [i["name"] for i in spec["graph_inputs"]])
    target = ctx["target_return"] if target_return is None else target_return

    def make() -> WindowRunner:
        return WindowRunner(
            act, spec["action"]["dim"], ctx["context_length"], target, ctx["return_scale"]
        )

    return make


def episode_parity(
    module: Any,
    make_eager: Callable[[], WindowRunner],
    make_exported: Callable[[], WindowRunner],
    steps: int,
    seed: int = 0,
) -> float:
    """Max absolute action difference of two runners playing the same ``steps``-step episode
    (random observations and rewards), and of the graph on a batch of first steps."""
    from vla_ray.export import random_inputs

    rng = np.random.default_rng(seed)
    eager, exported = make_eager(), make_exported()
    obs = random_inputs(module.config, len(module.tokenizer), steps, seed=seed)
    names = observation_names(module.config)
    worst = 0.0
    for t in range(steps):
        one = {k: obs[k][t : t + 1] for k in names}
        a, b = eager(one), exported(one)
        if a.shape != b.shape:
            raise ExportError(f"parity: runner output shape {b.shape}, the module gives {a.shape}")
        worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b))))
        reward = float(rng.normal())
        eager.observe(reward)
        exported.observe(reward)
    # a batch of first steps: the batch axis is dynamic
    rows = [{k: obs[k][t] for k in names} for t in range(min(steps, 5))]
    batch_a = np.concatenate([make_eager()({k: v[None] for k, v in o.items()}) for o in rows])
    exported = make_exported()
    batch_b = exported.act(first_step_windows(stack(rows), exported))
    worst = max(worst, float(np.max(np.abs(batch_a - batch_b))))
    return worst


def first_step_windows(obs: dict[str, np.ndarray], runner: WindowRunner) -> dict[str, Any]:
    """Batched windows in which each row of ``obs`` (B, ...) is an episode's first step (what
    Serve answers for a request that is not part of a session's episode)."""
    from vla_ray.sequence import context_window

    n = len(next(iter(obs.values())))
    rows = [
        context_window(
            [{k: v[i] for k, v in obs.items()}],
            np.zeros((0, runner.act_dim), np.float32),
            np.zeros(0),
            runner.K,
            runner.target,
            runner.scale,
        )
        for i in range(n)
    ]
    return {k: stack([r[k] for r in rows]) for k in rows[0]}


def weights_version(module: nn.Module, meta: dict[str, Any]) -> str:
    """``PRESET[-itN]-SHA12`` over the module's parameters (as ``vla_ray.export`` names VLAs)."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    name = meta.get("preset") or POLICY_KIND
    it = meta.get("iteration")
    return f"{name}{f'-it{it}' if it is not None else ''}-{digest.hexdigest()[:12]}"


def export_sequence(
    checkpoint: str | os.PathLike,
    policy: Any,
    formats: Iterable[str],
    output: str | os.PathLike,
    *,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Export the sequence policy ``policy`` (``load_policy`` of ``checkpoint``: a Decision
    Transformer; its runner's target return is the one recorded) to ``output`` in ``formats``
    (of ``SEQUENCE_FORMATS``); the caller has checked ``output``. Every format is checked over a multi-step episode against the eager module; one
    that misses ``FP32_TOLERANCE`` raises ExportError and nothing is written."""
    from vla_ray.tokenizer import save_tokenizer

    fmts = list(formats)
    bad = [f for f in fmts if f not in SEQUENCE_FORMATS]
    if bad:
        raise ExportError(
            f"format: {', '.join(bad)} cannot hold a Decision Transformer yet; its formats are "
            f"{', '.join(SEQUENCE_FORMATS)} (the window graph; the runner keeps the context)"
        )
    say = progress or (lambda _msg: None)
    runner = policy.context
    module = runner.module.cpu().float().eval()
    training = {
        "context_length": runner.K,
        "target_return": runner.target,
        "return_scale": runner.scale,
    }
    context = context_settings(module, training)
    K = context["context_length"]
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    from vla_ray.algorithms.dt import ContextRunner

    def make_eager() -> WindowRunner:
        return ContextRunner(module, K, context["target_return"], context["return_scale"])

    try:
        meta = {
            "model_version": weights_version(module, policy.meta),
            "source": str(Path(checkpoint).resolve()),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "env": policy.meta.get("env"),
            "preset": policy.meta.get("preset"),
        }
        # pytorch/: the RLModule and the meta the eager runner reads (the window settings)
        module.save_to_path(str((tmp / PYTORCH_DIR).resolve()))
        run_meta = {**policy.meta, "training": {**policy.meta.get("training", {}), **training}}
        run_meta["training"]["target_return"] = context["target_return"]
        (tmp / PYTORCH_DIR / "vla_ray_meta.json").write_text(
            json.dumps(run_meta, indent=2, default=str)
        )
        spec = build_spec(module, PYTORCH_DIR, ".", meta, context)
        spec.pop("graph_inputs")
        (tmp / PYTORCH_DIR / SPEC_NAME).write_text(json.dumps(spec, indent=2))
        save_tokenizer(module.tokenizer, tmp / PYTORCH_DIR / TOKENIZER_DIR)
        summary: dict[str, Any] = {**meta, "policy": POLICY_KIND, CONTEXT_KEY: context}
        summary["formats"] = {}
        steps = max(12, PARITY_STEPS * K)
        for fmt in fmts:
            t0 = time.time()
            folder = tmp / fmt
            model_file = _MODEL_FILES[fmt]
            _WRITERS[fmt](module, K, folder / model_file)
            spec = build_spec(module, fmt, model_file, meta, context)
            (folder / SPEC_NAME).write_text(json.dumps(spec, indent=2))
            diff = episode_parity(module, make_eager, sequence_runner(folder), steps)
            spec["parity"] = {
                "max_abs_diff": diff,
                "tolerance": FP32_TOLERANCE,
                "reference": f"the eager module's runner over a {steps}-step episode "
                "(random observations and rewards), and a batch of first steps",
            }
            (folder / SPEC_NAME).write_text(json.dumps(spec, indent=2))
            save_tokenizer(module.tokenizer, folder / TOKENIZER_DIR)
            summary["formats"][fmt] = {
                "path": fmt,
                "model_file": f"{fmt}/{model_file}",
                "max_abs_diff": diff,
                "tolerance": FP32_TOLERANCE,
                "seconds": round(time.time() - t0, 2),
            }
            say(f"export: {fmt:<12} max |diff| {diff:.2e} (tolerance {FP32_TOLERANCE:.0e})")
            if not diff <= FP32_TOLERANCE:
                raise ExportError(
                    f"parity: format {fmt!r} differs from the eager module by {diff:.3g} over "
                    f"an episode, above its tolerance {FP32_TOLERANCE:.3g}; nothing was written"
                )
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
        from vla_ray.fsutil import replace_dir

        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    summary["output"] = str(out)
    return summary
