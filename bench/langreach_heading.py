"""Diagnostic: where a LangReach policy's deterministic actions point, on its own states and on
the expert's.

For each checkpoint, on one-target LangReach (``bench/lora_grpo.py``'s ``ENV``):

- ``cos_by_step``: mean cosine between the policy's action and the expert's action
  (``info["expert_action"]``) at each step ``t`` of the policy's own episodes (seeds 100000+,
  the evaluation seeds of ``vla-ray eval``);
- ``cos_on_expert_states``: the same cosine on the states of episodes the expert drives (seeds
  200000+), i.e. what BC's loss sees;
- ``success_rate`` and quantiles of the final distance to the target of the policy's episodes;
- how the failed episodes fail: quantiles of their starting, closest and final distances, the
  step of the closest approach, the share that came within twice the success radius, and the
  share that ended more than 0.1 farther than their closest approach (reached, then drifted).

``--image-size``/``--episode-steps`` set the env (default 32 px, 20 steps: the 2026-12-07
second attempt; the 64 px attempts use 64 and 30).

A policy that reads the target from the image points at it from step 0; one that mostly copies
its velocity (the state holds it, and in demos the next action is close to the last) agrees with
the expert on the expert's states but not on its own.

    python bench/langreach_heading.py RUN/checkpoints/last [MORE ...] --episodes 30
    python bench/langreach_heading.py RUN/checkpoints/last --image-size 64 --episode-steps 30
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


def _quantiles(values: list[float]) -> dict[float, float] | None:
    if not values:
        return None
    return {q: round(float(np.quantile(values, q)), 3) for q in (0.25, 0.5, 0.75)}


def heading(checkpoint: str, episodes: int, env_config: dict[str, Any] = ENV) -> dict[str, Any]:
    """The diagnostics above for one checkpoint."""
    import gymnasium as gym

    import vla_ray.envs  # noqa: F401
    from vla_ray.evaluate import load_policy

    policy = load_policy(checkpoint)
    env = gym.make("vla_ray/LangReach-v0", **env_config)
    steps = env_config["max_episode_steps"]

    def act(obs: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(policy({k: v[None] for k, v in obs.items()})).reshape(2)

    by_step: dict[int, list[float]] = {}
    final, success, failed = [], [], []
    for ep in range(episodes):
        obs, info = env.reset(seed=100_000 + ep)
        distances = [info["distance"]]
        for t in range(steps):
            a = act(obs)
            by_step.setdefault(t, []).append(_cos(a, np.asarray(info["expert_action"])))
            obs, _, term, trunc, info = env.step(a)
            distances.append(info["distance"])
            if term or trunc:
                break
        final.append(info["distance"])
        success.append(bool(info["is_success"]))
        if not success[-1]:
            failed.append(distances)
    on_expert = []
    for ep in range(episodes):
        obs, info = env.reset(seed=200_000 + ep)
        for _ in range(steps):
            expert = np.asarray(info["expert_action"])
            on_expert.append(_cos(act(obs), expert))
            obs, _, term, trunc, info = env.step(expert)
            if term or trunc:
                break
    radius = env.unwrapped.success_radius
    env.close()
    closest = [min(d) for d in failed]
    return dict(
        checkpoint=checkpoint,
        episodes=episodes,
        success_rate=float(np.mean(success)),
        cos_by_step={t: round(float(np.mean(v)), 2) for t, v in sorted(by_step.items())},
        cos_on_expert_states=round(float(np.mean(on_expert)), 3),
        final_distance_quantiles={
            q: round(float(np.quantile(final, q)), 3) for q in (0.1, 0.25, 0.5, 0.75)
        },
        failed=dict(
            episodes=len(failed),
            start_distance=_quantiles([d[0] for d in failed]),
            closest_distance=_quantiles(closest),
            closest_step=_quantiles([int(np.argmin(d)) for d in failed]),
            final_distance=_quantiles([d[-1] for d in failed]),
            came_within_2_radii=round(float(np.mean([c < 2 * radius for c in closest])), 3)
            if failed
            else None,
            drifted_away=round(float(np.mean([d[-1] > min(d) + 0.1 for d in failed])), 3)
            if failed
            else None,
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--episodes", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=ENV["image_size"])
    parser.add_argument("--episode-steps", type=int, default=ENV["max_episode_steps"])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    env_config = {
        **ENV,
        "image_size": args.image_size,
        "max_episode_steps": args.episode_steps,
    }
    results = [heading(c, args.episodes, env_config) for c in args.checkpoints]
    for r in results:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
