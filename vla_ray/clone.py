"""Behaviour cloning of a scripted expert in one process: the quickstart's fast cloning stage.

RLlib's offline BC reads its episodes through Ray Data (~0.2 s per update on an idle 2-core CPU,
several seconds beside other work); the colour binding of LangReach needs ~1,500 updates on many
distinct layouts (docs/benchmarks.md, "The quickstart"). Here the expert's frames sit in memory
and Adam runs on them directly, against a wall-clock budget.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# the RL-only model_config keys (the value function): the cloned VLA is the policy alone
_MODULE_KEYS = ("value", "vf_hidden")


def expert_frames(
    env_id: str,
    episodes: int,
    *,
    seed: int = 0,
    noise: float = 0.0,
    progress: bool = True,
    env_config: dict[str, Any] | None = None,
    policy: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
    beta: float = 0.0,
) -> dict[str, np.ndarray]:
    """Every observation of ``episodes`` episodes of ``env_id`` (made with ``env_config``;
    episode i reset with ``seed + i``), labelled with the expert's noise-free action under
    ``"action"``.

    With ``noise`` the env executes the label plus Gaussian noise of that std (DART, Laskey et
    al. 2017): the frames cover states off the expert's path, labelled with how to recover.
    With ``policy`` (one observation -> action) the env executes the policy's action, or with
    probability ``beta`` per step the label (DAgger, Ross et al. 2011): the frames are the states
    the policy visits, labelled with what the expert would do there.
    """
    import gymnasium as gym
    from tqdm import tqdm

    import vla_ray.envs  # noqa: F401  (registers the ids)
    from vla_ray.envs.experts import get_expert

    if episodes < 1:
        raise ValueError(f"episodes: must be >= 1, got {episodes}")
    if noise < 0:
        raise ValueError(f"noise: must be >= 0, got {noise}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: must be in [0, 1], got {beta}")
    env = gym.make(env_id, **(env_config or {}))
    expert = get_expert(env_id)
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    cols: dict[str, list[np.ndarray]] = {}
    try:
        for i in tqdm(range(episodes), disable=not progress, unit="ep", desc="expert frames"):
            obs, _ = env.reset(seed=seed + i)
            done = False
            while not done:
                label = np.asarray(expert(env), dtype=np.float32)
                for k, v in obs.items():
                    cols.setdefault(k, []).append(np.asarray(v))
                cols.setdefault("action", []).append(label)
                action = label
                if policy is not None and not (beta > 0 and rng.random() < beta):
                    action = np.asarray(policy(obs), dtype=np.float32).reshape(label.shape)
                if noise > 0:
                    action = action + rng.normal(0.0, noise, label.shape)
                obs, _, term, trunc, _ = env.step(np.clip(action, low, high).astype(np.float32))
                done = term or trunc
    finally:
        env.close()
    return {k: np.stack(v) for k, v in cols.items()}


def clone(
    model_config: dict[str, Any],
    frames: dict[str, np.ndarray],
    env_id: str,
    *,
    seconds: float | None = None,
    updates: int | None = None,
    init: Any | None = None,
    env_config: dict[str, Any] | None = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 100,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """A VLA built from ``model_config`` for the spaces of ``env_id`` made with
    ``env_config`` (or ``init``, a VLA to train
    further, e.g. a DAgger round), trained by Adam on its head's loss (the Gaussian's NLL, as
    RLlib's BC) plus the vision encoder's reconstruction loss (when ``recon_coeff > 0``) on
    minibatches of ``frames`` for ``seconds`` of wall clock or for ``updates`` steps (exactly
    one of the two); returns (vla, metric rows, one per ``log_every`` updates and one for the
    last)."""
    import gymnasium as gym
    import torch

    import vla_ray.envs  # noqa: F401
    from vla_ray.rl_module import build_vla

    if (seconds is None) == (updates is None):
        raise ValueError(f"clone: give exactly one of seconds, updates; got {seconds}, {updates}")
    if seconds is not None and seconds <= 0:
        raise ValueError(f"seconds: must be > 0, got {seconds}")
    if updates is not None and updates < 1:
        raise ValueError(f"updates: must be >= 1, got {updates}")
    if "action" not in frames:
        raise ValueError(f"frames: expected an 'action' column, got {sorted(frames)}")
    torch.manual_seed(seed)
    env = gym.make(env_id, **(env_config or {}))
    try:
        if init is None:
            vla = build_vla(model_config, env.observation_space, env.action_space, _MODULE_KEYS)
        else:
            vla = init
        obs_keys = [k for k in env.observation_space.spaces if k in frames]
    finally:
        env.close()
    data = {k: torch.as_tensor(frames[k]) for k in (*obs_keys, "action")}
    n = len(data["action"])
    vision = vla.trunk.vision
    recon = getattr(vision, "recon", None) is not None
    opt = torch.optim.Adam(vla.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    vla.train()
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    update = 0
    while True:
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        obs = {k: data[k][idx] for k in obs_keys}
        bc = vla.head.loss(vla.features(obs), data["action"][idx])
        aux = vision.reconstruction_loss(obs["image"]) if recon else torch.zeros(())
        loss = bc + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        update += 1
        elapsed = time.time() - t0
        last = elapsed >= seconds if updates is None else update >= updates
        if update % log_every == 0 or last:
            row = dict(
                iteration=update,
                env_steps=update * batch_size,
                time_s=round(elapsed, 2),
                learner=dict(total_loss=loss.item(), bc_loss=bc.item(), aux_loss=aux.item()),
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)
        if last:
            break
    vla.eval()
    return vla, rows


def clone_run(
    output: str | Path,
    model_config: dict[str, Any],
    env_id: str,
    *,
    episodes: int,
    seconds: float,
    noise: float = 0.0,
    seed: int = 0,
    frames_seed: int = 0,
    batch_size: int = 256,
    lr: float = 1e-3,
    progress: bool = True,
) -> Path:
    """Expert frames -> ``clone`` -> ``output/vla`` (save_pretrained, with the env in its meta),
    ``output/config.json`` and ``output/metrics.jsonl``; returns the save_pretrained path."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    settings = dict(
        episodes=episodes,
        noise=noise,
        seconds=seconds,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        frames_seed=frames_seed,
    )
    # no "preset": `vla-ray report` writes a `vla-ray train` command only for preset runs
    config = dict(stage="clone", algorithm="bc (in-process)", env=env_id, model=model_config)
    (output / "config.json").write_text(json.dumps(dict(config, **settings), indent=2))
    t0 = time.time()
    frames = expert_frames(env_id, episodes, seed=frames_seed, noise=noise, progress=progress)
    frames_s = time.time() - t0
    metrics = output / "metrics.jsonl"
    metrics.write_text("")

    def write(row: dict[str, Any]) -> None:
        with metrics.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if progress:
            learner = row["learner"]
            print(
                f"clone: update {row['iteration']}, {row['time_s']:.0f} s, "
                f"loss {learner['total_loss']:.3f} (reconstruction {learner['aux_loss']:.3f})",
                flush=True,
            )

    vla, rows = clone(
        model_config,
        frames,
        env_id,
        seconds=seconds,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        on_row=write,
    )
    meta = dict(
        env=env_id,
        preset="clone",
        algorithm="bc",
        iteration=rows[-1]["iteration"],
        frames=int(len(frames["action"])),
        frames_s=round(frames_s, 1),
    )
    return vla.save_pretrained(output / "vla", meta=meta)
