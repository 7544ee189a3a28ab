"""Benchmark: where a PPO training iteration's time goes (sampling, GAE, learner update).

Builds a preset's PPO Algorithm (its EnvRunners, batch and epochs unless ``--set``), runs
``--iters`` iterations after ``--warmup`` unrecorded ones, and reports RLlib's own timers of
each: ``env_runner_sampling_timer``, the learner connector's GAE and ``learner_update_timer``.
Prints a table and writes ``OUT/ppo_iteration_PRESET.json``. ``--threads`` sets the driver's
torch threads (the learner runs in the driver; the default is torch's own).

    python bench/ppo_iteration.py --preset langreach-ppo --iters 4 --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

GAE = "learners/__all_modules__/learner_connector/timers/connectors/general_advantage_estimation"


def _get(result: dict, path: str) -> float | None:
    node: object = result
    for key in path.split("/"):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return round(float(node), 3) if isinstance(node, (int, float)) else None


def measure(preset: str, iters: int, warmup: int, sets: list[str]) -> dict:
    """Per-iteration wall time and RLlib's timers of ``iters`` iterations of ``preset``."""
    import torch

    from vla_ray.run_spec import parse_overrides
    from vla_ray.train import build_algorithm_config, init_ray, resolve

    spec = resolve(preset, parse_overrides(sets))
    init_ray()
    t0 = time.perf_counter()
    algo = build_algorithm_config(spec).build_algo()
    build_s = time.perf_counter() - t0
    rows = []
    try:
        for i in range(warmup + iters):
            t = time.perf_counter()
            result = algo.train()
            wall = time.perf_counter() - t
            if i < warmup:
                continue
            rows.append(
                dict(
                    wall_s=round(wall, 3),
                    sampling_s=_get(result, "timers/env_runner_sampling_timer"),
                    gae_s=_get(result, GAE),
                    learner_update_s=_get(result, "timers/learner_update_timer"),
                    env_steps=_get(result, "env_runners/num_env_steps_sampled"),
                )
            )
    finally:
        algo.stop()

    def median(key: str) -> float | None:
        values = [r[key] for r in rows if r[key] is not None]
        return round(statistics.median(values), 3) if values else None

    return dict(
        preset=preset,
        sets=sets,
        torch_threads=torch.get_num_threads(),
        build_s=round(build_s, 1),
        iterations=rows,
        median={k: median(k) for k in ("wall_s", "sampling_s", "gae_s", "learner_update_s")},
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="langreach-ppo")
    p.add_argument("--iters", type=int, default=4, help="recorded iterations (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded first iterations")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the driver")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = p.parse_args()
    if args.iters < 1:
        p.error(f"--iters: must be >= 1, got {args.iters}")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    res = measure(args.preset, args.iters, args.warmup, args.set)
    res.update(
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        load_average=os.getloadavg(),
    )
    print(f"{args.preset}: build {res['build_s']} s, torch threads {res['torch_threads']}")
    print(f"{'iter':>4} {'wall s':>8} {'sampling s':>11} {'GAE s':>7} {'learner s':>10}")
    for i, r in enumerate(res["iterations"], 1):
        cells = [r["wall_s"], r["sampling_s"], r["gae_s"], r["learner_update_s"]]
        print(
            f"{i:>4} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, (8, 11, 7, 10), strict=True))
        )
    print("median", res["median"])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ppo_iteration_{args.preset}.json"
    path.write_text(json.dumps(res, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
