"""Run reports: learning curves, the eval table, an eval video, the config and the commands.

``write_report(run_dir)`` reads what ``vla-ray train`` (or ``vla-ray quickstart``, or
``vla-ray pretrain``: ``pretrain_config.json`` and one ``metrics.jsonl`` row per optimiser step)
left in a run directory (``config.json``, ``metrics.jsonl``, ``checkpoints/``, an eval JSON) and writes
``report.md`` (pictures beside it in ``report_files/``) and ``report.html`` (self-contained: the
pictures and the video are embedded). ``write_tune_comparison(summary)`` writes the comparison of
a search's trials. Plotting needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import base64
import html
import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vla_ray.checkpoint import META_NAME, run_checkpoints

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FILES_DIR = "report_files"
EVAL_FILES = ("eval.json", "eval_results.json")
PRETRAIN_CONFIG = "pretrain_config.json"  # what `vla-ray pretrain` writes in its run directory


class ReportError(ValueError):
    """The directory given to ``vla-ray report`` is not a run directory."""


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "vla-ray report: plotting needs matplotlib; install it with "
            "`pip install 'vla-ray[plot]'` (or `pip install matplotlib`)"
        ) from err
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (an unreadable line, e.g. from a crash, is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _x_axis(rows: list[dict[str, Any]]) -> tuple[list[float], str]:
    """Env steps when the run sampled any (and they grow), optimiser steps for a pretraining
    run, else iterations."""
    steps = [_finite(r.get("env_steps")) or 0.0 for r in rows]
    if steps and steps[-1] > 0 and all(b >= a for a, b in zip(steps, steps[1:], strict=False)):
        return steps, "env steps"
    if rows and all("step" in r and "iteration" not in r for r in rows):
        return [float(r["step"]) for r in rows], "optimiser step"
    return [float(r.get("iteration", i + 1)) for i, r in enumerate(rows)], "iteration"


def _marker(ys: list[float]) -> str | None:
    """Points are drawn on short curves (a one-iteration run would show nothing otherwise)."""
    return "o" if len(ys) < 30 else None


def _series(
    rows: list[dict[str, Any]], x: list[float], get: Any
) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for xi, r in zip(x, rows, strict=True):
        y = _finite(get(r))
        if y is not None:
            xs.append(xi)
            ys.append(y)
    return xs, ys


@dataclass
class Figure:
    """One picture of a report: a title, a file name and the PNG's path once drawn."""

    title: str
    name: str
    path: Path | None = None


def plot_curves(rows: list[dict[str, Any]], out_dir: Path, prefix: str = "") -> list[Figure]:
    """Learning-curve PNGs of ``metrics.jsonl`` rows in ``out_dir``: return, success (overall
    and per target), env steps/s and the learner's losses; for a pretraining run the token loss
    and samples/s per optimiser step. A curve with no data is left out."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    x, xlabel = _x_axis(rows)
    figures: list[Figure] = []

    def save(fig: Any, title: str, name: str) -> None:
        path = out_dir / f"{prefix}{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        figures.append(Figure(title, path.name, path))

    def single(key: str, title: str, ylabel: str) -> None:
        xs, ys = _series(rows, x, lambda r: r.get(key))
        if not ys:
            return
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(xs, ys, marker=_marker(ys))
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        save(fig, title, key)

    single("episode_return_mean", "Episode return", "mean return")
    single("loss", "Pretraining loss", "loss per labelled token")
    single("samples_per_s", "Pretraining samples per second", "samples/s")

    targets = sorted({t for r in rows for t in (r.get("success_by_target") or {})})
    xs, ys = _series(rows, x, lambda r: r.get("success_rate"))
    if ys:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(xs, ys, label="overall", color="black", linewidth=2, marker=_marker(ys))
        for t in targets:
            txs, tys = _series(rows, x, lambda r, t=t: (r.get("success_by_target") or {}).get(t))
            # a target named after a colour is drawn in it
            color = t if t in ("red", "green", "blue") else None
            ax.plot(txs, tys, label=t, color=color, alpha=0.8, marker=_marker(tys))
        ax.set(xlabel=xlabel, ylabel="success rate", title="Success", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        save(fig, "Success (overall and per target)", "success_rate")

    single("steps_per_s", "Env steps per second", "env steps/s")

    losses = sorted({k for r in rows for k in (r.get("learner") or {})})
    if losses:
        cols = min(3, len(losses))
        nrows = math.ceil(len(losses) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), squeeze=False)
        for ax, key in zip(axes.flat, losses, strict=False):
            lxs, lys = _series(rows, x, lambda r, k=key: (r.get("learner") or {}).get(k))
            ax.plot(lxs, lys, marker=_marker(lys))
            ax.set_title(key, fontsize="medium")
            ax.set_xlabel(xlabel, fontsize="small")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(losses) :]:
            ax.axis("off")
        save(fig, "Learner statistics", "learner")
    return figures


def find_eval(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The run's evaluation result (``eval.json`` as `vla-ray quickstart` and
    `vla-ray eval --json RUN/eval.json` write it), when there is one."""
    for name in EVAL_FILES:
        path = run_dir / name
        if path.is_file():
            result = json.loads(path.read_text())
            if isinstance(result, dict) and "success_rate" in result:
                return result, path
    return None


