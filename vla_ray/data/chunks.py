"""Action chunks from episodes: the training target of step t is the next K actions.

The one implementation of windowing for every algorithm that learns chunked heads from episodes
(BC, filtered/weighted BC, DAgger). At the end of an episode the window runs past the last
action; those slots repeat the last action (LeRobot's convention: the head's inputs stay in
range) and the mask marks them 0, so the heads' losses skip them.

A chunked episode keeps its observations, rewards, infos and flags; its actions become the
flattened windows (T, K * A) with NaN in the slots past the end: the mask travels inside the
actions, so every sampler that slices episodes by step keeps it aligned (RLlib's episode buffer
does not slice ``extra_model_outputs`` by step: it copies the episode's first one), and
``split_chunk_targets`` recovers (targets, mask) in the learner. Other ``extra_model_outputs``
are dropped (behaviour cloning reads none).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.env.single_agent_episode import SingleAgentEpisode


def window_actions(actions: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Actions (T, A) -> targets (T, K, A) with ``targets[t, i] = actions[t + i]`` and masks
    (T, K) (1 where ``t + i < T``; the slots past the end repeat the last action, mask 0)."""
    a = np.asarray(actions)
    if a.ndim != 2:
        raise ValueError(f"actions: expected (T, action_dim), got shape {a.shape}")
    if int(size) < 1:
        raise ValueError(f"chunk_size: expected an integer >= 1, got {size!r}")
    n, k = a.shape[0], int(size)
    idx = np.arange(n)[:, None] + np.arange(k)[None, :]
    mask = (idx < n).astype(np.float32)
    targets = a[np.minimum(idx, n - 1)] if n else np.zeros((0, k, a.shape[1]), a.dtype)
    return targets, mask


def split_chunk_targets(
    actions: torch.Tensor, size: int, action_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked actions (B, K * A) with NaN slots past the episode's end -> targets (B, K, A)
    whose NaN slots repeat the last real action, and masks (B, K) (1 for real slots)."""
    target = actions.reshape(actions.shape[0], size, action_dim)
    real = torch.isfinite(target).all(-1)
    # index of the last real slot at or before each slot (slot 0 is always real)
    idx = torch.where(real, torch.arange(size, device=actions.device), 0).cummax(dim=1).values
    filled = target.gather(1, idx[:, :, None].expand(-1, -1, action_dim))
    return filled, real.to(actions.dtype)


def chunk_space(space: gym.Space | None, size: int) -> gym.Space | None:
    """The action space of a chunk of ``size`` actions of the 1-D Box ``space`` (flattened)."""
    if space is None or int(size) == 1:
        return space
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise ValueError(f"action_space: chunks need a 1-D Box, got {space}")
    return gym.spaces.Box(
        np.tile(space.low, int(size)), np.tile(space.high, int(size)), dtype=space.dtype
    )


def chunk_episode(episode: SingleAgentEpisode, size: int) -> SingleAgentEpisode:
    """The episode with each action replaced by the flattened window of the next ``size``
    actions, NaN past the episode's end (see module doc). The same id, so a replay buffer
    still recognises it."""
    targets, mask = window_actions(np.asarray(episode.get_actions()), size)
    return with_chunk_actions(episode, targets, mask)


def with_chunk_actions(
    episode: SingleAgentEpisode, targets: np.ndarray, mask: np.ndarray
) -> SingleAgentEpisode:
    """The episode with the given chunk targets (T, K, A) as its actions, NaN where ``mask``
    (T, K) is 0 (numpy, no lookback)."""
    n = len(episode)
    if targets.shape[0] != n or mask.shape != targets.shape[:2]:
        raise ValueError(
            f"chunk targets: expected ({n}, K, A) and masks ({n}, K) for an episode of {n} "
            f"steps, got {targets.shape} and {mask.shape}"
        )
    obs = episode.get_observations()
    if isinstance(obs, dict):
        observations = [{k: np.asarray(v[t]) for k, v in obs.items()} for t in range(n + 1)]
    else:
        observations = list(obs)
    padded = np.where(mask[:, :, None] > 0, targets, np.nan).astype(np.float32)
    out = SingleAgentEpisode(
        id_=episode.id_,
        observations=observations,
        actions=list(padded.reshape(n, -1)),
        rewards=list(episode.get_rewards()),
        infos=list(episode.get_infos()),
        terminated=episode.is_terminated,
        truncated=episode.is_truncated,
        len_lookback_buffer=0,
        observation_space=episode.observation_space,
        action_space=chunk_space(episode.action_space, targets.shape[1]),
    )
    return out.to_numpy()
