"""Benchmark: how fast the langreach-ppo model learns LangReach's colour binding from dense labels.

A supervised probe, no RL. Renders ``--frames`` LangReach observations (random layouts, the agent
moved by 0-14 random steps) labelled with the scripted expert's action, and ``--val`` held-out
ones from other seeds. Trains the ``langreach-ppo`` preset's VLA (same trunk, deterministic MLP
head) to regress the labels with Adam, batch 256. Every ``--every`` updates it reports on the
held-out frames:

- ``val_mse``: mean squared error to the expert's action;
- ``cos_goal``: mean cosine between the predicted action and the direction to the named target;
- ``binding``: share of frames where the prediction points closer (in angle) to the named target
  than to every other target.

The expert's own actions give the ceiling of the last two (targets in similar directions cap it).
Prints a table and writes ``OUT/langreach_probe.json``.

    python bench/langreach_probe.py --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402

ENV = "vla_ray/LangReach-v0"
KEYS = ("image", "state", "instruction", "instruction_mask")


def render_frames(n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` observations from ``n`` seeded resets with the expert's action and target offsets."""
    import gymnasium as gym
    from tqdm import tqdm

    import vla_ray.envs  # noqa: F401  (registers the env ids)

    env = gym.make(ENV)
    rng = np.random.default_rng(seed)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (*KEYS, "action", "goal", "others")}
    for i in tqdm(range(n), desc=f"render seed {seed}", unit="frame", mininterval=5):
        obs, _ = env.reset(seed=seed + i)
        for _ in range(int(rng.integers(0, 15))):
            obs, *_ = env.step(rng.uniform(-1.0, 1.0, 2).astype(np.float32))
        u = env.unwrapped
        targets, agent, goal = u.target_positions, u.agent_position, u._goal
        for k in KEYS:
            cols[k].append(obs[k])
        cols["action"].append(u.expert_action())
        cols["goal"].append(targets[goal] - agent)
        cols["others"].append(np.stack([t - agent for j, t in enumerate(targets) if j != goal]))
    env.close()
    return {k: np.stack(v) for k, v in cols.items()}


def binding_scores(actions: np.ndarray, frames: dict[str, np.ndarray]) -> tuple[float, float]:
    """(mean cosine to the named target's direction, share pointing closest to it)."""

    def cos(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return (u * v).sum(-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1) + 1e-8)

    to_goal = cos(actions, frames["goal"])
    to_others = np.stack(
        [cos(actions, frames["others"][:, j]) for j in range(frames["others"].shape[1])], 1
    )
    return float(to_goal.mean()), float((to_goal > to_others.max(1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20_000, help="training frames")
    parser.add_argument("--val", type=int, default=2_000, help="held-out frames")
    parser.add_argument("--updates", type=int, default=1_500)
    parser.add_argument("--every", type=int, default=250, help="evaluate every N updates")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    import gymnasium as gym
    import torch

    import vla_ray.envs  # noqa: F401
    from vla_ray.rl_module import build_vla
    from vla_ray.train import resolve

    t_render = time.time()
    train = render_frames(args.frames, seed=1_000_000)
    val = render_frames(args.val, seed=5_000_000)
    t_render = time.time() - t_render

    torch.manual_seed(args.seed)
    model = dict(resolve("langreach-ppo").settings["model"])
    model.pop("value", None)
    model.update(head="mlp", head_config={})
    env = gym.make(ENV)
    vla = build_vla(model, env.observation_space, env.action_space)
    env.close()
    opt = torch.optim.Adam(vla.parameters(), lr=args.lr)

    def batch(d: dict[str, np.ndarray], idx) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(d[k][idx]) for k in KEYS}

    def predict(obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return vla.head.predict(vla.trunk(obs)).reshape(len(obs["state"]), -1)[:, :2]

    def evaluate(update: int, seconds: float) -> dict:
        vla.eval()
        with torch.no_grad():
            pred = torch.cat(
                [predict(batch(val, slice(i, i + 500))) for i in range(0, args.val, 500)]
            ).numpy()
        vla.train()
        cos_goal, binding = binding_scores(pred, val)
        mse = float(((pred - val["action"]) ** 2).mean())
        row = dict(
            update=update,
            train_s=round(seconds, 1),
            val_mse=mse,
            cos_goal=cos_goal,
            binding=binding,
        )
        print(
            f"{update:>7} {seconds:>8.0f} {mse:>8.3f} {cos_goal:>9.2f} {binding:>8.2f}", flush=True
        )
        return row

    ceiling = binding_scores(val["action"], val)
    print(f"expert ceiling: cos_goal {ceiling[0]:.2f}, binding {ceiling[1]:.2f}")
    print(f"{'update':>7} {'train s':>8} {'val mse':>8} {'cos goal':>9} {'binding':>8}")
    rng = np.random.default_rng(args.seed)
    rows, t0 = [], time.time()
    for update in range(args.updates + 1):
        if update % args.every == 0:
            rows.append(evaluate(update, time.time() - t0))
        if update == args.updates:
            break
        idx = rng.integers(0, args.frames, 256)
        loss = ((predict(batch(train, idx)) - torch.as_tensor(train["action"][idx])) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(
        bench="langreach_probe",
        command=(
            f"python bench/langreach_probe.py --frames {args.frames} --val {args.val} "
            f"--updates {args.updates} --lr {args.lr:g} --seed {args.seed} --out {args.out}"
        ),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        torch_threads=torch.get_num_threads(),
        render_s=round(t_render, 1),
        expert_ceiling=dict(cos_goal=ceiling[0], binding=ceiling[1]),
        rows=rows,
    )
    (out / "langreach_probe.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out / 'langreach_probe.json'}")


if __name__ == "__main__":
    main()