def eval_table(result: dict[str, Any]) -> list[list[str]]:
    """Rows (header first) of the evaluation table: overall, then one row per target."""
    table = [["", "episodes", "success rate", "mean return", "mean length"]]
    table.append(
        [
            "all",
            str(result.get("episodes", "-")),
            f"{result['success_rate']:.3f}",
            f"{result.get('mean_return', float('nan')):.3f}",
            f"{result.get('mean_length', float('nan')):.1f}",
        ]
    )
    counts = result.get("episodes_by_target") or {}
    for t, v in (result.get("success_by_target") or {}).items():
        table.append([t, str(counts.get(t, "-")), f"{v:.3f}", "", ""])
    return table


@dataclass
class Stage:
    """One training run inside the report's directory (a quickstart has several)."""

    name: str
    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    figures: list[Figure] = field(default_factory=list)

    @property
    def pretraining(self) -> bool:
        """A `vla-ray pretrain` run (its settings in ``pretrain_config.json``)."""
        return (self.path / PRETRAIN_CONFIG).is_file()

    @property
    def checkpoint(self) -> Path | None:
        for ckpt in run_checkpoints(self.path):
            if (ckpt / META_NAME).is_file():
                return ckpt
        return None


def find_stages(run_dir: Path) -> list[Stage]:
    """The training runs of ``run_dir``: itself, else its sub-directories with metrics (a
    quickstart's ``bc/`` and ``ppo/``, in the order they ran)."""
    dirs = (
        [run_dir]
        if (run_dir / "metrics.jsonl").is_file()
        else [p.parent for p in run_dir.glob("*/metrics.jsonl")]
    )
    if not dirs:
        raise ReportError(
            f"run_dir: {run_dir} holds no metrics.jsonl (nor do its sub-directories); expected "
            "the --output of `vla-ray train`, `vla-ray pretrain` or `vla-ray quickstart`"
        )
    stages = []
    for d in dirs:
        config_path = next(
            (d / n for n in ("config.json", PRETRAIN_CONFIG) if (d / n).is_file()), None
        )
        config = json.loads(config_path.read_text()) if config_path else {}
        rows = read_metrics(d / "metrics.jsonl")
        stages.append(Stage(d.name if d != run_dir else "run", d, config, rows))

    def started(stage: Stage) -> tuple[float, str]:
        # in the order they ran: each writes its config when it starts
        paths = [stage.path / n for n in ("config.json", PRETRAIN_CONFIG, "metrics.jsonl")]
        return (next(p for p in paths if p.is_file()).stat().st_mtime, stage.name)

    stages.sort(key=started)
    return stages


