"""Benchmark: env steps/s while sampling with VLAModule vs RLlib's stock MLP module.

Both sample LangReach (64x64 pixels + state + instruction) through PPO's EnvRunners; the stock
module sees the observation flattened by RLlib's ``FlattenObservations`` connector (its default
catalog has no Dict support). Only sampling is timed (no learning). Prints a table and writes
``OUT/sampling.json``.

    python bench/sampling.py --runners 1 2 --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

ENV = "vla_ray/LangReach-v0"


def build(module: str, runners: int, envs_per_runner: int):
    from ray.rllib.connectors.env_to_module import FlattenObservations

    from vla_ray.train import build_algorithm_config, resolve

    spec = resolve(
        "langreach-ppo",
        {"env_runners": {"num_env_runners": runners, "num_envs_per_env_runner": envs_per_runner}},
    )
    cfg = build_algorithm_config(spec)
    if module == "rllib-mlp":
        from ray.rllib.core.rl_module.rl_module import RLModuleSpec

        cfg.rl_module(rl_module_spec=RLModuleSpec(), model_config={"fcnet_hiddens": [256, 256]})
        cfg.env_runners(
            env_to_module_connector=lambda env, spaces=None, device=None: FlattenObservations()
        )
    return cfg.build_algo()


def measure(module: str, runners: int, envs_per_runner: int, steps: int, repeats: int) -> float:
    algo = build(module, runners, envs_per_runner)
    group = algo.env_runner_group
    per_runner = steps // runners

    def sample(r):
        return sum(len(e) for e in r.sample(num_timesteps=per_runner, random_actions=False))

    try:
        group.foreach_env_runner(sample, local_env_runner=False)  # warm-up
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            counts = group.foreach_env_runner(sample, local_env_runner=False)
            rates.append(sum(counts) / (time.perf_counter() - t0))
        return max(rates)
    finally:
        algo.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runners", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--envs-per-runner", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4000, help="env steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    from vla_ray.train import init_ray

    init_ray(num_cpus=max(args.runners))
    rows = []
    for runners in args.runners:
        for module in ("vla", "rllib-mlp"):
            rate = measure(module, runners, args.envs_per_runner, args.steps, args.repeats)
            rows.append(
                dict(
                    env=ENV,
                    module=module,
                    env_runners=runners,
                    envs_per_runner=args.envs_per_runner,
                    steps_per_s=round(rate, 1),
                )
            )
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(
        bench="sampling",
        command=(
            f"python bench/sampling.py --runners {' '.join(map(str, args.runners))} "
            f"--envs-per-runner {args.envs_per_runner} --steps {args.steps} --out {args.out}"
        ),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        rows=rows,
    )
    (out / "sampling.json").write_text(json.dumps(record, indent=2))
    print(f"\n{'env':<22} {'module':<10} {'runners':>7} {'envs/runner':>11} {'steps/s':>9}")
    for r in rows:
        print(
            f"{r['env']:<22} {r['module']:<10} {r['env_runners']:>7} "
            f"{r['envs_per_runner']:>11} {r['steps_per_s']:>9.1f}"
        )
    print(f"\nwrote {out / 'sampling.json'}")


if __name__ == "__main__":
    main()
