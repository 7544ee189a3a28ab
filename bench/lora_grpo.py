"""Benchmark: GRPO with LoRA from a weak BC start on LangReach, several seeds.

Per seed, the whole pipeline through the code of the CLI commands:

1. ``vla-ray collect --noise``: ``--demos`` expert episodes (reset seeds ``1000 * seed + i``),
   Gaussian noise of std ``--demo-noise`` on every action, recorded as executed;
2. ``vla-ray train --preset langreach-bc`` (``langreach-state-bc`` with ``--observation
   state``): ``--bc-iters`` updates on them (a weak start);
3. ``vla-ray eval``: ``--eval-episodes`` deterministic episodes of the start (seeds 100000+);
4. ``vla-ray train --preset langreach-lora-grpo`` (``langreach-state-lora-grpo``) ``--set
   model.pretrained_path=BC_CHECKPOINT``: ``--grpo-iters`` iterations (LoRA r=8 on the LM; the
   start is the reference; ``--set`` overrides the preset, by default ``GRPO_SET``: the start's
   log-std set to -1.2);
5. ``vla-ray eval`` of GRPO's last checkpoint on the same episodes.

The env: ``--observation pixels`` (LangReach-v0 at ``--image-size`` px) or ``state``
(LangReachState-v0: the targets' positions in the state, so the policy has to ground the colour
word), ``--targets`` targets, ``--episode-steps``-step episodes (``env_config``; the
2026-12-06/07 pixel attempts: one target, 32 then 64 px). Writes ``OUT/NAME.json`` and prints a
table of success before and after per seed. With ``--workdir`` the demos, runs and the start's
evaluation stay there and a later run with the same start settings reuses them (``--grpo-iters
0``: the start only). The defaults are the 64 px run of 2026-12-07 in docs/benchmarks.md ("fifth
attempt"); that run and the state run of 2026-12-07:

    python bench/lora_grpo.py --seeds 0 1 2 --workdir runs/lora_grpo --out docs/bench \
        --name lora_grpo_langreach64_g05
    python bench/lora_grpo.py --observation state --targets 3 --grpo-iters 100 --seeds 0 1 2 \
        --workdir runs/lora_grpo_state --out docs/bench --name lora_grpo_langreach_state
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")


# --observation: LangReach's env id and the BC / GRPO presets for it
OBSERVATIONS = {
    "pixels": ("vla_ray/LangReach-v0", "langreach-bc", "langreach-lora-grpo"),
    "state": ("vla_ray/LangReachState-v0", "langreach-state-bc", "langreach-state-lora-grpo"),
}


def env_config(args: argparse.Namespace) -> dict[str, Any]:
    """LangReach with ``--targets`` targets and ``--episode-steps``-step episodes, at
    ``--image-size`` px for pixels."""
    config = {"num_targets": args.targets, "max_episode_steps": args.episode_steps}
    if args.observation == "pixels":
        config["image_size"] = args.image_size
    return config


# the settings that make the start (demos, BC, its evaluation); a start is reused when they match
START_SETTINGS = (
    "demos",
    "demo_noise",
    "bc_iters",
    "bc_set",
    "eval_episodes",
    "image_size",
    "episode_steps",
    "observation",
    "targets",
)
NEVER = 1_000_000  # eval_every / checkpoint_every that never fires (the last checkpoint is kept)
# settings added to this script after runs were recorded, with the value those runs used
ADDED_SETTINGS = {
    "demo_noise": 0.0,
    "image_size": 32,
    "episode_steps": 20,
    "observation": "pixels",
    "targets": 1,
}
# GRPO's overrides of the preset by default: the BC start's log-std (the spread of the noisy
# demos, sigma ~0.6) replaced by -1.2 (sigma 0.30) for exploration; the presets carry the rest of
# the recipe (lr 3e-4, discounted return-to-go advantages, 2 x 32 groups, the CNN trained)
GRPO_SET = ("model.start_log_std=-1.2",)


def evaluate_checkpoint(checkpoint: Path, env: dict[str, Any], episodes: int) -> dict[str, Any]:
    """``vla-ray eval --checkpoint CHECKPOINT --episodes N`` (deterministic, seeds 100000+)."""
    from vla_ray.evaluate import evaluate, load_policy

    result = evaluate(load_policy(checkpoint), env_config=env, episodes=episodes, progress=False)
    keep = ("success_rate", "mean_return", "mean_length", "episodes")
    return {k: result[k] for k in keep if k in result}


def build_start(seed: int, args: argparse.Namespace, workdir: Path, bc_dir: Path) -> dict[str, Any]:
    """Stages 1-3: expert demos, BC on them, the start's evaluation."""
    from vla_ray.data import collect
    from vla_ray.train import _merge, parse_overrides, resolve, train

    t0 = time.time()
    demos = workdir / f"demos{seed}"
    env_id, bc_preset, _ = OBSERVATIONS[args.observation]
    summary = collect(
        env_id,
        "expert",
        args.demos,
        demos,
        seed=1000 * seed,
        env_config=env_config(args),
        progress=False,
        noise=args.demo_noise,
    )
    record: dict[str, Any] = {
        "demos": {k: summary.get(k) for k in ("episodes", "mean_return", "success_rate")}
    }
    bc = resolve(
        bc_preset,
        _merge(
            {
                "env_config": env_config(args),
                "seed": seed,
                "eval_every": NEVER,
                "checkpoint_every": NEVER,
            },
            parse_overrides(args.bc_set),
        ),
        data=demos,
    )
    train(bc, bc_dir, stop_iters=args.bc_iters, progress=False)
    record["bc_seconds"] = round(time.time() - t0)
    record["start"] = evaluate_checkpoint(
        bc_dir / "checkpoints" / "last", env_config(args), args.eval_episodes
    )
    return record


