"""Diagnostic: how well GRPO's per-step advantages credit the action that was taken.

From a start policy (``--checkpoint``, a ``vla/`` folder), samples one GRPO iteration (the
preset's groups: ``--group-size`` episodes for each of ``--groups`` reset seeds) and, for every
advantage kind and ``advantage_gamma`` in ``--gammas``, reports the correlation over all steps
between a step's advantage and ``(a - mu) . e / |e|``: the part of the sampled action's
exploration noise that points along the env's expert action (LangReach's ``info
["expert_action"]``). Positive means the policy gradient pushes the mean towards the expert;
near zero means the advantage carries little credit for that step's action. Prints a table and
writes ``OUT/NAME.json``::

    python bench/grpo_credit.py --checkpoint RUN/checkpoints/last/vla --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np


def credit_correlations(
    episodes: list[Any], keys: list[Any], gammas: list[float]
) -> list[dict[str, Any]]:
    """``corr(A_t, (a_t - mu_t) . e_t / |e_t|)`` per (advantage kind, gamma)."""
    from vla_ray.algorithms.grpo import STEP_ADVANTAGES

    rewards = [np.asarray(ep.get_rewards(), np.float64) for ep in episodes]
    noise_along_expert = []
    for ep in episodes:
        actions = np.asarray(ep.get_actions(), np.float64)
        mean = np.asarray(ep.get_extra_model_outputs("action_dist_inputs"))[:, : actions.shape[1]]
        expert = np.stack([i["expert_action"] for i in ep.get_infos()[: len(ep)]])
        unit = expert / (np.linalg.norm(expert, axis=1, keepdims=True) + 1e-8)
        noise_along_expert.append(((actions - mean) * unit).sum(1))
    u = np.concatenate(noise_along_expert)
    rows = []
    for kind, fn in STEP_ADVANTAGES.items():
        for gamma in gammas:
            adv = np.concatenate(fn(rewards, keys, gamma=gamma))
            rows.append(
                dict(advantage=kind, gamma=gamma, correlation=float(np.corrcoef(adv, u)[0, 1]))
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="the start policy's vla/ folder")
    parser.add_argument("--preset", default="langreach-state-lora-grpo")
    parser.add_argument("--targets", type=int, default=3, help="num_targets")
    parser.add_argument("--episode-steps", type=int, default=30, help="max_episode_steps")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--gammas", type=float, nargs="+", default=[1.0, 0.9, 0.5, 0.1])
    parser.add_argument("--start-log-std", type=float, default=-1.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="grpo_credit")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    from vla_ray.algorithms.grpo import GROUP_KEY, SEED_KEY
    from vla_ray.train import build_algorithm_config, init_ray, resolve

    init_ray(num_cpus=2)
    overrides = {
        "env_config": {"num_targets": args.targets, "max_episode_steps": args.episode_steps},
        "seed": args.seed,
        "model": {"pretrained_path": args.checkpoint, "start_log_std": args.start_log_std},
        "training": {"group_size": args.group_size, "groups_per_iteration": args.groups},
    }
    algo = build_algorithm_config(resolve(args.preset, overrides, num_env_runners=0)).build_algo()
    try:
        episodes, _ = algo.sample_groups()
    finally:
        algo.stop()
    episodes = [ep for ep in episodes if len(ep) > 0]
    keys = [(ep.get_infos(0)[GROUP_KEY], ep.get_infos(0)[SEED_KEY]) for ep in episodes]
    rows = credit_correlations(episodes, keys, args.gammas)
    print(f"\n{len(episodes)} episodes, {sum(len(e) for e in episodes)} steps")
    print("| advantage | advantage_gamma | corr(A, noise along the expert action) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['advantage']} | {r['gamma']} | {r['correlation']:.3f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    record = dict(
        bench=args.name,
        args=vars(args),
        episodes=len(episodes),
        steps=int(sum(len(e) for e in episodes)),
        rows=rows,
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