def pretrain_command(stage: Stage) -> str | None:
    """The ``vla-ray pretrain`` command that repeats a pretraining ``stage``: a flag per setting
    that differs from the default, and ``--max-steps`` at the step it reached."""
    from vla_ray.pretrain.trainer import PretrainConfig

    settings = dict(stage.config.get("pretrain") or {})
    if not settings.get("stage") or not settings.get("data"):
        return None
    defaults = PretrainConfig(stage=settings["stage"], data="", output="")
    flags = {
        "image_folder", "init", "vision", "llm", "tokenizer", "projector", "projector_tokens",
        "image_size", "num_workers", "use_gpu", "cpus_per_worker", "lora", "lora_r",
        "train_vision", "strategy", "precision", "batch_size", "grad_accum", "epochs", "lr",
        "max_length", "seed", "checkpoint_every", "max_bad_fraction",
    }  # fmt: skip
    cmd = ["vla-ray", "pretrain", "--stage", settings["stage"], "--data", str(settings["data"])]
    for key in sorted(flags):
        value = settings.get(key)
        if value == getattr(defaults, key, None) or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else f"--no-{flag[2:]}")
        else:
            cmd += [flag, str(value)]
    if settings.get("extra_model_config"):
        cmd += ["--model-config", json.dumps(settings["extra_model_config"])]
    if stage.rows:
        cmd += ["--max-steps", str(stage.rows[-1].get("step", len(stage.rows)))]
    cmd += ["--output", str(stage.path) + "-again"]
    return " ".join(shlex.quote(c) for c in cmd)


