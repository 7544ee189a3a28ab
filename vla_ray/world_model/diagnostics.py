"""Open-loop prediction diagnostics of a world model (``vla-ray eval --imagine N``).

For each episode the policy acts in the env; the world model then observes the first
``context`` steps (posterior, from the real frames) and imagines the next ``horizon`` steps from
the real actions alone (prior, no frames). Each video frame shows the real observation image
beside the decoded one (a green strip above the decoded image while it is reconstructed from
the posterior, red once it is imagined), as DreamerV3's open-loop videos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_ray.config import ConfigError
from vla_ray.env_factory import ALGORITHM_WRAPPER_KEYS

CONTEXT_COLOR = (0, 200, 0)
IMAGINED_COLOR = (220, 0, 0)


def _module_of(policy: Any) -> Any:
    """The ``WorldModelModule`` behind an eval ``Policy``; ValueError if it has none or its
    world model decodes no image."""
    from vla_ray.world_model.policy import LatentPolicy

    runner = getattr(policy, "context", None)
    if not isinstance(runner, LatentPolicy):
        held = policy.model if policy.model is not None else runner
        raise ValueError(
            f"--imagine: open-loop prediction needs a world-model checkpoint (algorithm "
            f"'dreamer'); this checkpoint holds a {type(held).__name__} ({policy.source})"
        )
    module = runner.module
    if "image" not in module.world_model.decoders:
        cfg = module.wm_config
        raise ValueError(
            "--imagine: the world model has no image decoder (world_model.objective "
            f"{cfg.objective!r}, world_model.decode {list(cfg.decode)}, observation fields "
            f"{sorted(module.world_model.obs_shapes)}); open-loop videos need "
            "objective='reconstruction' with 'image' in decode on a pixel env"
        )
    return module


def to_pixels(decoded: torch.Tensor) -> np.ndarray:
    """Decoder output in [-0.5, 0.5] (..., H, W, 3) -> uint8 pixels."""
    return ((decoded.clamp(-0.5, 0.5) + 0.5) * 255).round().to(torch.uint8).cpu().numpy()


@torch.no_grad()
def open_loop(
    module: Any,
    observations: list[dict[str, np.ndarray]],
    actions: list[np.ndarray],
    context: int,
    generator: torch.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Observe ``observations[:context]`` and imagine the rest from ``actions`` (``actions[t]``
    led from observation t to t + 1). Returns ``real`` and ``predicted`` images (T, H, W, 3)
    uint8 (the first ``context`` predicted ones are posterior reconstructions), ``reward`` the
    predicted rewards (T,) and ``image_mse`` per step (T,) on the decoder's [-0.5, 0.5] scale."""
    from vla_ray.world_model.model import image_target

    wm = module.world_model
    T = len(observations)
    if not 1 <= context <= T or len(actions) < T - 1:
        raise ValueError(
            f"context: expected 1 <= context <= {T} observations with {T - 1} actions, got "
            f"context {context} and {len(actions)} actions"
        )
    obs = {k: torch.as_tensor(np.stack([o[k] for o in observations]))[None] for k in wm.obs_shapes}
    acts = torch.as_tensor(np.stack(actions[: T - 1]), dtype=torch.float32).reshape(T - 1, -1)
    prev = torch.cat([torch.zeros(1, acts.shape[-1]), acts])[None]  # (1, T, A)
    is_first = torch.zeros(1, T)
    is_first[0, 0] = 1
    ctx = {k: v[:, :context] for k, v in obs.items()}
    post = wm.rssm.observe(wm.encode(ctx), prev[:, :context], is_first[:, :context], generator)[0]
    feats = [post.features()[0]]  # (context, F)
    from vla_ray.world_model.rssm import RSSMState

    state = RSSMState(post.h[:, -1], post.z[:, -1])
    imagined = []
    for t in range(context, T):
        state, _ = wm.rssm.img_step(state, prev[:, t], generator)
        imagined.append(state.features())
    if imagined:
        feats.append(torch.cat(imagined))
    feat = torch.cat(feats)  # (T, F)
    decoded = wm.decoders["image"](feat)
    err = ((decoded - image_target(obs["image"][0])) ** 2).flatten(1).mean(-1)
    return dict(
        real=obs["image"][0].to(torch.uint8).numpy(),
        predicted=to_pixels(decoded),
        reward=wm.reward(feat).cpu().numpy(),
        image_mse=err.cpu().numpy(),
    )


