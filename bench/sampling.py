"""Benchmark: env steps/s while sampling with VLAModule vs RLlib's stock MLP module.

Both sample LangReach (64x64 pixels + state + instruction) through PPO's EnvRunners; the stock
module sees the observation flattened by RLlib's ``FlattenObservations`` connector (its default
catalog has no Dict support). Only sampling is timed (no learning). Prints a table and writes
``OUT/sampling.json``.

    python bench/sampling.py --runners 1 2 --out docs/bench

``--scaling`` measures the VLAModule alone on several envs (``--envs``: langreach, hopper,
halfcheetah-pixels, pusht, highway) with each EnvRunner count of ``--runners`` and writes
``OUT/sampling_scaling.json``:

    python bench/sampling.py --scaling --runners 1 2 4 --envs-per-runner 4 --out docs/bench
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

# --scaling: name -> (preset, env id override or None, env_config)
SCALING_ENVS: dict[str, tuple[str, str | None, dict]] = {
    "langreach": ("langreach-ppo", None, {}),
    "hopper": ("hopper-ppo", None, {}),
    "halfcheetah-pixels": ("langreach-ppo", "vla_ray/HalfCheetahPixels-v5", {}),
    "pusht": ("pusht-ppo", None, {}),
    "highway": ("highway-ppo", None, {}),
}


def scaling_spec(name: str, runners: int, envs_per_runner: int, vectorize: str):
    """The preset of ``name`` with the runner layout; HalfCheetah pixels borrows the tiny VLA."""
    from dataclasses import replace

    from vla_ray.presets import get_preset
    from vla_ray.train import resolve

    preset_name, env_id, env_config = SCALING_ENVS[name]
    preset = get_preset(preset_name)
    if env_id is not None:
        preset = replace(preset, name=name, env=env_id, env_config=env_config)
    return resolve(
        preset,
        num_env_runners=runners,
        num_envs_per_env_runner=envs_per_runner,
        vectorize=vectorize,
    )


def build(module: str, runners: int, envs_per_runner: int, spec=None):
    from ray.rllib.connectors.env_to_module import FlattenObservations

    from vla_ray.train import build_algorithm_config, resolve

    spec = spec or resolve(
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


def measure(
    module: str, runners: int, envs_per_runner: int, steps: int, repeats: int, spec=None
) -> float:
    algo = build(module, runners, envs_per_runner, spec)
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
    parser.add_argument("--scaling", action="store_true", help="VLAModule on --envs only")
    parser.add_argument("--envs", nargs="+", default=list(SCALING_ENVS), choices=SCALING_ENVS)
    parser.add_argument("--vectorize", choices=("sync", "async"), default="sync")
    args = parser.parse_args()

    from vla_ray.train import init_ray

    init_ray(num_cpus=max(args.runners))
    if args.scaling:
        scaling(args)
        return
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


def scaling(args: argparse.Namespace) -> None:
    """VLAModule sampling throughput per env and EnvRunner count -> sampling_scaling.json."""
    rows = []
    for name in args.envs:
        for runners in args.runners:
            spec = scaling_spec(name, runners, args.envs_per_runner, args.vectorize)
            rate = measure("vla", runners, args.envs_per_runner, args.steps, args.repeats, spec)
            rows.append(
                dict(
                    env=spec.env,
                    name=name,
                    env_runners=runners,
                    envs_per_runner=args.envs_per_runner,
                    vectorize=args.vectorize,
                    steps_per_s=round(rate, 1),
                )
            )
            print(rows[-1], flush=True)
    base = {r["name"]: r["steps_per_s"] for r in rows if r["env_runners"] == min(args.runners)}
    for r in rows:
        r["speedup"] = round(r["steps_per_s"] / max(base[r["name"]], 1e-9), 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(
        bench="sampling_scaling",
        command=(
            f"python bench/sampling.py --scaling --envs {' '.join(args.envs)} --runners "
            f"{' '.join(map(str, args.runners))} --envs-per-runner {args.envs_per_runner} "
            f"--steps {args.steps} --repeats {args.repeats} --vectorize {args.vectorize} "
            f"--out {args.out}"
        ),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        rows=rows,
    )
    (out / "sampling_scaling.json").write_text(json.dumps(record, indent=2))
    print(f"\n{'env':<30} {'runners':>7} {'envs/runner':>11} {'steps/s':>9} {'x':>5}")
    for r in rows:
        print(
            f"{r['env']:<30} {r['env_runners']:>7} {r['envs_per_runner']:>11} "
            f"{r['steps_per_s']:>9.1f} {r['speedup']:>5.2f}"
        )
    print(f"\nwrote {out / 'sampling_scaling.json'}")


if __name__ == "__main__":
    main()
