"""Executing action chunks: a chunk of K actions as one macro-action, and temporal ensembling.

``ExecuteChunk`` turns an env with actions of A dims into one whose action is a flattened chunk
(K * A): one ``step`` runs the first ``execute`` (M <= K; M = K is open loop, M < K receding
horizon: the policy re-plans after M steps) actions of the chunk, stopping early when the
episode terminates or is truncated inside the chunk. RL algorithms (PPO, GRPO, SAC) then treat a
chunk as one action of a semi-MDP: the macro-reward is ``sum_i gamma**i * r_i`` over the steps
executed, and the algorithm's own ``gamma`` discounts once per macro-step. ``gamma`` here is the
env setting ``action_chunk.gamma`` (default 1: the plain sum, so an episode's return is the
env's; set it to the algorithm's gamma for the discount an agent acting every step would see).

``vla-ray train`` applies the wrapper to every env of a run whose ``model.chunk_size`` is > 1,
through ``env_config["action_chunk"] = {"size": K, "execute": M, "gamma": g}`` (``size`` is
filled in from the model; ``--set env.action_chunk.execute=4`` for receding horizon).

``TemporalEnsemble`` is ACT's temporal ensembling for evaluation: the policy predicts a chunk at
every step, and the action executed at step t is the weighted mean of every earlier prediction
for step t, weights ``exp(-m * i)`` with i = 0 the oldest prediction (ACT, Zhao et al. 2023).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np

from vla_ray.config import ConfigError
from vla_ray.env_factory import CHUNK_CONFIG_KEY  # noqa: F401  (re-exported)

CHUNK_SETTINGS = ("size", "execute", "gamma")
# info keys of a macro-step: env steps executed, their undiscounted reward sum, and (when the
# env labels its states with an expert action, e.g. for DAgger) the expert's action at each
# state the chunk's actions were taken in, padded to K (repeating the last) with a mask
STEPS_KEY = "chunk_steps"
RETURN_KEY = "chunk_return"
EXPERT_KEY = "expert_action"
EXPERT_CHUNK_KEY = "expert_action_chunk"
EXPERT_MASK_KEY = "expert_action_chunk_mask"
SUCCESS_KEY = "is_success"


def chunk_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    """``env_config["action_chunk"]`` completed with defaults (``execute`` = ``size``,
    ``gamma`` = 1) and checked; ConfigError naming the field otherwise."""
    s = dict(settings or {})
    unknown = sorted(set(s) - set(CHUNK_SETTINGS))
    if unknown:
        raise ConfigError(
            f"env.{CHUNK_CONFIG_KEY}: unknown key(s) {unknown}; valid keys are "
            f"{', '.join(CHUNK_SETTINGS)}"
        )
    size = s.get("size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"env.{CHUNK_CONFIG_KEY}.size: expected an integer >= 1, got {size!r}")
    execute = s.get("execute")
    execute = size if execute is None else execute
    if isinstance(execute, bool) or not isinstance(execute, int) or not 1 <= execute <= size:
        raise ConfigError(
            f"env.{CHUNK_CONFIG_KEY}.execute: expected an integer in 1..{size} (the chunk "
            f"size), got {execute!r}"
        )
    gamma = float(s.get("gamma", 1.0))
    if not 0.0 < gamma <= 1.0:
        raise ConfigError(f"env.{CHUNK_CONFIG_KEY}.gamma: expected a value in (0, 1], got {gamma}")
    return dict(size=size, execute=execute, gamma=gamma)


class ExecuteChunk(gym.Wrapper):
    """A flattened chunk of ``size`` actions per step; runs its first ``execute`` open loop
    (see module doc). Info: the last executed step's, with ``is_success`` true when any
    executed step reported it, plus ``chunk_steps``, ``chunk_return`` and, when the env reports
    ``expert_action``, ``expert_action_chunk`` / ``expert_action_chunk_mask``."""

    def __init__(self, env: gym.Env, size: int, execute: int | None = None, gamma: float = 1.0):
        super().__init__(env)
        s = chunk_settings(dict(size=size, execute=execute, gamma=gamma))
        self.size, self.execute, self.gamma = s["size"], s["execute"], s["gamma"]
        space = env.action_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise ConfigError(f"action_space: ExecuteChunk needs a 1-D Box, got {space}")
        self.action_dim = int(space.shape[0])
        self.action_space = gym.spaces.Box(
            np.tile(space.low, self.size), np.tile(space.high, self.size), dtype=space.dtype
        )
        self._info: dict[str, Any] = {}

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._info = info
        return obs, info

    def step(self, action):
        chunk = np.asarray(action).reshape(self.size, self.action_dim)
        reward, ret, success = 0.0, 0.0, False
        labels: list[np.ndarray] = []
        obs, terminated, truncated, info = None, False, False, {}
        n = 0
        for i in range(self.execute):
            if EXPERT_KEY in self._info:
                labels.append(np.asarray(self._info[EXPERT_KEY], np.float32))
            obs, r, terminated, truncated, info = self.env.step(chunk[i])
            self._info = info
            reward += self.gamma**i * float(r)
            ret += float(r)
            success = success or bool(info.get(SUCCESS_KEY, False))
            n = i + 1
            if terminated or truncated:
                break
        info = dict(info, **{STEPS_KEY: n, RETURN_KEY: ret})
        if SUCCESS_KEY in info or success:
            info[SUCCESS_KEY] = success
        if labels:
            mask = np.zeros(self.size, np.float32)
            mask[: len(labels)] = 1.0
            labels += [labels[-1]] * (self.size - len(labels))
            info[EXPERT_CHUNK_KEY] = np.stack(labels)
            info[EXPERT_MASK_KEY] = mask
        return obs, reward, terminated, truncated, info


def wrap_action_chunks(env: gym.Env, settings: dict[str, Any] | None) -> gym.Env:
    """``env`` in ``ExecuteChunk`` per ``env_config["action_chunk"]`` (unchanged for size 1)."""
    s = chunk_settings(settings)
    if s["size"] == 1:
        return env
    return ExecuteChunk(env, s["size"], s["execute"], s["gamma"])


class TemporalEnsemble:
    """ACT's temporal ensembling over overlapping chunk predictions (see module doc).

    Call ``reset()`` at each episode's start and ``step(chunk)`` with the chunk (K, A) predicted
    at every step; it returns the action to execute now.
    """

    def __init__(self, size: int, coeff: float = 0.01):
        if int(size) < 1:
            raise ConfigError(f"chunk_size: expected an integer >= 1, got {size!r}")
        if float(coeff) < 0:
            raise ConfigError(f"temporal_ensemble: expected a coefficient >= 0, got {coeff!r}")
        self.size, self.coeff = int(size), float(coeff)
        self._chunks: deque[np.ndarray] = deque(maxlen=self.size)

    def reset(self) -> None:
        """Forget the predictions of the previous episode."""
        self._chunks.clear()

    def step(self, chunk: np.ndarray) -> np.ndarray:
        """The ensembled action (A,) for this step, given this step's predicted chunk (K, A)."""
        chunk = np.asarray(chunk, np.float64)
        if chunk.ndim != 2 or chunk.shape[0] != self.size:
            raise ValueError(f"chunk: expected shape ({self.size}, action_dim), got {chunk.shape}")
        self._chunks.append(chunk)
        n = len(self._chunks)
        # the oldest kept chunk was predicted n - 1 steps ago: its slot n - 1 is for this step
        preds = np.stack([c[n - 1 - j] for j, c in enumerate(self._chunks)])
        w = np.exp(-self.coeff * np.arange(n))
        return (w[:, None] * preds).sum(0) / w.sum()
