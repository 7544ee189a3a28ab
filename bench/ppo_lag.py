"""Benchmark: PPO-Lagrangian vs plain PPO, violations per episode at equal return, several seeds.

Per seed, through the code of the CLI commands (``vla-ray train`` / ``vla-ray eval``):

1. the start: ``--ppo-preset`` from scratch for ``--start-steps`` env steps, the safety rules
   (``--rules``, monitor mode) counting the cost;
2. two fine-tuning arms from the start's weights (``model.pretrained_path``), the same
   ``--finetune-steps`` each: ``ppo`` (plain PPO, the control) and ``ppo_lag``
   (``--lag-preset`` with ``--cost-limit``, ``--lagrangian-lr``, ``--lagrangian-init``);
3. ``--eval-episodes`` deterministic episodes (reset seeds 100000+) of the start and of each
   arm's last checkpoint, with the rules counting: success, return, cost per episode.

Variants: ``--lag-set KEY=VALUE`` sets the ppo_lag arm only (``training.cost_critic=true``: the
separate cost critic), ``--lag-rules`` the rules it trains with, ``--lag-tag`` / ``--ppo-tag``
name the arms' directories (variants from the same starts side by side), ``--arms`` the arms
to run, ``--also-eval RULES`` more rules every stage is evaluated with, ``--start-only`` the
start only, ``--start-from DIR`` an existing run as the start (``{seed}`` in DIR replaced by the
seed; it is not trained, and its ``stage.json`` evaluation is reused when it has
``--eval-episodes`` episodes).

``--start-steps 0``: no start; both arms train from scratch for ``--finetune-steps`` (the same
env-step budget each). Other tasks: ``--ppo-preset`` / ``--lag-preset`` / ``--rules``; the driving
task (near misses on highway-env, docs/benchmarks.md)::

    python bench/ppo_lag.py --ppo-preset highway-state-ppo --lag-preset highway-state-ppo-lag \
        --rules envs/safety/highway_cost.yaml --start-steps 0 --finetune-steps 30000 \
        --set env_runners.sample_timeout_s=600 --seeds 0 --name ppo_lag_highway

A driving env's evaluation adds ``driving`` (route completion, collision rate, mean speed) and
every evaluation ``safety_per_episode`` (interventions per episode by rule id).

Writes ``OUT/NAME.json`` and prints a table per seed and arm. The start and the arms stay in
``--workdir``; a rerun reuses a finished stage whose settings match (nothing is lost when a later
stage fails). The defaults are LangReach with the keep-out disc (docs/benchmarks.md):

    python bench/ppo_lag.py --seeds 0 1 2 --workdir runs/ppo_lag --out docs/bench
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

NEVER = 1_000_000  # eval_every / checkpoint_every that never fires (the last checkpoint is kept)
ARMS = ("ppo", "ppo_lag")
# settings of both fine-tuning arms beyond the presets' (none by default; --set adds some)
FINETUNE_SET: tuple[str, ...] = ()


def evaluate_checkpoint(checkpoint: Path, rules: str, episodes: int) -> dict[str, Any]:
    """``vla-ray eval --checkpoint CHECKPOINT --safety RULES --episodes N`` (deterministic)."""
    from vla_ray.evaluate import evaluate, load_policy

    result = evaluate(
        load_policy(checkpoint), env_config={"safety": rules}, episodes=episodes, progress=False
    )
    keep = (
        "success_rate",
        "mean_return",
        "mean_length",
        "mean_episode_cost",
        "safety_per_episode",
        "driving",
        "success_by_target",
        "episodes",
    )
    return {k: result[k] for k in keep if k in result}


def read_curve(run_dir: Path) -> list[dict[str, Any]]:
    """Per iteration: env steps, return, success, episode cost and multiplier (training)."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.append(
            {
                "iteration": r.get("iteration"),
                "env_steps": r.get("env_steps"),
                "return": r.get("episode_return_mean"),
                "success": r.get("success_rate"),
                "episode_cost": r.get("episode_cost"),
                "lagrange_multiplier": (r.get("learner") or {}).get("lagrange_multiplier"),
                **({"driving": r["driving"]} if r.get("driving") else {}),
            }
        )
    return rows


