"""Benchmark: langreach-ppo from scratch, success rate over wall-clock time, vs a language-blind control.

Trains the ``langreach-ppo`` preset for ``--minutes`` of wall-clock time, then trains the same
model with ``env.instruction_mode=blind`` (the instruction never names the colour), and evaluates
each run's best checkpoint on ``--eval-episodes`` held-out seeds. Prints a table, writes
``OUT/langreach_ppo.json`` and the curve ``OUT/langreach_ppo.png``.

    python bench/langreach_ppo.py --minutes 30 --out docs/bench
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")


def run_variant(
    name: str, overrides: dict, minutes: float, out: Path, eval_episodes: int, reuse: bool
) -> dict:
    from vla_ray.evaluate import evaluate, load_policy
    from vla_ray.train import resolve, train

    run_dir = out / "runs" / name
    if reuse and (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
        wall = summary["time_s"]
    else:
        spec = resolve("langreach-ppo", overrides)
        t0 = time.time()
        summary = train(spec, run_dir, stop_seconds=minutes * 60.0, progress=False)
        wall = time.time() - t0
    curve = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ckpt = summary.get("best_checkpoint", summary["last_checkpoint"])
    final = evaluate(load_policy(ckpt), episodes=eval_episodes, progress=False)
    first_80 = next((r["time_s"] for r in curve if (r.get("success_rate") or 0.0) >= 0.8), None)
    return dict(
        variant=name,
        overrides=overrides,
        wall_s=round(wall, 1),
        env_steps=summary["env_steps"],
        train_success_last=summary.get("success_rate"),
        eval=final,
        minutes_to_80pct_train_success=None if first_80 is None else round(first_80 / 60.0, 1),
        curve=[
            dict(
                time_s=r["time_s"],
                env_steps=r["env_steps"],
                success_rate=r["success_rate"],
                success_by_target=r.get("success_by_target") or {},
            )
            for r in curve
        ],
    )


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for res in results:
        xs = [r["time_s"] / 60.0 for r in res["curve"] if r["success_rate"] is not None]
        ys = [r["success_rate"] for r in res["curve"] if r["success_rate"] is not None]
        ax.plot(xs, ys, label=f"{res['variant']} (eval {res['eval']['success_rate']:.0%})")
    ax.axhline(0.8, color="grey", ls="--", lw=0.8)
    ax.axhline(1 / 3, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("wall-clock minutes (2-core CPU)")
    ax.set_ylabel("training success rate (last 100 episodes)")
    ax.set_ylim(0, 1)
    ax.set_title("langreach-ppo: instruction vs language-blind control")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget per variant")
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--skip-blind", action="store_true")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of both variants, as vla-ray train --set (e.g. "
        "model.vision_config.recon_coeff=0.05); repeatable",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="evaluate finished runs in OUT/runs instead of retraining",
    )
    args = parser.parse_args()
    from vla_ray.train import parse_overrides

    try:
        common = parse_overrides(args.set)
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    variants = [("instruction", copy.deepcopy(common))]
    if not args.skip_blind:
        env_config = {**common.get("env_config", {}), "instruction_mode": "blind"}
        variants.append(("blind", {**copy.deepcopy(common), "env_config": env_config}))
    results = []
    for name, overrides in variants:
        results.append(
            run_variant(name, overrides, args.minutes, out, args.eval_episodes, args.reuse)
        )
        print(f"{name}: done", flush=True)

    import ray

    ray.shutdown()
    record = dict(
        bench="langreach_ppo",
        command=(
            f"python bench/langreach_ppo.py --minutes {args.minutes:g} --out {args.out}"
            + (" --skip-blind" if args.skip_blind else "")
            + "".join(f" --set {item}" for item in args.set)
        ),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        minutes_per_variant=args.minutes,
        results=results,
    )
    (out / "langreach_ppo.json").write_text(json.dumps(record, indent=2))
    plot(results, out / "langreach_ppo.png")
    print(
        f"\n{'variant':<12} {'env steps':>10} {'eval success':>13} {'mean return':>12} {'min to 80%':>11}"
    )
    for r in results:
        m80 = r["minutes_to_80pct_train_success"]
        print(
            f"{r['variant']:<12} {r['env_steps']:>10} {r['eval']['success_rate']:>13.2f} "
            f"{r['eval']['mean_return']:>12.2f} {('-' if m80 is None else m80):>11}"
        )
    for r in results:
        by_target = r["eval"].get("success_by_target") or {}
        counts = r["eval"].get("episodes_by_target") or {}
        print(
            f"{r['variant']} eval per target: "
            + "  ".join(f"{t} {v:.2f} ({counts.get(t)} eps)" for t, v in by_target.items())
        )
    print(f"\nwrote {out / 'langreach_ppo.json'} and {out / 'langreach_ppo.png'}")


if __name__ == "__main__":
    main()
