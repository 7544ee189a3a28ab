"""Benchmark: PPO with an integrated VLM trunk (preset ``langreach-smolvlm-ppo``, a small SmolVLM
config) on one-target LangReach (32x32 images, 20-step episodes), several seeds.

Each seed trains one iteration, evaluates the last checkpoint (32 deterministic episodes: the
"before" score, close to the initial policy), then resumes to each of ``--iters`` and evaluates
again. The CI learning test (tests/test_vlm_backbone.py) is one such run with 6 iterations.
Writes ``OUT/vlm_ppo_one_target.json``.

    python bench/vlm_ppo.py --seeds 0 1 2 --iters 6 12 --out docs/bench
    python bench/vlm_ppo.py --seeds 0 --set 'model.vlm_config={"patch_size": 8}'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

EASY = {"num_targets": 1, "image_size": 32, "max_episode_steps": 20}


def run(seed: int, iters: list[int], sets: list[str], workdir: Path) -> dict:
    from vla_ray.evaluate import evaluate, load_policy
    from vla_ray.train import _merge, parse_overrides, resolve, train

    overrides = {
        "env_config": EASY,
        "seed": seed,
        "training": {"train_batch_size_per_learner": 1024, "minibatch_size": 256},
        "env_runners": {"num_envs_per_env_runner": 4},
        "checkpoint_every": 1,
    }
    spec = resolve(
        "langreach-smolvlm-ppo", _merge(overrides, parse_overrides(sets)), num_env_runners=2
    )
    out = workdir / f"seed{seed}"
    last = out / "checkpoints" / "last"

    def score() -> float:
        return evaluate(load_policy(last), env_config=EASY, episodes=32, progress=False)[
            "mean_return"
        ]

    t0 = time.time()
    train(spec, out, stop_iters=1, progress=False)
    result = {"seed": seed, "set": sets, "before": score(), "curve": []}
    for it in iters:
        train(spec, out, stop_iters=it, resume=True, progress=False)
        result["curve"].append([it, score(), round(time.time() - t0)])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iters", type=int, nargs="+", default=[6, 12])
    parser.add_argument("--set", action="append", default=[], help="preset override KEY=VALUE")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    from vla_ray.train import init_ray

    init_ray(num_cpus=2)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            runs.append(run(seed, sorted(args.iters), args.set, Path(tmp)))
            print(json.dumps(runs[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(
        bench="vlm_ppo_one_target",
        command="python bench/vlm_ppo.py " + " ".join(sys.argv[1:]),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        runs=runs,
    )
    (out / "vlm_ppo_one_target.json").write_text(json.dumps(record, indent=2))
    print(f"\n{'seed':>4} {'before':>7} " + " ".join(f"{'it ' + str(i):>7}" for i in args.iters))
    for r in runs:
        cells = " ".join(f"{v:>7.2f}" for _, v, _ in r["curve"])
        print(f"{r['seed']:>4} {r['before']:>7.2f} {cells}")
    print(f"\nwrote {out / 'vlm_ppo_one_target.json'}")


if __name__ == "__main__":
    main()
