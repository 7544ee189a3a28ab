"""Benchmark: train any preset for a budget and record its learning curve.

Runs ``--preset`` through the same code as ``vla-ray train`` (``resolve`` + ``train``) for
``--iters`` iterations or ``--minutes`` of wall-clock time, with ``--set KEY=VALUE`` overrides.
With ``--eval-episodes N`` the policy is evaluated on N held-out seeds (deterministic actions,
``vla_ray.evaluate``) before training (the start policy: ``model.pretrained_path`` when given,
else the freshly initialised one is skipped) and after (the run's last checkpoint; with ``--eval-best`` its best too).
Writes ``OUT/NAME.json`` (settings, machine, curve, evaluations) and ``OUT/NAME.png`` (return and
success over env steps) and prints a table.

    python bench/learning.py --preset langreach-grpo --minutes 30 --eval-episodes 100 \\
        --set model.pretrained_path=runs/bc --name grpo_langreach --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")


def machine() -> dict[str, Any]:
    """The machine the numbers come from."""
    import ray
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        python=platform.python_version(),
        ray=ray.__version__,
        torch=torch.__version__,
    )


def evaluate_path(path: str | Path, episodes: int, env_config: dict | None) -> dict[str, Any]:
    """Deterministic evaluation of a checkpoint / run dir / save_pretrained dir."""
    from vla_ray.evaluate import evaluate, load_policy
    from vla_ray.rl_module import resolve_pretrained_dir

    p = Path(path)
    if not (p / "learner_group").is_dir():  # not an RLlib checkpoint: find its VLA export
        p = resolve_pretrained_dir(p)
    policy = load_policy(p)
    return evaluate(policy, env_config=env_config, episodes=episodes, progress=False)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from vla_ray.train import parse_overrides, resolve, train

    # evaluation runs in this process: one thread (OpenMP spinning on a shared machine is slow)
    torch.set_num_threads(1)

    spec = resolve(args.preset, parse_overrides(args.set))
    name = args.name or args.preset.replace("-", "_")
    out = Path(args.out)
    run_dir = Path(args.run_dir or out / "runs" / name)
    env_config = dict(spec.settings["env_config"])
    env_config.pop("group_seeding", None)
    env_config.pop("expert_beta", None)
    result: dict[str, Any] = dict(
        name=name,
        preset=args.preset,
        overrides=args.set or [],
        budget=dict(iters=args.iters, minutes=args.minutes),
        machine=machine(),
    )
    start = spec.settings["model"].get("pretrained_path")
    if args.eval_episodes and start:
        print(f"evaluating the start policy {start} on {args.eval_episodes} episodes")
        result["eval_before"] = evaluate_path(start, args.eval_episodes, env_config)

    t0 = time.time()
    summary = train(
        spec,
        run_dir,
        stop_iters=args.iters,
        stop_seconds=None if args.minutes is None else args.minutes * 60.0,
        progress=not args.quiet,
    )
    result["wall_s"] = round(time.time() - t0, 1)
    result["env_steps"] = summary["env_steps"]
    curve = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result["curve"] = [
        {k: r.get(k) for k in ("iteration", "env_steps", "time_s", "episode_return_mean")}
        | {"success_rate": r.get("success_rate")}
        for r in curve
    ]
    if args.eval_episodes:
        for key, ckpt in (
            ("eval_after_last", summary["last_checkpoint"]),
            ("eval_after_best", summary.get("best_checkpoint") if args.eval_best else None),
        ):
            if ckpt:
                print(f"evaluating {ckpt} on {args.eval_episodes} episodes")
                result[key] = evaluate_path(ckpt, args.eval_episodes, env_config)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out / f"{name}.json")
    plot(result, out / f"{name}.png")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["env_steps"] for r in result["curve"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(steps, [r["episode_return_mean"] for r in result["curve"]])
    ax1.set(xlabel="env steps", ylabel="training episode return (mean)", title=result["name"])
    ax2.plot(steps, [r["success_rate"] for r in result["curve"]], label="training episodes")
    for key, marker in (("eval_before", "o"), ("eval_after_last", "s")):
        if key in result:
            x = 0 if key == "eval_before" else steps[-1]
            ax2.scatter([x], [result[key]["success_rate"]], marker=marker, label=key)
    ax2.set(xlabel="env steps", ylabel="success rate", ylim=(-0.02, 1.02))
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    rows = ["| policy | eval success | eval mean return | eval mean length |", "|---|---|---|---|"]
    for key in ("eval_before", "eval_after_last", "eval_after_best"):
        if key in result:
            e = result[key]
            rows.append(
                f"| {key} | {e['success_rate']:.2f} | {e['mean_return']:.2f} | "
                f"{e['mean_length']:.1f} |"
            )
    last = result["curve"][-1] if result["curve"] else {}
    rows.append(
        f"\n{result['name']}: {result['env_steps']} env steps in {result['wall_s']:.0f} s; "
        f"last training return {last.get('episode_return_mean')}, success "
        f"{last.get('success_rate')}"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="as in vla-ray train")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--iters", type=int)
    budget.add_argument("--minutes", type=float)
    p.add_argument("--eval-episodes", type=int, default=0)
    p.add_argument("--eval-best", action="store_true", help="also evaluate the best checkpoint")
    p.add_argument("--name", help="file name stem (default: the preset)")
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--run-dir", help="training output (default OUT/runs/NAME)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    result = run(args)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
