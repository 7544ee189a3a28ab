"""Benchmark: offline RL on locomotion datasets collected here (D4RL-style), normalised scores.

For each ``--env ENV=EXPERT`` (EXPERT: a checkpoint ``vla-ray collect --policy`` accepts, e.g. a
SAC checkpoint of ``vla-ray train``), the script

1. measures the reference returns: the random policy (score 0) and the expert (score 100);
2. collects three datasets with ``vla-ray collect``'s machinery:
   ``medium`` (the expert with Gaussian action noise ``--medium-noise``), ``medium-replay``
   (the medium policy taking a uniformly random action at each step with probability 1.0,
   0.75, 0.5 or 0.25, a quarter of the episodes each: from a random agent to a nearly medium
   one, like a learning agent's replay buffer) and ``medium-expert`` (medium + noiseless
   expert episodes);
3. trains each algorithm of ``--algos`` (presets ``hopper-ALGO`` with the env swapped in) for a
   fixed budget of ``--iters`` updates, evaluating every ``--eval-every`` updates on
   ``--eval-episodes`` episodes;
4. reports the normalised score ``100 * (R - R_random) / (R_expert - R_random)`` of the final
   and of the best evaluation, and of the last checkpoint re-evaluated on ``--final-episodes``
   seeded episodes (the in-training evaluations are few episodes each, so one episode moves
   them; the re-evaluation is the steadier number).

Algorithms (or presets) missing from this checkout are skipped with a message (CQL and IQL come
from the SAC work). Prints a table, writes ``OUT/offline.json`` and ``OUT/offline.md``.

    flock /work/cpu.lock python bench/offline.py \\
        --env vla_ray/Hopper-v5=runs/hopper-sac/checkpoints/best \\
        --env vla_ray/HalfCheetah-v5=runs/cheetah-sac/checkpoints/best \\
        --algos bc,td3bc,cql,iql,dt --iters 20000 --out docs/bench

One process per env (e.g. on two cores), then one report:

    python bench/offline.py --env vla_ray/Hopper-v5=... --work W1 --out O1 &
    python bench/offline.py --env vla_ray/HalfCheetah-v5=... --work W2 --out O2
    python bench/offline.py merge docs/bench O1 O2

An interrupted run continues with ``--resume`` (finished runs are kept in WORK). A setting of
one algorithm's runs is changed with ``--set ALGO:KEY=VALUE`` (keys as in ``vla-ray train
--set``, e.g. ``--set cql:training.min_q_weight=10``); each row records its settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

DATASETS = ("medium", "medium-replay", "medium-expert")


def reference_return(env_id: str, policy: str, episodes: int, out: Path) -> float:
    from vla_ray.data import collect

    summary = collect(env_id, policy, episodes, out, seed=10_000, progress=False, overwrite=True)
    return summary["mean_return"]


# medium-replay: the medium policy with a uniformly random action at each step with these
# probabilities (from a random agent to a nearly medium one, as in a learning agent's replay)
REPLAY_RANDOM_PROBS = (1.0, 0.75, 0.5, 0.25)


def build_datasets(
    env_id: str, expert: str, root: Path, episodes: int, medium_noise: float
) -> dict[str, Path]:
    """The three datasets of ``env_id`` under ``root`` (each reused when present)."""
    from vla_ray.data import collect, read_episodes, write_episodes

    paths = {name: root / name for name in DATASETS}

    def missing(name: str) -> bool:
        return not (paths[name] / "dataset.json").is_file()

    if missing("medium"):
        collect(
            env_id,
            expert,
            episodes,
            paths["medium"],
            noise=medium_noise,
            seed=0,
            progress=False,
            overwrite=True,  # an incomplete one (no dataset.json)
        )
    if missing("medium-replay"):
        parts = []
        n = max(1, episodes // len(REPLAY_RANDOM_PROBS))
        for i, p in enumerate(REPLAY_RANDOM_PROBS):
            part = root / f".replay-{i}"
            if part.exists():
                shutil.rmtree(part)
            kw = dict(noise=medium_noise, random_prob=p, seed=1000 * (i + 1), progress=False)
            collect(env_id, expert, n, part, **kw)
            parts.append(part)
        write_episodes(
            (ep for part in parts for ep in read_episodes(part)),
            paths["medium-replay"],
            dict(
                env=env_id,
                policy=expert,
                noise=medium_noise,
                random_prob=list(REPLAY_RANDOM_PROBS),
                style="medium-replay",
            ),
            overwrite=True,
        )
    if missing("medium-expert"):
        expert_part = root / ".expert"
        if not (expert_part / "dataset.json").is_file():
            collect(
                env_id, expert, episodes, expert_part, seed=5000, progress=False, overwrite=True
            )
        write_episodes(
            (ep for part in (paths["medium"], expert_part) for ep in read_episodes(part)),
            paths["medium-expert"],
            dict(env=env_id, policy=expert, noise=[medium_noise, 0.0], style="medium-expert"),
            overwrite=True,
        )
    return paths


def available(algo: str) -> str | None:
    """None when ``algo`` can run here, else why not."""
    from vla_ray.algorithms import ALGORITHMS
    from vla_ray.presets import PRESETS

    if algo not in ALGORITHMS:
        return f"algorithm {algo!r} is not in this checkout (have {', '.join(ALGORITHMS)})"
    if f"hopper-{algo}" not in PRESETS:
        return f"no preset hopper-{algo}"
    return None


def algo_overrides(items: list[str], algos: list[str]) -> dict[str, dict[str, Any]]:
    """``["cql:training.alpha_lr=1e-3"]`` -> ``{"cql": {"training": {"alpha_lr": 0.001}}}``;
    ValueError naming the item when it is malformed or names an algorithm not run."""
    from vla_ray.train import parse_overrides

    settings: dict[str, list[str]] = {}
    for item in items:
        algo, sep, setting = item.partition(":")
        if not sep or algo not in algos:
            raise ValueError(
                f"--set {item!r}: expected ALGO:KEY=VALUE with ALGO one of {', '.join(algos)} "
                "(e.g. cql:training.alpha_lr=1e-3)"
            )
        settings.setdefault(algo, []).append(setting)
    return {algo: parse_overrides(group) for algo, group in settings.items()}


def train_one(
    algo: str,
    env_id: str,
    data: Path,
    run_dir: Path,
    iters: int,
    eval_every: int,
    eval_eps: int,
    overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Evaluation returns [(iteration, return)] of one training run."""
    from vla_ray.presets import get_preset
    from vla_ray.train import resolve, train

    preset = dataclasses.replace(get_preset(f"hopper-{algo}"), env=env_id)
    settings = {**(overrides or {}), "eval_every": eval_every, "eval_episodes": eval_eps}
    spec = resolve(preset, settings, data=str(data))
    train(spec, run_dir, stop_iters=iters, progress=False)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        dict(iteration=r["iteration"], episode_return_mean=r["episode_return_mean"])
        for r in rows
        if r["iteration"] % eval_every == 0 and r["episode_return_mean"] is not None
    ]


