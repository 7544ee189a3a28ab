"""Experiment trackers for `vla-ray train`: W&B offline run files, MLflow runs, missing extras."""

from __future__ import annotations

import sys
import time

import pytest

from vla_ray.tracking import MLflowTracker, WandbTracker, flatten, open_trackers, tune_callbacks

CONFIG = {"preset": "langreach-ppo", "training": {"lr": 5e-4, "gamma": 0.9}, "seed": 0}
ROWS = [
    {"iteration": 1, "env_steps": 128, "success_rate": None, "episode_return_mean": 0.4},
    {"iteration": 2, "env_steps": 256, "success_rate": 0.25, "episode_return_mean": 1.5},
]


def test_flatten_uses_dotted_keys():
    assert flatten(CONFIG) == {
        "preset": "langreach-ppo",
        "training.lr": 5e-4,
        "training.gamma": 0.9,
        "seed": 0,
    }


def test_wandb_offline_run_files_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = WandbTracker("vla-ray-test", tmp_path / "run", CONFIG)
    for row in ROWS:
        tracker.log(row, step=row["iteration"])
    tracker.finish({"best_checkpoint": str(tmp_path / "run" / "checkpoints" / "best")})
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # W&B's service process writes the file; give it a moment to flush after finish()
    deadline = time.time() + 30
    while b"best_checkpoint" not in runs[0].read_bytes() and time.time() < deadline:
        time.sleep(0.5)
    data = runs[0].read_bytes()
    # the run's records hold the config and the logged metric names
    for key in (b"episode_return_mean", b"success_rate", b"best_checkpoint", b"training"):
        assert key in data, key


@pytest.mark.slow
def test_mlflow_run_has_params_metrics_and_tags(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MLflowTracker(uri, tmp_path / "run", CONFIG)
    for row in ROWS:
        tracker.log(row, step=row["iteration"])
    tracker.finish({"best_checkpoint": "/x/checkpoints/best"})
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["vla-ray"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["training.lr"] == "0.0005"
    assert run.data.metrics["success_rate"] == 0.25  # the last value; None was skipped
    assert run.data.tags["best_checkpoint"] == "/x/checkpoints/best"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "episode_return_mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.4), (2, 1.5)]


def test_no_trackers_by_default_and_clear_error_without_the_package(tmp_path, monkeypatch):
    assert open_trackers(tmp_path, CONFIG) == []
    assert tune_callbacks() == []
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(
        ValueError, match=r'--mlflow needs the .mlflow. package: pip install "vla-ray\[mlflow\]"'
    ):
        open_trackers(tmp_path, CONFIG, mlflow_uri="sqlite:///x.db")
    with pytest.raises(
        ValueError, match=r'--wandb needs the .wandb. package: pip install "vla-ray\[wandb\]"'
    ):
        tune_callbacks(wandb_project="p")


def test_tune_callbacks_pass_wandb_mode(monkeypatch):
    from ray.air.integrations.wandb import WandbLoggerCallback

    monkeypatch.setenv("WANDB_MODE", "offline")
    (cb,) = tune_callbacks(wandb_project="p")
    assert isinstance(cb, WandbLoggerCallback)
    assert cb.project == "p" and cb.kwargs == {"mode": "offline"}