def resolve_start(pattern: str, seed: int) -> Path:
    """The ``--start-from`` run directory for ``seed`` (``{seed}`` in ``pattern`` replaced by it);
    raises ``FileNotFoundError`` naming the flag and the path when the directory or its
    ``checkpoints/last/vla`` weights are missing."""
    run_dir = Path(pattern.replace("{seed}", str(seed)))
    weights = run_dir / "checkpoints" / "last" / "vla"
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"--start-from: expected a run directory for seed {seed}, got {str(run_dir)!r} "
            "(no such directory)"
        )
    if not weights.is_dir():
        raise FileNotFoundError(
            f"--start-from: expected the run's last checkpoint at {str(weights)!r} "
            f"(seed {seed}), got none (run {str(run_dir)!r})"
        )
    return run_dir


def add_also_eval(
    record: dict[str, Any], run_dir: Path, also_eval: list[str], episodes: int
) -> None:
    """Evaluate ``run_dir``'s last checkpoint with each rules file of ``also_eval`` that
    ``record["also_eval"]`` lacks (no such key when there are none)."""
    extra = record.setdefault("also_eval", {})
    for other in also_eval:
        if other not in extra:
            extra[other] = evaluate_checkpoint(run_dir / "checkpoints" / "last", other, episodes)
    if not extra:
        record.pop("also_eval")


def start_from_record(
    run_dir: Path, rules: str, episodes: int, also_eval: list[str] = ()
) -> dict[str, Any]:
    """The record of an existing start run: its ``stage.json`` record when that was evaluated
    over ``episodes`` episodes, else a new evaluation of its last checkpoint (nothing is written
    into ``run_dir``)."""
    done = run_dir / "stage.json"
    record: dict[str, Any] = {}
    if done.exists():
        stage = json.loads(done.read_text())
        if stage.get("settings", {}).get("eval_episodes") == episodes and "eval" in stage.get(
            "record", {}
        ):
            record = copy.deepcopy(stage["record"])
    if not record:
        record = {
            "curve": read_curve(run_dir) if (run_dir / "metrics.jsonl").exists() else [],
            "eval": evaluate_checkpoint(run_dir / "checkpoints" / "last", rules, episodes),
        }
    add_also_eval(record, run_dir, also_eval, episodes)
    record["from"] = str(run_dir)
    return record


def _stage(
    run_dir: Path,
    settings: dict[str, Any],
    build: Any,
    rules: str,
    episodes: int,
    also_eval: list[str] = (),
) -> dict[str, Any]:
    """Train (unless a finished run of the same settings is there), then evaluate (with
    ``rules``, and with each of ``also_eval`` under ``record["also_eval"][RULES]``; an evaluation
    a finished stage lacks is added to it)."""
    done = run_dir / "stage.json"
    if done.exists() and json.loads(done.read_text()).get("settings") == settings:
        record = json.loads(done.read_text())["record"]
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished or differently-set earlier try
        t0 = time.time()
        summary = build(run_dir)
        record = {
            "seconds": round(time.time() - t0),
            "env_steps": summary.get("env_steps"),
            "curve": read_curve(run_dir),
            "eval": evaluate_checkpoint(run_dir / "checkpoints" / "last", rules, episodes),
        }
    add_also_eval(record, run_dir, also_eval, episodes)
    done.write_text(json.dumps({"settings": settings, "record": record}, indent=2))
    return record