def run_seed(seed: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The five stages for one seed; their settings, timings and evaluations."""
    from vla_ray.train import _merge, parse_overrides, resolve, train

    record: dict[str, Any] = {"seed": seed}
    # the start (demos, BC, its evaluation) is kept in the workdir and reused by a later run of
    # the same start settings (e.g. --grpo-iters 0 first, then GRPO recipes from that start)
    start_key = {k: getattr(args, k) for k in START_SETTINGS}
    cache = workdir / f"start{seed}.json"
    bc_dir = workdir / f"bc{seed}"
    start = bc_dir / "checkpoints" / "last"
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("settings") == start_key and start.is_dir():
        record.update({k: cached[k] for k in ("demos", "bc_seconds", "start")}, start_reused=True)
    else:
        record.update(build_start(seed, args, workdir, bc_dir))
        cache.write_text(json.dumps({"settings": start_key, **record}, indent=2))
    print(f"seed {seed}: start {record['start']}", flush=True)
    if args.grpo_iters == 0:
        return record

    t1 = time.time()
    grpo_dir = workdir / f"{args.name}_grpo{seed}"
    grpo = resolve(
        args.preset,
        _merge(
            {
                "env_config": env_config(args),
                "seed": seed,
                "model": {"pretrained_path": str(start / "vla")},
                "checkpoint_every": NEVER,
            },
            parse_overrides(args.set),
        ),
    )
    summary = train(grpo, grpo_dir, stop_iters=args.grpo_iters, progress=False)
    record["grpo_seconds"] = round(time.time() - t1)
    record["grpo_env_steps"] = summary.get("env_steps")
    record["grpo_curve"] = read_curve(grpo_dir)
    record["after"] = evaluate_checkpoint(
        grpo_dir / "checkpoints" / "last", env_config(args), args.eval_episodes
    )
    print(f"seed {seed}: after {record['after']}", flush=True)
    return record


def read_curve(run_dir: Path) -> list[dict[str, Any]]:
    """Training success / return per iteration from the run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        keep = (
            "iteration",
            "env_steps",
            "episode_return_mean",
            "success_rate",
            "time_s",
            "learner",
        )
        rows.append({k: row[k] for k in keep if k in row})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--image-size", type=int, default=64, help="LangReach image side (px)")
    parser.add_argument("--episode-steps", type=int, default=30, help="max_episode_steps")
    parser.add_argument(
        "--observation",
        choices=sorted(OBSERVATIONS),
        default="pixels",
        help="pixels: LangReach-v0 (langreach-bc, langreach-lora-grpo); state: the targets' "
        "positions in the state, LangReachState-v0 (langreach-state-bc, "
        "langreach-state-lora-grpo)",
    )
    parser.add_argument("--targets", type=int, default=1, help="num_targets")
    parser.add_argument("--demos", type=int, default=200, help="expert episodes for BC")
    parser.add_argument(
        "--demo-noise",
        type=float,
        default=0.6,
        help="std of Gaussian noise on the expert's actions (recorded as executed: vla-ray "
        "collect --noise)",
    )
    parser.add_argument("--bc-iters", type=int, default=100, help="BC updates (batch 256)")
    parser.add_argument("--grpo-iters", type=int, default=60, help="0: the start only")
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument("--preset", help="GRPO preset (default: the --observation's)")
    parser.add_argument(
        "--set",
        action="append",
        help=f"GRPO override KEY=VALUE (default: {' '.join(GRPO_SET)})",
    )
    parser.add_argument("--bc-set", action="append", default=[], help="BC override KEY=VALUE")
    parser.add_argument("--name", default="lora_grpo_langreach64")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--workdir", help="keep the demos and run dirs here (default: a temp dir)")
    args = parser.parse_args()
    if args.preset is None:
        args.preset = OBSERVATIONS[args.observation][2]
    if args.set is None:
        args.set = list(GRPO_SET)

    import platform

    from vla_ray.train import init_ray

    init_ray(num_cpus=2)
    out = Path(args.out)
    path = out / f"{args.name}.json"
    # seeds run one at a time (each its own locked run) accumulate in one file; a seed run again
    # replaces its row only when the settings match
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "seeds", "workdir")}
    record = json.loads(path.read_text()) if path.exists() else {}
    # a setting added since a file was written: the value that file's runs had
    stored = {**ADDED_SETTINGS, **record.get("args", {})}
    if record and any(stored.get(k) != v for k, v in settings.items()):
        raise SystemExit(f"{path} holds runs with other settings: {record.get('args')}; use --name")
    runs = {r["seed"]: r for r in record.get("runs", [])}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        for seed in args.seeds:
            t0 = time.time()
            run = run_seed(seed, args, workdir)
            run.update(
                started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)),
                seconds=round(time.time() - t0),
                load_average_end=[round(x, 1) for x in os.getloadavg()],  # others' jobs beside
            )
            if path.exists():  # another process may have added a seed meanwhile
                runs.update({r["seed"]: r for r in json.loads(path.read_text())["runs"]})
            runs[seed] = run
            record = dict(
                bench=args.name,
                env_config=env_config(args),
                args=settings,
                machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                runs=[runs[k] for k in sorted(runs)],
            )
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2))
    runs = record["runs"]
    print("\n| seed | start success | after GRPO+LoRA | change | GRPO s | BC s |")
    print("|---|---|---|---|---|---|")
    for r in (r for r in runs if "after" in r):
        a, b = r["start"]["success_rate"], r["after"]["success_rate"]
        print(
            f"| {r['seed']} | {a:.2f} | {b:.2f} | {b - a:+.2f} | {r['grpo_seconds']} | "
            f"{r['bc_seconds']} |"
        )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
