"""Benchmark: EnvRunners with and without the shared inference actors (``env_runners.inference``).

A LangReach PPO algorithm whose policy is large enough for inference to dominate (the default
trunk with a 12-layer, 768-wide Qwen2 LM: ~115M parameters; ``--llm-layers`` / ``--llm-width``
change it) is built for each combination of EnvRunners (``--runners``) and service off/on; no
training step runs. For each it measures the resident memory (RSS) of every EnvRunner process
and of the inference actor, env steps/s of all EnvRunners sampling ``--steps`` env steps each
(explore, after one warm-up call), and the batch sizes the actor ran. Prints a table and writes
``OUT/inference_service.json``.

    flock /work/cpu.lock python bench/inference_service.py --out docs/bench
    python bench/inference_service.py --forward-only --device cuda --out $OUT  # no Ray needed
    python bench/inference_service.py --gpus-per-actor 1 --out $OUT            # with Ray + a GPU
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

EASY = {"num_targets": 1, "image_size": 64, "max_episode_steps": 50}


def model_config(layers: int, width: int) -> dict[str, Any]:
    """langreach-ppo's model with a wide LM (heads of 64 dims)."""
    from vla_ray.presets import get_preset

    mc = json.loads(json.dumps(get_preset("langreach-ppo").model))
    mc["llm_config"] = dict(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=width // 64,
        num_key_value_heads=width // 64,
    )
    return mc


def _rss_mb(_runner=None) -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measure(runners: int, service: dict[str, Any] | None, args: argparse.Namespace) -> dict:
    """Memory, env steps/s and actor batch sizes of one configuration."""
    import ray

    from vla_ray.train import build_algorithm_config, resolve

    overrides: dict[str, Any] = {
        "env_config": EASY,
        "model": model_config(args.llm_layers, args.llm_width),
        "env_runners": {"num_envs_per_env_runner": args.envs_per_runner},
        "training": {"train_batch_size_per_learner": 64, "minibatch_size": 64},
    }
    if service is not None:
        overrides["env_runners"]["inference"] = service
    spec = resolve("langreach-ppo", overrides, num_env_runners=runners)
    t0 = time.time()
    algo = build_algorithm_config(spec).build_algo()
    build_s = time.time() - t0
    group = algo.env_runner_group
    try:
        params = sum(p.numel() for p in algo.env_runner.module.parameters())
        group.foreach_env_runner(
            lambda r: len(r.sample(num_timesteps=args.envs_per_runner, explore=True)),
            local_env_runner=False,
        )
        svc = getattr(algo.env_runner, "service", None)
        if svc is not None:
            svc.stats(reset=True)
        t0 = time.time()
        group.foreach_env_runner(
            lambda r, n=args.steps: len(r.sample(num_timesteps=n, explore=True)),
            local_env_runner=False,
        )
        wall = time.time() - t0
        rss = group.foreach_env_runner(_rss_mb, local_env_runner=False)
        row: dict[str, Any] = dict(
            runners=runners,
            service=service is not None,
            params_m=round(params / 1e6, 1),
            build_s=round(build_s, 1),
            env_steps=runners * args.steps,
            wall_s=round(wall, 2),
            env_steps_per_s=round(runners * args.steps / wall, 2),
            env_runner_rss_mb=[round(x) for x in rss],
            env_runner_rss_mean_mb=round(sum(rss) / len(rss)),
            # 1-minute load average after sampling: other jobs on the machine beside the bench
            load_avg_1m=round(os.getloadavg()[0], 1),
        )
        if svc is not None:
            stats = svc.stats()
            actor_rss = ray.get([a.__ray_call__.remote(_rss_mb) for a in svc.actors])
            row.update(
                actor_rss_mb=[round(x) for x in actor_rss],
                actor_batches=[s["batches"] for s in stats],
                actor_mean_batch=[round(s["mean_batch"] or 0, 2) for s in stats],
                actor_max_batch=[s["max_batch"] for s in stats],
                actor_batch_sizes=[s["batch_sizes"] for s in stats],
            )
        return row
    finally:
        algo.stop()


def forward_only(args: argparse.Namespace) -> dict[str, Any]:
    """What one inference actor does per batch, without Ray or the env: the policy's forward
    (inference, prefix cache on as in RL) at batch 1..64 on ``--device``; actions/s per batch."""
    import statistics

    import torch
    from backbones import _model, _sync  # bench/backbones.py (LangReach-shaped observations)

    mc = model_config(args.llm_layers, args.llm_width)
    vla, _, obs = _model(mc, with_value=False, device=args.device)
    vla.eval()
    params = sum(p.numel() for p in vla.parameters())
    rows = []
    with torch.no_grad():
        for b in (1, 2, 4, 8, 16, 32, 64):
            batch = {k: torch.cat([v] * 2)[:b] for k, v in obs.items()}
            vla.head.dist_inputs(vla.trunk(batch))  # warm-up
            times = []
            for _ in range(args.repeats):
                _sync(args.device)
                t0 = time.perf_counter()
                vla.head.dist_inputs(vla.trunk(batch))
                _sync(args.device)
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1000
            rows.append(dict(batch=b, latency_ms=round(ms, 2), actions_per_s=round(b / ms * 1e3)))
            print(json.dumps(rows[-1]), flush=True)
    out = dict(device=args.device, params_m=round(params / 1e6, 1), rows=rows)
    if args.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
        out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runners", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--envs-per-runner", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32, help="env steps per EnvRunner")
    parser.add_argument("--llm-layers", type=int, default=12)
    parser.add_argument("--llm-width", type=int, default=768)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=2)
    parser.add_argument("--gpus-per-actor", type=float, default=0)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--wait-ms", type=float, default=5)
    parser.add_argument("--ray-cpus", type=int, default=8, help="logical CPUs given to Ray")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument(
        "--forward-only", action="store_true", help="only the actor's batched forward (no Ray)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.forward_only:
        result = forward_only(args)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = f"inference_forward_{args.device}.json"
        (out / name).write_text(json.dumps(dict(result, args=vars(args)), indent=2))
        print(f"wrote {out / name}")
        return

    from vla_ray.train import init_ray

    init_ray(num_cpus=args.ray_cpus)
    service = dict(
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        max_batch=args.max_batch,
        wait_ms=args.wait_ms,
    )
    rows = []
    for runners in args.runners:
        for svc in (None, service):
            row = measure(runners, svc, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = (
        f"{'runners':>7} {'service':>7} {'steps/s':>8} {'runner RSS MB':>13} "
        f"{'actor RSS MB':>12} {'mean batch':>10} {'max batch':>9}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['runners']:>7} {'on' if r['service'] else 'off':>7} {r['env_steps_per_s']:>8} "
            f"{r['env_runner_rss_mean_mb']:>13} {str(r.get('actor_rss_mb', '-')):>12} "
            f"{str(r.get('actor_mean_batch', '-')):>10} {str(r.get('actor_max_batch', '-')):>9}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        args=vars(args),
        service=service,
    )
    (out / "inference_service.json").write_text(json.dumps(dict(meta, rows=rows), indent=2))
    print(f"wrote {out / 'inference_service.json'}")


if __name__ == "__main__":
    main()