def _override_items(base: Any, run: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Dotted keys where ``run`` differs from ``base`` (leaves only)."""
    if isinstance(run, dict) and isinstance(base, dict):
        out = []
        for k, v in run.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in base:
                out.append((key, v))
            else:
                out += _override_items(base[k], v, key)
        return out
    return [] if base == run else [(prefix, run)]


def reproduce_command(stage: Stage) -> str | None:
    """The ``vla-ray train`` command that repeats ``stage``: its preset, a ``--set`` per setting
    that differs from the preset's and the iterations it ran (None without a preset)."""
    from vla_ray.train import SECTIONS, parse_value, resolve

    if stage.pretraining:
        return pretrain_command(stage)
    cfg = stage.config
    if not cfg.get("preset"):
        return None
    settings = {k: v for k, v in cfg.items() if k not in ("preset", "algorithm", "env")}
    try:
        base = resolve(cfg["preset"], data=settings.get("data")).settings
    except (ValueError, KeyError):
        base = {}
    # the stop criterion is given as a flag (the last iteration the run reached)
    settings.pop("stop", None)
    base.pop("stop", None)
    items = [
        (k, v)
        for k, v in _override_items(base, settings)
        if k != "data" and (k.split(".")[0] in SECTIONS or "." not in k)
    ]
    cmd = ["vla-ray", "train", "--preset", cfg["preset"]]
    if settings.get("data"):
        cmd += ["--data", str(settings["data"])]
    if stage.rows:
        cmd += ["--stop-iters", str(stage.rows[-1].get("iteration", len(stage.rows)))]
    cmd += ["--output", str(stage.path) + "-again"]
    for k, v in items:
        # a string that --set reads back as itself needs no JSON quotes
        text = v if isinstance(v, str) and parse_value(v) == v else json.dumps(v)
        cmd += ["--set", f"{k}={text}"]
    return " ".join(shlex.quote(c) for c in cmd)


def record_eval_video(
    checkpoint: Path, out_dir: Path, episodes: int = 3, seed: int = 100_000
) -> tuple[Path, dict[str, Any]]:
    """Evaluate ``episodes`` episodes of ``checkpoint`` while rendering them; the video is an
    mp4 (imageio-ffmpeg) or, without ffmpeg, an animated GIF. Returns its path and the result."""
    import importlib.util

    from vla_ray.evaluate import evaluate, load_policy

    suffix = ".mp4" if importlib.util.find_spec("imageio_ffmpeg") else ".gif"
    video = out_dir / f"eval_video{suffix}"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = evaluate(
        load_policy(checkpoint), episodes=episodes, seed=seed, video=video, progress=False
    )
    return video, result


def _data_uri(path: Path) -> str:
    mime = {
        ".png": "image/png",
        ".gif": "image/gif",
        ".mp4": "video/mp4",
    }[path.suffix]
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _md_table(table: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    return lines + ["| " + " | ".join(r) + " |" for r in table[1:]]


def _html_table(table: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table[1:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _final_row(stage: Stage) -> list[str]:
    last = stage.rows[-1] if stage.rows else {}

    def f(x: Any) -> str:
        x = _finite(x)
        return "-" if x is None else f"{x:.4g}"

    return [
        stage.name,
        str(stage.config.get("algorithm", "-")),
        str(last.get("iteration", "-")),
        str(last.get("env_steps", "-")),
        f(last.get("episode_return_mean")),
        f(last.get("success_rate")),
        f(last.get("time_s")),
    ]


def _pretrain_row(stage: Stage) -> list[str]:
    last = stage.rows[-1] if stage.rows else {}

    def f(x: Any) -> str:
        x = _finite(x)
        return "-" if x is None else f"{x:.4g}"

    total = sum(_finite(r.get("step_time_s")) or 0.0 for r in stage.rows)
    return [
        stage.name,
        str((stage.config.get("pretrain") or {}).get("stage", "-")),
        str(last.get("step", "-")),
        str(last.get("epoch", "-")),
        f(last.get("loss")),
        f(last.get("samples_per_s")),
        f(total) if stage.rows else "-",
    ]


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; font-size: 0.85rem; }
img, video { max-width: 100%; }
"""


def write_report(
    run_dir: str | Path,
    *,
    eval_video: bool = False,
    video_episodes: int = 3,
) -> dict[str, Path]:
    """Write ``report.md`` and ``report.html`` in ``run_dir``; returns their paths.

    With ``eval_video``, ``video_episodes`` episodes of the run's best checkpoint (the last
    stage's) are evaluated and rendered into the report.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run_dir: {run_dir} is not a directory")
    stages = find_stages(run_dir)
    files = run_dir / FILES_DIR
    files.mkdir(exist_ok=True)
    for stage in stages:
        prefix = "" if stage.path == run_dir else f"{stage.name}_"
        stage.figures = plot_curves(stage.rows, files, prefix=prefix)

    found = find_eval(run_dir)
    video: Path | None = None
    video_result: dict[str, Any] | None = None
    ckpt = next((s.checkpoint for s in reversed(stages) if s.checkpoint is not None), None)
    if eval_video:
        if ckpt is None:
            raise ReportError(f"--eval-video: no checkpoint under {run_dir} to evaluate")
        video, video_result = record_eval_video(ckpt, files, episodes=video_episodes)
        (files / "eval_video.json").write_text(json.dumps(video_result, indent=2))

    title = f"vla-ray report: {run_dir.resolve().name}"
    md: list[str] = [f"# {title}", ""]
    parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]

    rl_stages = [s for s in stages if not s.pretraining]
    if rl_stages:
        summary_table = [
            ["stage", "algorithm", "iterations", "env steps", "return", "success", "time (s)"]
        ]
        summary_table += [_final_row(s) for s in rl_stages]
        md += ["## Summary (last iteration)", "", *_md_table(summary_table), ""]
        parts += ["<h2>Summary (last iteration)</h2>", _html_table(summary_table)]
    pre_stages = [s for s in stages if s.pretraining]
    if pre_stages:
        table = [["run", "stage", "steps", "epoch", "loss", "samples/s", "time (s)"]]
        table += [_pretrain_row(s) for s in pre_stages]
        md += ["## Pretraining (last step)", "", *_md_table(table), ""]
        parts += ["<h2>Pretraining (last step)</h2>", _html_table(table)]

    if rl_stages or found:  # a pretraining run has no policy to evaluate
        md += ["## Evaluation", ""]
        parts.append("<h2>Evaluation</h2>")
        if found:
            result, path = found
            note = f"{result.get('env', '')}, from `{path.name}`"
            md += [note, "", *_md_table(eval_table(result)), ""]
            parts += [f"<p>{html.escape(note)}</p>", _html_table(eval_table(result))]
        else:
            note = (
                "No eval JSON in the run directory; write one with `vla-ray eval --checkpoint "
                f"{ckpt or 'CHECKPOINT'} --json {run_dir / 'eval.json'}`."
            )
            md += [note, ""]
            parts.append(f"<p>{html.escape(note)}</p>")
    if video is not None and video_result is not None:
        note = f"Eval video: {video_result['episodes']} episodes of `{ckpt}` (seeds from 100000)"
        md += [f"### {note}", "", *_md_table(eval_table(video_result)), ""]
        md += [f"[{video.name}]({FILES_DIR}/{video.name})", ""]
        parts += [f"<h3>{html.escape(note)}</h3>", _html_table(eval_table(video_result))]
        if video.suffix == ".mp4":
            parts.append(f'<video controls loop autoplay muted src="{_data_uri(video)}"></video>')
        else:
            parts.append(f'<img alt="eval video" src="{_data_uri(video)}">')

    md += ["## Learning curves", ""]
    parts.append("<h2>Learning curves</h2>")
    for stage in stages:
        if len(stages) > 1:
            md += [f"### {stage.name}", ""]
            parts.append(f"<h3>{html.escape(stage.name)}</h3>")
        if not stage.figures:
            md += ["(no metrics to plot)", ""]
            parts.append("<p>(no metrics to plot)</p>")
        for fig in stage.figures:
            md += [f"![{fig.title}]({FILES_DIR}/{fig.name})", ""]
            parts.append(
                f'<figure><img alt="{html.escape(fig.title)}" src="{_data_uri(fig.path)}">'
                f"<figcaption>{html.escape(fig.title)}</figcaption></figure>"
            )

    commands = [
        f"# {s.name}\n{cmd}" if len(stages) > 1 else cmd
        for s in stages
        if (cmd := reproduce_command(s))
    ]
    if ckpt is not None:
        commands.append(
            f"vla-ray eval --checkpoint {shlex.quote(str(ckpt))} --episodes 100 "
            f"--json {shlex.quote(str(run_dir / 'eval.json'))}"
        )
    commands.append(
        f"vla-ray report {shlex.quote(str(run_dir))}" + (" --eval-video" if eval_video else "")
    )
    md += ["## Reproduce", "", "```bash", *commands, "```", ""]
    parts += ["<h2>Reproduce</h2>", f"<pre>{html.escape(chr(10).join(commands))}</pre>"]

    md += ["## Resolved config", ""]
    parts.append("<h2>Resolved config</h2>")
    for stage in stages:
        text = json.dumps(stage.config, indent=2, default=str)
        if len(stages) > 1:
            md += [f"{stage.name} (`{stage.path / 'config.json'}`):", ""]
            parts.append(f"<p>{html.escape(stage.name)}:</p>")
        md += ["```json", text, "```", ""]
        parts.append(f"<pre>{html.escape(text)}</pre>")

    md_path = run_dir / REPORT_MD
    html_path = run_dir / REPORT_HTML
    md_path.write_text("\n".join(md))
    html_path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )
    return {"md": md_path, "html": html_path}


def write_tune_comparison(summary: dict[str, Any]) -> dict[str, Path]:
    """``comparison.md`` (the trials' table) and ``comparison.png`` (each trial's metric over
    iterations, from its ``metrics.jsonl``) in the search's output directory."""
    from vla_ray.tuning import format_table

    out = Path(summary["output"])
    metric = summary["metric"]
    md_path, png_path = out / "comparison.md", out / "comparison.png"
    lines = [f"# Search: {summary.get('config', out.name)}", ""]
    lines += ["```", format_table(summary), "```", ""]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = 0
    for trial in summary["trials"]:
        path = Path(trial["path"]) / "metrics.jsonl"
        rows = read_metrics(path) if path.is_file() else []
        xs, ys = _series(
            rows,
            [float(r.get("iteration", i + 1)) for i, r in enumerate(rows)],
            lambda r: r.get(metric),
        )
        if ys:
            star = "*" if trial["trial"] == summary.get("best_trial") else ""
            params = ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in trial["params"].items()
            )
            ax.plot(xs, ys, marker=".", label=f"{star}{params}"[:60] or trial["trial"])
            plotted += 1
    ax.set(xlabel="iteration", ylabel=metric, title=f"{metric} per trial")
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize="x-small", loc="best")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    lines += [f"![{metric} per trial](comparison.png)", ""]
    md_path.write_text("\n".join(lines))
    return {"md": md_path, "png": png_path}
