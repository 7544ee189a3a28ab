"""Benchmark: does ``model.temporal`` give the policy a memory it needs?

Three-target LangReach from state (``langreach-state-ppo``) with ``instruction_mode=first_step``:
the colour is named at an episode's first step only, afterwards the instruction is the blind
sentence, so a policy must remember it. PPO with ``temporal=gru`` (memory) against
``temporal=none`` (the control, which can only guess: ~1/3), ``--seeds`` seeds each, the same
env-step budget; success of the last checkpoint over ``--episodes`` held-out episodes
(deterministic actions, ``vla_ray.evaluate``). Writes ``OUT/temporal_memory.json``.

    python bench/temporal_memory.py --steps 80000 --seeds 0 1 2 --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

MEMORY = {"gru": {"history": 50, "hidden": 64}, "none": {}}


def run(temporal: str, seed: int, steps: int, episodes: int, workdir: Path) -> dict:
    from vla_ray.evaluate import evaluate, load_policy
    from vla_ray.train import resolve, train

    overrides = {
        "model": {"temporal": temporal, "temporal_config": MEMORY[temporal]},
        "env_config": {"instruction_mode": "first_step"},
        "seed": seed,
    }
    spec = resolve("langreach-state-ppo", overrides)
    out = workdir / f"{temporal}_{seed}"
    start = time.time()
    summary = train(spec, out, stop_timesteps=steps, progress=False)
    seconds = time.time() - start
    result = evaluate(load_policy(out / "checkpoints" / "last"), episodes=episodes, progress=False)
    return dict(
        temporal=temporal,
        seed=seed,
        env_steps=summary["env_steps"],
        train_seconds=round(seconds, 1),
        train_success_last_iter=summary.get("success_rate"),
        eval_success=result["success_rate"],
        eval_return=result["mean_return"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--out", default="docs/bench")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="temporal-memory-") as tmp:
        for seed in args.seeds:
            for temporal in ("gru", "none"):
                rows.append(run(temporal, seed, args.steps, args.episodes, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "temporal_memory.json"
    path.write_text(json.dumps(dict(settings=vars(args), runs=rows), indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
