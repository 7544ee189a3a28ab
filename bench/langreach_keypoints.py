"""Diagnostic: which target colours a LangReach policy's CNN keypoints still see.

The ``langreach-ppo`` VLA's CNN ends in a spatial softmax: one keypoint per channel (expected
x, y of the channel's activation, plus its peak). These keypoints do not depend on the
instruction, so every colour the policy must reach has to be visible in them. This script renders
``--frames`` LangReach frames (seeded resets plus a few random steps), reads the keypoints of a
checkpoint and of the same architecture at random initialisation, and reports per colour the
held-out R^2 of a ridge regression from all keypoints to that target's (x, y) position, plus
how many channels track each colour (a channel's own keypoint decodes that target with
R^2 > 0.5) and the mean softmax entropy (log(64) = 4.16 is uniform over an 8x8 grid). A
colour with R^2 near 0 is invisible to the policy: PPO cannot learn to reach it.

    python bench/langreach_keypoints.py --checkpoint RUN/checkpoints/best --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("MUJOCO_GL", "egl")


def render_frames(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """``n`` LangReach images (n, H, W, 3) and target positions (n, targets, 2)."""
    import gymnasium as gym

    import vla_ray.envs  # noqa: F401

    env = gym.make("vla_ray/LangReach-v0")
    rng = np.random.default_rng(seed)
    env.action_space.seed(seed)
    images, targets = [], []
    try:
        for i in range(n):
            obs, info = env.reset(seed=seed + i)
            for _ in range(int(rng.integers(0, 15))):
                obs, _, terminated, truncated, info = env.step(env.action_space.sample())
                if terminated or truncated:
                    break
            images.append(obs["image"])
            targets.append(info["target_positions"])
        names = env.unwrapped.color_names
    finally:
        env.close()
    return np.stack(images), np.stack(targets), names


@torch.no_grad()
def keypoints(vla: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image and channel: (x, y, peak) keypoints (n, C, 3) and softmax entropies (n, C)."""
    from vla_ray.models.vision import CNNEncoder

    enc = vla.trunk.vision
    if not isinstance(enc, CNNEncoder) or enc.tokens != "keypoints" or enc.film is not None:
        raise ValueError(
            "checkpoint: needs vision='cnn' with vision_config.tokens='keypoints' and no FiLM "
            "(its keypoints would depend on the instruction)"
        )
    feats, ents = [], []
    for start in range(0, len(images), 256):
        x = enc.feature_map(torch.as_tensor(images[start : start + 256]))
        p, xy, peak = enc.spatial_keypoints(x)
        feats.append(torch.cat([xy, peak], -1))
        ents.append(-(p * p.clamp_min(1e-12).log()).sum(-1))
    return torch.cat(feats).numpy(), torch.cat(ents).numpy()


def ridge_r2(x: np.ndarray, y: np.ndarray, split: float = 0.8, lam: float = 1e-3) -> float:
    """Held-out R^2 of a ridge regression x -> y (mean over y's columns)."""
    n = int(len(x) * split)
    mu, sd = x[:n].mean(0), x[:n].std(0) + 1e-6
    xs = np.c_[(x - mu) / sd, np.ones(len(x))]
    w = np.linalg.solve(xs[:n].T @ xs[:n] + lam * n * np.eye(xs.shape[1]), xs[:n].T @ y[:n])
    pred = xs[n:] @ w
    ss_res = ((y[n:] - pred) ** 2).sum(0)
    ss_tot = ((y[n:] - y[n:].mean(0)) ** 2).sum(0)
    return float(np.mean(1.0 - ss_res / ss_tot))


def analyse(vla: torch.nn.Module, images: np.ndarray, targets: np.ndarray, names) -> dict:
    kp, ent = keypoints(vla, images)
    flat = kp.reshape(len(kp), -1)
    r2 = {c: round(ridge_r2(flat, targets[:, i]), 3) for i, c in enumerate(names)}
    # each channel's colour: the target its own keypoint decodes best (held-out R^2 > 0.5)
    tracks = {c: 0 for c in names}
    for ch in range(kp.shape[1]):
        per_target = [ridge_r2(kp[:, ch], targets[:, i]) for i in range(len(names))]
        if max(per_target) > 0.5:
            tracks[names[int(np.argmax(per_target))]] += 1
    return dict(
        r2_by_target=r2,
        channels=int(kp.shape[1]),
        channels_tracking=tracks,
        softmax_entropy_mean=round(float(ent.mean()), 3),
    )


def load_vla(path: Path) -> torch.nn.Module:
    """The VLA of a save_pretrained directory, a vla-ray checkpoint or a run directory."""
    from vla_ray.models.vla import VLA
    from vla_ray.rl_module import resolve_pretrained_dir

    return VLA.from_pretrained(resolve_pretrained_dir(path)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", required=True, help="run directory, checkpoint or VLA directory"
    )
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=200_000)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    from vla_ray.models.vla import VLA

    torch.manual_seed(0)
    trained = load_vla(Path(args.checkpoint))
    fresh = VLA(trained.config).eval()
    images, targets, names = render_frames(args.frames, args.seed)
    rows = {"trained": analyse(trained, images, targets, names)}
    rows["random init"] = analyse(fresh, images, targets, names)
    print(f"{'model':<12} " + " ".join(f"{'R2 ' + c:>9}" for c in names) + "  tracking  entropy")
    for name, r in rows.items():
        print(
            f"{name:<12} "
            + " ".join(f"{r['r2_by_target'][c]:>9.3f}" for c in names)
            + "  "
            + "/".join(str(r["channels_tracking"][c]) for c in names)
            + f" of {r['channels']}  {r['softmax_entropy_mean']:.2f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(
        bench="langreach_keypoints",
        command=f"python bench/langreach_keypoints.py --checkpoint {args.checkpoint} "
        f"--frames {args.frames} --out {args.out}",
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
        colours=list(names),
        results=rows,
    )
    path = out / "langreach_keypoints.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
