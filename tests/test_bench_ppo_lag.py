"""bench/ppo_lag.py's ``--start-from``: the per-seed path, the errors naming the flag and the
path, the start's record reused from its ``stage.json`` (nothing written there), and the arms
fine-tuned from its weights without a start being trained."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "bench_ppo_lag", Path(__file__).parents[1] / "bench" / "ppo_lag.py"
)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

EVAL = {"success_rate": 0.0, "mean_return": 64.2, "mean_episode_cost": 2.58, "episodes": 50}


def _run_dir(root: Path, name: str, eval_episodes: int | None = 50) -> Path:
    """A finished run: last checkpoint's weights, metrics, and (optionally) a stage.json."""
    run = root / name
    (run / "checkpoints" / "last" / "vla").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(
        json.dumps({"iteration": 1, "env_steps": 2048, "episode_return_mean": 1.0}) + "\n"
    )
    if eval_episodes is not None:
        stage = {
            "settings": {"start": {"from_scratch": True}, "eval_episodes": eval_episodes},
            "record": {"seconds": 5, "env_steps": 2048, "curve": [], "eval": dict(EVAL)},
        }
        (run / "stage.json").write_text(json.dumps(stage))
    return run


def test_resolve_start_replaces_the_seed_and_names_the_flag_and_path(tmp_path):
    run = _run_dir(tmp_path, "ppo1")
    assert bench.resolve_start(str(tmp_path / "ppo{seed}"), 1) == run
    assert bench.resolve_start(str(run), 7) == run  # no {seed}: the same run for every seed
    with pytest.raises(FileNotFoundError, match=r"--start-from.*seed 2.*ppo2.*no such directory"):
        bench.resolve_start(str(tmp_path / "ppo{seed}"), 2)
    (tmp_path / "empty3").mkdir()
    with pytest.raises(FileNotFoundError, match=r"--start-from.*empty3/checkpoints/last/vla"):
        bench.resolve_start(str(tmp_path / "empty{seed}"), 3)


def test_start_record_reuses_stage_json_and_writes_nothing(tmp_path, monkeypatch):
    run = _run_dir(tmp_path, "ppo1")
    before = sorted(p.name for p in run.rglob("*"))
    calls = []
    monkeypatch.setattr(
        bench, "evaluate_checkpoint", lambda ckpt, rules, n: calls.append(n) or {"n": n}
    )
    rec = bench.start_from_record(run, "rules.yaml", 50)
    assert rec["eval"] == EVAL and rec["from"] == str(run) and calls == []
    rec = bench.start_from_record(run, "rules.yaml", 20)  # other episode count: evaluated anew
    assert rec["eval"] == {"n": 20} and calls == [20] and rec["curve"][0]["env_steps"] == 2048
    assert sorted(p.name for p in run.rglob("*")) == before


def test_arms_fine_tune_from_the_given_run_without_training_a_start(tmp_path, monkeypatch):
    import vla_ray.train

    start = _run_dir(tmp_path, "ppo1")
    trained = []

    def fake_train(spec, out, **kw):
        trained.append((Path(out).name, spec))
        _run_dir(Path(out).parent, Path(out).name, eval_episodes=None)
        return {"env_steps": kw["stop_timesteps"]}

    monkeypatch.setattr(vla_ray.train, "train", fake_train)
    monkeypatch.setattr(bench, "evaluate_checkpoint", lambda ckpt, rules, n: dict(EVAL))
    args = argparse.Namespace(
        start_from=str(tmp_path / "ppo{seed}"),
        rules="envs/safety/highway_cost.yaml",
        ppo_preset="highway-state-ppo",
        lag_preset="highway-state-ppo-lag",
        start_steps=30000,
        start_set=[],
        start_only=False,
        finetune_steps=4096,
        cost_limit=0.25,
        lagrangian_lr=0.2,
        lagrangian_init=5.0,
        set=[],
        lag_set=[],
        lag_rules=None,
        lag_tag="",
        ppo_tag="",
        arms=["ppo", "ppo_lag"],
        also_eval=[],
        eval_episodes=50,
    )
    work = tmp_path / "work"
    rec = bench.run_seed(1, args, work)
    assert [name for name, _ in trained] == ["ppo1", "ppo_lag1"]  # no start1 trained
    assert not (work / "start1").exists()
    assert rec["start"]["from"] == str(start)
    stage = json.loads((work / "ppo_lag1" / "stage.json").read_text())
    assert stage["settings"]["start"] == {"from": str(start)}
    assert stage["settings"]["overrides"]["model"]["pretrained_path"] == str(
        start / "checkpoints" / "last" / "vla"
    )


def test_main_rejects_a_missing_start_before_training(tmp_path, monkeypatch, capsys):
    _run_dir(tmp_path, "ppo1")
    pattern = str(tmp_path / "ppo{seed}")
    monkeypatch.setattr(sys, "argv", ["ppo_lag.py", "--seeds", "1", "2", "--start-from", pattern])
    monkeypatch.setattr(bench, "run_seed", lambda *a: pytest.fail("trained"))
    with pytest.raises(SystemExit):
        bench.main()
    err = capsys.readouterr().err
    assert "--start-from" in err and str(tmp_path / "ppo2") in err