FINAL_EVAL_SEED = 20_000  # seeds of the last checkpoint's re-evaluation (away from training)


def final_evaluation(run_dir: Path, episodes: int) -> dict[str, Any] | None:
    """Mean return and length of the run's last checkpoint over ``episodes`` seeded episodes;
    None when there is none or it only runs on the EnvRunners (the Decision Transformer)."""
    from vla_ray.evaluate import evaluate, load_policy

    try:
        policy = load_policy(run_dir / "checkpoints" / "last")
    except (FileNotFoundError, ValueError) as err:
        print(f"{run_dir}: not re-evaluated: {err}")
        return None
    res = evaluate(policy, episodes=episodes, seed=FINAL_EVAL_SEED, progress=False)
    return dict(episodes=episodes, mean_return=res["mean_return"], mean_length=res["mean_length"])


def normalised(ret: float, random_ret: float, expert_ret: float) -> float:
    return 100.0 * (ret - random_ret) / max(expert_ret - random_ret, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--env", action="append", required=True, help="ENV_ID=EXPERT_CHECKPOINT")
    ap.add_argument("--algos", default="bc,td3bc,cql,iql,dt")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--episodes", type=int, default=100, help="episodes per dataset")
    ap.add_argument("--medium-noise", type=float, default=0.3)
    ap.add_argument("--iters", type=int, default=20_000, help="updates per run (fixed budget)")
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--eval-episodes", type=int, default=5)
    ap.add_argument(
        "--final-episodes",
        type=int,
        default=10,
        help="re-evaluate each run's last checkpoint on this many episodes (0: skip)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ALGO:KEY=VALUE",
        help="a setting of one algorithm's runs, as vla-ray train --set "
        "(e.g. cql:training.alpha_lr=1e-3); repeatable, recorded in each row",
    )
    ap.add_argument("--work", default="bench_runs/offline", help="datasets and runs")
    ap.add_argument("--out", default="docs/bench")
    ap.add_argument(
        "--resume", action="store_true", help="skip runs finished by an earlier invocation"
    )
    args = ap.parse_args()

    from vla_ray.train import init_ray

    init_ray()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    algos = [a for a in args.algos.split(",") if a]
    for algo in algos:
        why = available(algo)
        if why:
            print(f"skipping {algo}: {why}")
    algos = [a for a in algos if available(a) is None]
    try:
        overrides = algo_overrides(args.set, algos)
    except ValueError as err:
        ap.error(str(err))
    results: list[dict[str, Any]] = []
    refs: dict[str, dict[str, float]] = {}
    machine = f"{platform.machine()} {os.cpu_count()} cores"
    partial = work / "offline.partial.json"
    done: dict[tuple[str, str, str], dict[str, Any]] = {}
    if args.resume and partial.is_file():
        earlier = json.loads(partial.read_text())
        refs.update(earlier["references"])
        for row in earlier["results"]:
            done[(row["env"], row["dataset"], row["algo"])] = row
        print(f"--resume: {len(done)} finished runs in {partial}")

    def save(rows: list[dict[str, Any]]) -> None:
        """Each finished run is kept (atomic write): an interrupted bench resumes from here.
        Runs of an earlier invocation that this one has not reached (yet) are kept too."""
        seen = {(r["env"], r["dataset"], r["algo"]) for r in rows}
        rows = rows + [r for key, r in done.items() if key not in seen]
        payload = dict(args=vars(args), machine=machine, references=refs, results=rows)
        tmp = partial.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        os.replace(tmp, partial)

    for item in args.env:
        env_id, _, expert = item.partition("=")
        if not expert:
            ap.error(f"--env {item!r}: expected ENV_ID=EXPERT_CHECKPOINT")
        name = env_id.split("/")[-1]
        root = work / name
        if env_id not in refs:
            refs[env_id] = dict(
                random=reference_return(env_id, "random", 10, root / ".ref-random"),
                expert=reference_return(env_id, expert, 10, root / ".ref-expert"),
            )
        r_random, r_expert = refs[env_id]["random"], refs[env_id]["expert"]
        print(f"{env_id}: random {r_random:.1f}, expert {r_expert:.1f}")
        paths = build_datasets(env_id, expert, root, args.episodes, args.medium_noise)
        for ds in args.datasets.split(","):
            for algo in algos:
                key = (env_id, ds, algo)
                run_dir = root / "runs" / f"{ds}-{algo}"
                if key in done:  # --resume: finished in an earlier invocation
                    row = done[key]
                    if args.final_episodes and "final_eval" not in row:
                        add_final_evaluation(row, run_dir, args.final_episodes, r_random, r_expert)
                    results.append(row)
                    save(results)
                    continue
                if run_dir.exists():  # an interrupted run: start it again
                    shutil.rmtree(run_dir)
                t0 = time.time()
                evals = train_one(
                    algo,
                    env_id,
                    paths[ds],
                    run_dir,
                    args.iters,
                    args.eval_every,
                    args.eval_episodes,
                    overrides.get(algo),
                )
                scores = [normalised(e["episode_return_mean"], r_random, r_expert) for e in evals]
                row = dict(
                    env=env_id,
                    dataset=ds,
                    algo=algo,
                    final=round(scores[-1], 1) if scores else None,
                    best=round(max(scores), 1) if scores else None,
                    evals=evals,
                    wall_s=round(time.time() - t0, 1),
                )
                if algo in overrides:
                    row["overrides"] = overrides[algo]
                if args.final_episodes:
                    add_final_evaluation(row, run_dir, args.final_episodes, r_random, r_expert)
                results.append(row)
                save(results)
                print(
                    f"{name:<14} {ds:<14} {algo:<7} final {row['final']}  best {row['best']}  "
                    f"last checkpoint {row.get('final_eval', {}).get('score')}"
                )

    write_report(
        dict(args=vars(args), machine=machine, references=refs, results=results),
        algos,
        args.datasets.split(","),
        out,
    )


def add_final_evaluation(
    row: dict[str, Any], run_dir: Path, episodes: int, r_random: float, r_expert: float
) -> None:
    """Add ``final_eval`` (return, length, normalised score of the last checkpoint) to ``row``;
    ``{"score": None}`` when the checkpoint cannot be evaluated on its own."""
    ev = final_evaluation(run_dir, episodes)
    if ev is None:
        row["final_eval"] = dict(episodes=episodes, score=None)
        return
    ev["score"] = round(normalised(ev["mean_return"], r_random, r_expert), 1)
    row["final_eval"] = ev


def cell(row: dict[str, Any] | None) -> str:
    """``final / best`` of the in-training evaluations, ``/ last checkpoint`` when re-evaluated."""
    if row is None:
        return "-"
    text = f"{row['final']} / {row['best']}"
    if "final_eval" in row:
        score = row["final_eval"]["score"]
        text += f" / {'-' if score is None else score}"
    return text


def write_report(payload: dict[str, Any], algos: list[str], datasets: list[str], out: Path) -> None:
    """Print the table of normalised scores; write ``OUT/offline.md`` and ``OUT/offline.json``."""
    results, refs = payload["results"], payload["references"]
    reeval = sorted({r["final_eval"]["episodes"] for r in results if "final_eval" in r})
    suffix = f" / last ckpt ({'/'.join(map(str, reeval))} ep)" if reeval else ""
    lines = [
        "| env | dataset | " + " | ".join(f"{a} final / best{suffix}" for a in algos) + " |",
        "|---|---|" + "---|" * len(algos),
    ]
    for env_id in refs:
        for ds in datasets:
            cells = []
            for algo in algos:
                r = next(
                    (
                        x
                        for x in results
                        if (x["env"], x["dataset"], x["algo"]) == (env_id, ds, algo)
                    ),
                    None,
                )
                cells.append(cell(r))
            lines.append(f"| {env_id.split('/')[-1]} | {ds} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "offline.md").write_text(table + "\n")
    (out / "offline.json").write_text(json.dumps(payload, indent=2))


def merge(dirs: list[str], out: Path) -> None:
    """One report from the ``offline.json`` of several runs (e.g. one process per env)."""
    parts = [json.loads((Path(d) / "offline.json").read_text()) for d in dirs]
    algos = list(dict.fromkeys(r["algo"] for p in parts for r in p["results"]))
    datasets = list(dict.fromkeys(r["dataset"] for p in parts for r in p["results"]))
    payload = dict(
        runs=[p["args"] for p in parts],
        machine=parts[0]["machine"],
        references={k: v for p in parts for k, v in p["references"].items()},
        results=[r for p in parts for r in p["results"]],
    )
    write_report(payload, algos, datasets, out)


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "merge":
        # python bench/offline.py merge OUT DIR [DIR ...]
        if len(sys.argv) < 4:
            sys.exit("usage: python bench/offline.py merge OUT DIR [DIR ...]")
        merge(sys.argv[3:], Path(sys.argv[2]))
    else:
        main()
