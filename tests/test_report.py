"""vla-ray report: a real (tiny) run's directory -> report.md + a self-contained report.html;
vla-ray tune's trial comparison."""

from __future__ import annotations

import json
import re

import pytest

from vla_ray.cli import main

pytest.importorskip("matplotlib")

# one-target, 20-step LangReach, one small PPO iteration in this process
TINY = {"num_targets": 1, "image_size": 32, "max_episode_steps": 20}


@pytest.fixture(scope="module")
def tiny_run(ray_session, tmp_path_factory):
    """The run directory of a 2-iteration local PPO training (real metrics and checkpoints)."""
    from vla_ray.train import resolve, train

    spec = resolve(
        "langreach-ppo",
        {
            "env_config": TINY,
            "training": {"train_batch_size_per_learner": 64, "minibatch_size": 32, "num_epochs": 1},
            "env_runners": {"num_envs_per_env_runner": 2},
        },
        local=True,
    )
    out = tmp_path_factory.mktemp("report") / "run"
    train(spec, out, stop_iters=2, progress=False)
    return out


def _sections(md: str) -> list[str]:
    return re.findall(r"^## (.+)$", md, flags=re.M)


def test_report_writes_md_and_self_contained_html(tiny_run, capsys):
    assert main(["report", str(tiny_run)]) == 0
    assert "report.html" in capsys.readouterr().out
    md = (tiny_run / "report.md").read_text()
    assert _sections(md) == [
        "Summary (last iteration)",
        "Evaluation",
        "Learning curves",
        "Reproduce",
        "Resolved config",
    ]
    # curves from metrics.jsonl: return, success and the PPO learner's statistics, as PNGs
    for name in ("episode_return_mean", "success_rate", "learner"):
        png = tiny_run / "report_files" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](report_files/{name}.png)" in md
    # the command repeats the run: its preset, the iterations and the settings that differ
    assert "vla-ray train --preset langreach-ppo --stop-iters 2" in md
    assert "--set env_config.max_episode_steps=20" in md
    assert "--set training.train_batch_size_per_learner=64" in md
    assert "No eval JSON" in md
    # the config section is the run's config.json
    config = json.loads((tiny_run / "config.json").read_text())
    assert json.dumps(config, indent=2) in md
    html = (tiny_run / "report.html").read_text()
    # self-contained: every picture is a data URI, no reference to a file beside it
    assert html.count('src="data:image/png;base64,') >= 3
    assert "report_files/" not in html


def test_report_shows_the_eval_table_and_embeds_an_eval_video(tiny_run):
    (tiny_run / "eval.json").write_text(
        json.dumps(
            dict(
                env="vla_ray/LangReach-v0",
                episodes=4,
                success_rate=0.75,
                mean_return=1.5,
                mean_length=12.0,
                episodes_by_target={"red": 4},
                success_by_target={"red": 0.75},
            )
        )
    )
    assert main(["report", str(tiny_run), "--eval-video", "--episodes", "1"]) == 0
    md = (tiny_run / "report.md").read_text()
    assert "| all | 4 | 0.750 | 1.500 | 12.0 |" in md
    assert "| red | 4 | 0.750 |  |  |" in md
    video = next((tiny_run / "report_files").glob("eval_video.*"))
    assert video.stat().st_size > 1000
    played = json.loads((tiny_run / "report_files" / "eval_video.json").read_text())
    assert played["episodes"] == 1 and 1 <= played["mean_length"] <= 20
    html = (tiny_run / "report.html").read_text()
    assert 'src="data:video/mp4;base64,' in html or 'src="data:image/gif;base64,' in html


def test_report_on_a_directory_without_metrics_is_a_named_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "run_dir" in err and "metrics.jsonl" in err


def test_tune_comparison_table_and_plot(tmp_path):
    from vla_ray.report import write_tune_comparison

    trials = []
    for i, lr in enumerate((1e-3, 1e-4)):
        path = tmp_path / f"trial_{i}"
        path.mkdir()
        rows = [{"iteration": it, "success_rate": 0.1 * it * (i + 1)} for it in (1, 2, 3)]
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        trials.append(
            dict(
                trial=path.name,
                status="TERMINATED",
                params={"training.lr": lr},
                iterations=3,
                env_steps=300,
                last=rows[-1]["success_rate"],
                best=rows[-1]["success_rate"],
                best_checkpoint_iteration=3,
                path=str(path),
            )
        )
    summary = dict(
        config="x.yaml",
        output=str(tmp_path),
        metric="success_rate",
        mode="max",
        trials=trials,
        best_trial="trial_1",
        best_value=0.6,
        best_params={"training.lr": 1e-4},
        best_checkpoint=None,
    )
    paths = write_tune_comparison(summary)
    md = paths["md"].read_text()
    assert "*trial_1" in md and "training.lr" in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_report_of_a_pretraining_run(tmp_path, capsys):
    """`vla-ray report` on a `vla-ray pretrain` output: loss and throughput curves per
    optimiser step, the last step's table and the command that repeats it; no eval section."""
    run = tmp_path / "vlm-align"
    run.mkdir()
    settings = {"stage": "align", "data": "/d/llava.json", "batch_size": 16, "lr": 0.01}
    (run / "pretrain_config.json").write_text(json.dumps({"pretrain": settings}))
    rows = [
        {"step": s, "epoch": 0, "loss": 3.0 / s, "tokens": 90, "samples_per_s": 20.0 + s,
         "step_time_s": 0.5}
        for s in range(1, 6)
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert _sections(md) == [
        "Pretraining (last step)",
        "Learning curves",
        "Reproduce",
        "Resolved config",
    ]
    assert "| run | align | 5 | 0 | 0.6 | 25 | 2.5 |" in md
    assert (run / "report_files" / "loss.png").is_file()
    assert (run / "report_files" / "samples_per_s.png").is_file()
    assert (
        "vla-ray pretrain --stage align --data /d/llava.json --batch-size 16 --lr 0.01 "
        f"--max-steps 5 --output {run}-again" in md
    )
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2
