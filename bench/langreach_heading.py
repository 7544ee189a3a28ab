"""Diagnostic: where a LangReach policy's deterministic actions point, on its own states and on
the expert's.

For each checkpoint, on one-target LangReach (``bench/lora_grpo.py``'s ``ENV``):

- ``cos_by_step``: mean cosine between the policy's action and the expert's action
  (``info["expert_action"]``) at each step ``t`` of the policy's own episodes (seeds 100000+,
  the evaluation seeds of ``vla-ray eval``);
- ``cos_on_expert_states``: the same cosine on the states of episodes the expert drives (seeds
  200000+), i.e. what BC's loss sees;
- ``success_rate`` and quantiles of the final distance to the target of the policy's episodes.

A policy that reads the target from the image points at it from step 0; one that mostly copies
its velocity (the state holds it, and in demos the next action is close to the last) agrees with
the expert on the expert's states but not on its own.

    python bench/langreach_heading.py RUN/checkpoints/last [MORE ...] --episodes 30
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")

ENV = {"num_targets": 1, "image_size": 32, "max_episode_steps": 20}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-8))


def heading(checkpoint: str, episodes: int) -> dict[str, Any]:
    """The diagnostics above for one checkpoint."""
    import gymnasium as gym

    import vla_ray.envs  # noqa: F401
    from vla_ray.evaluate import load_policy

    policy = load_policy(checkpoint)
    env = gym.make("vla_ray/LangReach-v0", **ENV)

    def act(obs: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(policy({k: v[None] for k, v in obs.items()})).reshape(2)

    by_step: dict[int, list[float]] = {}
    final, success = [], []
    for ep in range(episodes):
        obs, info = env.reset(seed=100_000 + ep)
        for t in range(ENV["max_episode_steps"]):
            a = act(obs)
            by_step.setdefault(t, []).append(_cos(a, np.asarray(info["expert_action"])))
            obs, _, term, trunc, info = env.step(a)
            if term or trunc:
                break
        final.append(info["distance"])
        success.append(bool(info["is_success"]))
    on_expert = []
    for ep in range(episodes):
        obs, info = env.reset(seed=200_000 + ep)
        for _ in range(ENV["max_episode_steps"]):
            expert = np.asarray(info["expert_action"])
            on_expert.append(_cos(act(obs), expert))
            obs, _, term, trunc, info = env.step(expert)
            if term or trunc:
                break
    env.close()
    return dict(
        checkpoint=checkpoint,
        episodes=episodes,
        success_rate=float(np.mean(success)),
        cos_by_step={t: round(float(np.mean(v)), 2) for t, v in sorted(by_step.items())},
        cos_on_expert_states=round(float(np.mean(on_expert)), 3),
        final_distance_quantiles={
            q: round(float(np.quantile(final, q)), 3) for q in (0.1, 0.25, 0.5, 0.75)
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--episodes", type=int, default=30)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    results = [heading(c, args.episodes) for c in args.checkpoints]
    for r in results:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
