"""Experiment trackers: Weights & Biases and MLflow, for ``vla-ray train`` and ``vla-ray tune``.

Both are optional extras (``pip install "vla-ray[wandb]"``, ``"vla-ray[mlflow]"``). Tune runs use
Ray's own logger callbacks (``WandbLoggerCallback``, ``MLflowLoggerCallback``: one W&B/MLflow run
per trial). ``vla-ray train`` runs its own loop, not Tune, so it logs through the two libraries'
APIs directly with :class:`WandbTracker` / :class:`MLflowTracker`: the resolved config once, the
summary row of every iteration, and the checkpoint paths at the end.

``WANDB_MODE=offline`` (or ``--wandb`` with no network) writes the W&B run files under the run
directory (``wandb/offline-run-*``); ``wandb sync`` uploads them later.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    """Receives a run's metrics; ``finish`` is called once at the end, also on errors."""

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def finish(self, summary: dict[str, Any] | None = None) -> None: ...


def _require(module: str, extra: str, flag: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(
            f'{flag} needs the {module!r} package: pip install "vla-ray[{extra}]"'
        ) from None


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """Finite numbers of ``metrics``; nested dicts (e.g. ``learner``) become ``learner/key``."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update({f"{k}/{kk}": vv for kk, vv in _numeric(v).items()})
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            continue
        out[k] = float(v)
    return out


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"lr": 1e-3}}`` -> ``{"training.lr": 1e-3}``."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class WandbTracker:
    """One W&B run: config at start, ``wandb.log`` per iteration, summary at the end."""

    def __init__(self, project: str, run_dir: str | os.PathLike, config: dict[str, Any]):
        wandb = _require("wandb", "wandb", "--wandb")
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            name=run_dir.name,
            dir=str(run_dir),
            config=config,
            mode=os.environ.get("WANDB_MODE") or None,
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(_numeric(metrics), step=step)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        for k, v in (summary or {}).items():
            self.run.summary[k] = v
        self.run.finish()


class MLflowTracker:
    """One MLflow run: flattened config as params, metrics per iteration, paths as tags."""

    def __init__(
        self,
        tracking_uri: str,
        run_dir: str | os.PathLike,
        config: dict[str, Any],
        experiment: str = "vla-ray",
    ):
        mlflow = _require("mlflow", "mlflow", "--mlflow")
        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=Path(run_dir).name)
        # MLflow caps param values (6,000 chars); long ones are truncated, never dropped
        params = {k: str(v)[:500] for k, v in flatten(config).items()}
        mlflow.log_params(params)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.mlflow.log_metrics(_numeric(metrics), step=step)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        tags = {k: str(v) for k, v in (summary or {}).items() if isinstance(v, str)}
        if tags:
            self.mlflow.set_tags(tags)
        self.mlflow.end_run()


def open_trackers(
    run_dir: str | os.PathLike,
    config: dict[str, Any],
    *,
    wandb_project: str | None = None,
    mlflow_uri: str | None = None,
) -> list[Tracker]:
    """The trackers asked for (none by default); ValueError when a package is missing."""
    trackers: list[Tracker] = []
    if wandb_project:
        trackers.append(WandbTracker(wandb_project, run_dir, config))
    if mlflow_uri:
        trackers.append(MLflowTracker(mlflow_uri, run_dir, config))
    return trackers


def tune_callbacks(
    *, wandb_project: str | None = None, mlflow_uri: str | None = None, experiment: str = "vla-ray"
) -> list[Any]:
    """Ray Tune logger callbacks: one W&B / MLflow run per trial (files in each trial dir)."""
    callbacks: list[Any] = []
    if wandb_project:
        _require("wandb", "wandb", "--wandb")
        from ray.air.integrations.wandb import WandbLoggerCallback

        kwargs: dict[str, Any] = {}
        if os.environ.get("WANDB_MODE"):
            # the logging actors may run in a Ray started before WANDB_MODE was set
            kwargs["mode"] = os.environ["WANDB_MODE"]
        callbacks.append(WandbLoggerCallback(project=wandb_project, **kwargs))
    if mlflow_uri:
        _require("mlflow", "mlflow", "--mlflow")
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=mlflow_uri, experiment_name=experiment, save_artifact=False
            )
        )
    return callbacks