def run_seed(seed: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The start and both arms for one seed; settings, timings, curves and evaluations."""
    from vla_ray.train import _merge, parse_overrides, resolve, train

    def run(preset: str, steps: int, overrides: dict[str, Any], rules: str = args.rules):
        base = {
            "seed": seed,
            "env_config": {"safety": rules},
            "eval_every": NEVER,
            "checkpoint_every": NEVER,
        }
        spec = resolve(preset, _merge(base, copy.deepcopy(overrides)))
        return lambda out: train(spec, out, stop_timesteps=steps, progress=False)

    start_set = parse_overrides(args.start_set)
    start_settings = {
        "preset": args.ppo_preset,
        "steps": args.start_steps,
        "rules": args.rules,
        **({"overrides": start_set} if start_set else {}),
    }
    start_dir = workdir / f"start{seed}"
    record: dict[str, Any] = {"seed": seed}
    if args.start_from:  # an existing run, not trained here
        start_dir = resolve_start(args.start_from, seed)
        start_settings = {"from": str(start_dir)}
        record["start"] = start_from_record(
            start_dir, args.rules, args.eval_episodes, args.also_eval
        )
        print(f"seed {seed}: start {start_dir} {record['start']['eval']}", flush=True)
    elif args.start_steps == 0:  # both arms from scratch
        start_settings = {"from_scratch": True}
    else:
        record["start"] = _stage(
            start_dir,
            {**start_settings, "eval_episodes": args.eval_episodes},
            run(args.ppo_preset, args.start_steps, start_set),
            args.rules,
            args.eval_episodes,
            args.also_eval,
        )
        print(f"seed {seed}: start {record['start']['eval']}", flush=True)
    if args.start_only:
        return record
    weights = (
        {"model": {"pretrained_path": str(start_dir / "checkpoints" / "last" / "vla")}}
        if args.start_steps or args.start_from
        else {}
    )
    lag = {
        "cost_limit": args.cost_limit,
        "lagrangian_lr": args.lagrangian_lr,
        "lagrangian_init": args.lagrangian_init,
    }
    lag_rules = args.lag_rules or args.rules
    for arm in args.arms:
        preset = args.ppo_preset if arm == "ppo" else args.lag_preset
        # --set applies to both arms (the same PPO settings; ppo_lag adds the constraint and
        # --lag-set)
        shared = _merge(copy.deepcopy(weights), parse_overrides(args.set))
        overrides = (
            shared
            if arm == "ppo"
            else _merge(_merge(shared, {"training": dict(lag)}), parse_overrides(args.lag_set))
        )
        settings = {
            "start": start_settings,
            "preset": preset,
            "steps": args.finetune_steps,
            "overrides": overrides,
            "eval_episodes": args.eval_episodes,
        }
        train_rules = args.rules
        if arm == "ppo_lag" and lag_rules != args.rules:
            settings["rules"] = train_rules = lag_rules
        record[arm] = _stage(
            workdir / f"{arm}{args.lag_tag if arm == 'ppo_lag' else args.ppo_tag}{seed}",
            settings,
            run(preset, args.finetune_steps, overrides, train_rules),
            args.rules,
            args.eval_episodes,
            args.also_eval,
        )
        print(f"seed {seed}: {arm} {record[arm]['eval']}", flush=True)
    return record


def table(records: list[dict[str, Any]]) -> str:
    """Markdown table: per seed and stage, eval success / return / cost and the multiplier."""
    lines = [
        "| seed | run | eval success | eval return | eval cost / episode "
        "| train cost / episode (last 5 it.) | lambda at the end | eval collisions / speed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        for stage in ("start", *ARMS):
            if stage not in rec:
                continue
            r = rec[stage]
            ev, curve = r["eval"], r["curve"][-5:]
            costs = [c["episode_cost"] for c in curve if c["episode_cost"] is not None]
            lam = curve[-1]["lagrange_multiplier"] if curve else None
            drive = ev.get("driving") or {}
            crash = (
                f"{drive['collision_rate']:.2f} / {drive.get('mean_speed', float('nan')):.1f} m/s"
                if drive
                else "-"
            )
            lines.append(
                f"| {rec['seed']} | {stage} | {ev['success_rate']:.2f} | {ev['mean_return']:.2f} "
                f"| {ev.get('mean_episode_cost', float('nan')):.2f} "
                f"| {sum(costs) / max(1, len(costs)):.2f} "
                f"| {'-' if lam is None else f'{lam:.2f}'} | {crash} |"
            )
            for other, ev2 in (r.get("also_eval") or {}).items():
                lines.append(
                    f"| {rec['seed']} | {stage} (eval with {other}) | {ev2['success_rate']:.2f} "
                    f"| {ev2['mean_return']:.2f} "
                    f"| {ev2.get('mean_episode_cost', float('nan')):.2f} | | | |"
                )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ppo-preset", default="langreach-state-ppo")
    p.add_argument("--lag-preset", default="langreach-state-ppo-lag")
    p.add_argument("--rules", default="envs/safety/langreach_keepout.yaml")
    p.add_argument(
        "--start-steps",
        type=int,
        default=200_000,
        help="env steps of the PPO start (0: no start, both arms from scratch)",
    )
    p.add_argument("--finetune-steps", type=int, default=100_000)
    p.add_argument("--cost-limit", type=float, default=0.25)
    p.add_argument("--lagrangian-lr", type=float, default=0.2)
    p.add_argument("--lagrangian-init", type=float, default=1.0)
    p.add_argument(
        "--set",
        action="append",
        default=list(FINETUNE_SET),
        metavar="KEY=VALUE",
        help="a setting of both fine-tuning arms (repeatable; default: %(default)s)",
    )
    p.add_argument(
        "--lag-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the ppo_lag arm only (repeatable; e.g. training.cost_critic=true)",
    )
    p.add_argument(
        "--lag-rules",
        default=None,
        help="the safety rules the ppo_lag arm trains with (default: --rules; every "
        "evaluation uses --rules and --also-eval)",
    )
    p.add_argument(
        "--lag-tag",
        default="",
        help="a suffix of the ppo_lag arm's directory (ppo_lagTAGSEED), so that variants "
        "from the same starts do not replace each other",
    )
    p.add_argument(
        "--ppo-tag",
        default="",
        help="a suffix of the ppo arm's directory (ppoTAGSEED), e.g. for another --set",
    )
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument(
        "--also-eval",
        action="append",
        default=[],
        metavar="RULES",
        help="more rules files every stage is also evaluated with (repeatable)",
    )
    p.add_argument(
        "--start-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the start run only (repeatable; the arms load its model, e.g. "
        "model.head_config.squash=true)",
    )
    p.add_argument(
        "--start-from",
        default=None,
        metavar="DIR",
        help="fine-tune from an existing run (a directory with checkpoints/last/vla, e.g. an "
        "earlier start or a --start-steps 0 arm) instead of training the start; {seed} in DIR "
        "is replaced by the seed (e.g. runs/ppo_lag/start{seed}); --start-steps / --start-set "
        "are not used",
    )
    p.add_argument(
        "--start-only",
        action="store_true",
        help="train and evaluate the start only (the arms can run later from it)",
    )
    p.add_argument("--eval-episodes", type=int, default=100)
    p.add_argument("--workdir", default="runs/ppo_lag")
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--name", default="ppo_lag_langreach_keepout")
    args = p.parse_args()
    if args.start_steps < 0 or (args.start_only and args.start_steps == 0):
        p.error(
            f"--start-steps: expected > 0 with --start-only, >= 0 otherwise, got {args.start_steps}"
        )

    if args.start_from:
        if args.start_only:
            p.error(f"--start-from: expected no --start-only with it, got {args.start_from!r}")
        for seed in args.seeds:  # every seed's start checked before anything trains
            try:
                resolve_start(args.start_from, seed)
            except FileNotFoundError as e:
                p.error(str(e))

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    records = [run_seed(s, args, workdir) for s in args.seeds]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    path.write_text(json.dumps({"settings": vars(args), "seeds": records}, indent=2))
    if not args.start_only:
        print(table(records))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
