"""Benchmark: langreach-ppo from scratch, success rate over wall-clock time, vs a language-blind control.

Trains the ``langreach-ppo`` preset for ``--minutes`` of wall-clock time, then trains the same
model with ``env.instruction_mode=blind`` (the instruction never names the colour), and evaluates
each run's best checkpoint on ``--eval-episodes`` held-out seeds. Prints a table, writes
``OUT/NAME.json`` (after every run) and the curves ``OUT/NAME.png`` (NAME: ``--name``).

    python bench/langreach_ppo.py --minutes 30 --out docs/bench
    # the 5-seed check (the blind control with the first seed); runs can be split across days:
    # a finished run (OUT/runs/instruction_sS/summary.json) is evaluated again, not retrained
    python bench/langreach_ppo.py --minutes 30 --seeds 0 1 2 3 4 --reuse --out OUT
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
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="one instruction run per seed (runs/instruction_sS); the blind control runs with "
        "the first seed only (default: one run with the preset's seed, runs/instruction)",
    )
    parser.add_argument(
        "--name", default="langreach_ppo", help="OUT/NAME.json and OUT/NAME.png (the results)"
    )
    args = parser.parse_args()
    from vla_ray.train import parse_overrides

    try:
        common = parse_overrides(args.set)
    except ValueError as err:
        parser.error(str(err))
    if args.seeds is not None and "seed" in common:
        parser.error(f"--set seed={common['seed']} and --seeds {args.seeds}: give one of them")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = plan_variants(common, args.seeds, blind=not args.skip_blind)
    command = (
        f"python bench/langreach_ppo.py --minutes {args.minutes:g} --out {args.out}"
        + (" --skip-blind" if args.skip_blind else "")
        + ("" if args.seeds is None else " --seeds " + " ".join(map(str, args.seeds)))
        + "".join(f" --set {item}" for item in args.set)
    )
    results = []
    for name, overrides in variants:
        results.append(
            run_variant(name, overrides, args.minutes, out, args.eval_episodes, args.reuse)
        )
        print(f"{name}: done", flush=True)
        record = dict(
            bench="langreach_ppo",
            command=command,
            machine=f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
            minutes_per_variant=args.minutes,
            results=results,
            instruction_runs_at_80pct=summary_line(results),
        )
        (out / f"{args.name}.json").write_text(json.dumps(record, indent=2))

    import ray

    ray.shutdown()
    plot(results, out / f"{args.name}.png")
    print(
        f"\n{'variant':<16} {'env steps':>10} {'eval success':>13} {'mean return':>12} "
        f"{'min to 80%':>11}  per target (red / green / blue)"
    )
    for r in results:
        m80 = r["minutes_to_80pct_train_success"]
        by_target = r["eval"].get("success_by_target") or {}
        print(
            f"{r['variant']:<16} {r['env_steps']:>10} {r['eval']['success_rate']:>13.2f} "
            f"{r['eval']['mean_return']:>12.2f} {('-' if m80 is None else m80):>11}  "
            + " / ".join(f"{by_target[t]:.2f}" if t in by_target else "-" for t in TARGETS)
        )
    print(f"\n{summary_line(results)}")
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.png')}")


TARGETS = ("red", "green", "blue")


def plan_variants(
    common: dict, seeds: list[int] | None, blind: bool = True
) -> list[tuple[str, dict]]:
    """(run name, overrides) of every run: the instruction run per seed, then the blind control
    (first seed). Without seeds: the two runs of the preset's seed, named as before."""

    def blinded(overrides: dict) -> dict:
        env_config = {**overrides.get("env_config", {}), "instruction_mode": "blind"}
        return {**overrides, "env_config": env_config}

    if seeds is None:
        variants = [("instruction", copy.deepcopy(common))]
        return variants + ([("blind", blinded(copy.deepcopy(common)))] if blind else [])
    variants = [(f"instruction_s{s}", {**copy.deepcopy(common), "seed": s}) for s in seeds]
    if blind:
        variants.append(
            (f"blind_s{seeds[0]}", blinded({**copy.deepcopy(common), "seed": seeds[0]}))
        )
    return variants


def summary_line(results: list[dict], threshold: float = 0.8, colour_floor: float = 0.6) -> str:
    """How many instruction runs reach ``threshold`` eval success with every colour at least
    ``colour_floor`` (issue 30's bar for the headline)."""
    runs = [r for r in results if r["variant"].startswith("instruction")]
    ok = [
        r
        for r in runs
        if r["eval"]["success_rate"] >= threshold
        and all(v >= colour_floor for v in (r["eval"].get("success_by_target") or {}).values())
    ]
    return (
        f"instruction runs with eval success >= {threshold} and every colour >= {colour_floor}: "
        f"{len(ok)} of {len(runs)}"
    )


if __name__ == "__main__":
    main()