def side_by_side(real: np.ndarray, predicted: np.ndarray, imagined: bool, scale: int) -> np.ndarray:
    """One video frame: real | gap | predicted, each upscaled ``scale`` times, with a coloured
    strip over the predicted image (green: reconstructed from the posterior, red: imagined)."""
    up = [np.repeat(np.repeat(x, scale, 0), scale, 1) for x in (real, predicted)]
    h, w = up[0].shape[:2]
    gap_w = (-2 * w) % 16  # the whole width a multiple of 16, as video codecs want
    gap = np.full((h, gap_w if gap_w >= 4 else gap_w + 16, 3), 255, np.uint8)
    strip = max(2, h // 32)
    up[1] = up[1].copy()
    up[1][:strip] = IMAGINED_COLOR if imagined else CONTEXT_COLOR
    return np.concatenate([up[0], gap, up[1]], axis=1)


def imagine_video(
    policy: Any,
    path: str | Path,
    horizon: int,
    context: int = 5,
    env_id: str | None = None,
    env_config: dict[str, Any] | None = None,
    episodes: int = 1,
    seed: int = 100_000,
    fps: float = 5,
) -> dict[str, Any]:
    """Write the open-loop prediction video of ``episodes`` episodes to ``path``: per episode
    ``context`` observed steps then up to ``horizon`` imagined ones (fewer if the episode ends
    first), the policy acting. Returns the video's path, frame count and the mean image MSE
    and reward error of the imagined steps per step ahead."""
    import vla_ray.envs  # noqa: F401
    from vla_ray.envs.chunking import CHUNK_CONFIG_KEY
    from vla_ray.evaluate import write_video
    from vla_ray.safety import make_env

    module = _module_of(policy)
    if horizon < 1:
        raise ConfigError(f"--imagine: expected a number of imagined steps >= 1, got {horizon}")
    if context < 1:
        raise ConfigError(f"--imagine-context: expected >= 1 observed steps, got {context}")
    env_id = env_id or policy.meta.get("env")
    if not env_id:
        raise ValueError("env: the checkpoint names no env (no vla_ray_meta.json); pass --env")
    cfg = dict(policy.meta.get("env_config", {}) if env_config is None else env_config)
    for key in (*ALGORITHM_WRAPPER_KEYS, CHUNK_CONFIG_KEY):
        cfg.pop(key, None)  # training-only wrappers; a world model acts one step at a time
    env = make_env(env_id, cfg)
    frames: list[np.ndarray] = []
    mse_by_step: list[list[float]] = [[] for _ in range(horizon)]
    reward_err_by_step: list[list[float]] = [[] for _ in range(horizon)]
    g = torch.Generator().manual_seed(seed)
    try:
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            policy.reset()
            observations, actions, rewards = [obs], [], []
            while len(observations) < context + horizon:
                action = policy({k: np.asarray(v)[None] for k, v in obs.items()})[0]
                obs, reward, terminated, truncated, _ = env.step(action)
                policy.observe(float(reward))
                observations.append(obs)
                actions.append(np.asarray(action, np.float32))
                rewards.append(float(reward))
                if terminated or truncated:
                    break
            if len(observations) <= context:
                continue  # the episode ended before anything could be imagined
            out = open_loop(module, observations, actions, context, g)
            scale = max(1, 128 // out["real"].shape[1])
            for t in range(len(observations)):
                frames.append(
                    side_by_side(out["real"][t], out["predicted"][t], t >= context, scale)
                )
            for k, t in enumerate(range(context, len(observations))):
                mse_by_step[k].append(float(out["image_mse"][t]))
                reward_err_by_step[k].append(abs(float(out["reward"][t]) - rewards[t - 1]))
    finally:
        env.close()
    if not frames:
        raise ValueError(
            f"--imagine-context: every episode ended within the {context} observed steps; "
            "nothing was imagined (use a shorter context)"
        )
    write_video(path, frames, fps=fps)
    return dict(
        video=str(path),
        frames=len(frames),
        frame_shape=list(frames[0].shape),
        context=context,
        horizon=horizon,
        episodes=episodes,
        image_mse_by_step=[float(np.mean(v)) for v in mse_by_step if v],
        reward_abs_error_by_step=[float(np.mean(v)) for v in reward_err_by_step if v],
    )
