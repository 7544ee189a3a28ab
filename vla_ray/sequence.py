"""The context window of a sequence policy (the Decision Transformer), without torch.

A sequence policy acts on the last ``K`` steps of its episode: observations, the actions taken
and the returns-to-go (``target_return`` minus the rewards collected so far, divided by
``return_scale``), with the episode timestep of each. :func:`context_window` builds that window
for the training EnvRunners (``vla_ray.algorithms.dt.DTContext``), ``vla-ray eval``, an exported
graph's runner and Serve alike; :class:`WindowRunner` keeps one running episode and
:class:`SessionWindows` one per Serve session id.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

# names of the window's inputs beside the observation (model inputs and batch columns)
PREV_ACTIONS, RTG, TIMESTEPS, MASK = "dt_actions", "dt_rtg", "dt_timesteps", "dt_mask"
WINDOW_INPUTS = (PREV_ACTIONS, RTG, TIMESTEPS, MASK)
# spec.json key of an exported sequence policy: its window settings
CONTEXT_KEY = "context"
DEFAULT_MAX_SESSIONS = 10_000

# (window with a batch axis of 1: obs, actions, rtg, timesteps, mask) -> actions (1, A)
WindowAct = Callable[[dict[str, Any]], np.ndarray]


def stack(items: list[Any]) -> Any:
    """Arrays (or dicts of arrays) stacked along a new first axis."""
    if isinstance(items[0], Mapping):
        return {k: np.stack([np.asarray(x[k]) for x in items]) for k in items[0]}
    return np.stack([np.asarray(x) for x in items])


def window(
    obs: dict[str, np.ndarray],
    actions: np.ndarray,
    rtg: np.ndarray,
    end: int,
    K: int,
) -> dict[str, Any]:
    """The K steps of one episode ending at step ``end`` (inclusive), left-padded with zeros.

    ``obs`` values, ``actions`` and ``rtg`` are indexed by step (``len(rtg)`` steps at least up
    to ``end``). Returns obs (dict of (K, ...)), actions (K, A), rtg (K,), timesteps (K,),
    mask (K,) with 1 on real steps.
    """
    start = max(0, end - K + 1)
    n = end + 1 - start
    pad = K - n

    def padded(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x[start : end + 1])
        return np.concatenate([np.zeros((pad, *x.shape[1:]), x.dtype), x], axis=0)

    return dict(
        obs={k: padded(v) for k, v in obs.items()},
        actions=padded(actions).astype(np.float32),
        rtg=padded(rtg).astype(np.float32),
        timesteps=np.concatenate([np.zeros(pad, np.int64), np.arange(start, end + 1)]),
        mask=np.concatenate([np.zeros(pad, np.float32), np.ones(n, np.float32)]),
    )


def context_window(
    recent_obs: list[Any],
    past_actions: np.ndarray,
    rewards: np.ndarray,
    K: int,
    target_return: float,
    return_scale: float,
) -> dict[str, Any]:
    """The window (see :func:`window`) ending at the current step ``t = len(past_actions)`` of a
    running episode: ``recent_obs`` are its last ``min(K, t + 1)`` observations (the current
    one last), ``past_actions`` (t, A) and ``rewards`` (t,) everything before it. Returns-to-go
    are ``target_return`` minus the rewards collected so far, divided by ``return_scale``; the
    current step's action slot is zero (the causal mask hides it)."""
    t = len(past_actions)
    start = max(0, t - K + 1)
    obs = stack(list(recent_obs)[-(t + 1 - start) :])
    collected = np.concatenate([[0.0], np.cumsum(np.asarray(rewards, np.float64))])  # before i
    actions = np.zeros((t + 1, past_actions.shape[-1]), np.float32)
    actions[:t] = past_actions
    rtg = ((target_return - collected) / return_scale).astype(np.float32)
    full_obs = {
        k: np.concatenate([np.zeros((start, *v.shape[1:]), v.dtype), v])
        for k, v in (obs if isinstance(obs, dict) else {"obs": obs}).items()
    }
    w = window(full_obs, actions, rtg, t, K)
    if not isinstance(obs, dict):
        w["obs"] = w["obs"]["obs"]
    return w


class WindowRunner:
    """A sequence policy played step by step: keeps the running episode's last ``K``
    observations, its actions and rewards, and asks ``act`` for the action of the window that
    :func:`context_window` builds. ``reset()`` at every episode start, ``observe(reward)`` after
    every step; one episode at a time (observations with a batch axis of 1)."""

    def __init__(
        self,
        act: WindowAct,
        act_dim: int,
        context_length: int,
        target_return: float,
        return_scale: float,
    ):
        self.act, self.act_dim = act, int(act_dim)
        self.K, self.target, self.scale = int(context_length), float(target_return), return_scale
        self.reset()

    def reset(self) -> None:
        """A new episode: forget the context."""
        self._obs: list[Any] = []
        self._actions: list[np.ndarray] = []
        self._rewards: list[float] = []

    def observe(self, reward: float) -> None:
        """The reward of the step just taken."""
        self._rewards.append(float(reward))

    @property
    def steps(self) -> int:
        """Actions taken in the running episode."""
        return len(self._actions)

    def __call__(self, obs: Any) -> np.ndarray:
        """Batched (1, ...) observation (an array or a dict of arrays) -> actions (1, A)."""
        items = obs.values() if isinstance(obs, Mapping) else [obs]
        if any(len(np.asarray(x)) != 1 for x in items):
            raise ValueError("sequence policy: one episode at a time (a batch of 1 observation)")
        if isinstance(obs, Mapping):
            one = {k: np.asarray(v)[0] for k, v in obs.items()}
        else:
            one = np.asarray(obs)[0]
        self._obs = [*self._obs[-(self.K - 1) :], one] if self.K > 1 else [one]
        past = (
            np.stack(self._actions).astype(np.float32)
            if self._actions
            else np.zeros((0, self.act_dim), np.float32)
        )
        rewards = np.asarray(self._rewards[: len(self._actions)], np.float64)
        w = context_window(self._obs, past, rewards, self.K, self.target, self.scale)
        batch = {k: (stack([v]) if k == "obs" else np.asarray(v)[None]) for k, v in w.items()}
        action = np.asarray(self.act(batch), np.float32).reshape(1, self.act_dim)
        self._actions.append(action[0].copy())
        return action


class SessionWindows:
    """One :class:`WindowRunner` per session id (the least recently used one is dropped beyond
    ``max_sessions``): Serve's per-client context of a sequence policy."""

    def __init__(self, make: Callable[[], WindowRunner], max_sessions: int = DEFAULT_MAX_SESSIONS):
        self.make = make
        self.max_sessions = int(max_sessions)
        self._runners: OrderedDict[str, WindowRunner] = OrderedDict()

    def __len__(self) -> int:
        return len(self._runners)

    def act(
        self, sid: str, obs: Any, reward: float | None = None, episode_start: bool = False
    ) -> np.ndarray:
        """The session's next action (1, A) for ``obs``: a new session, or ``episode_start``,
        starts a new context; ``reward`` is the reward of the session's previous action (0 when
        not given)."""
        runner = self._runners.get(sid)
        if runner is None:
            runner = self._runners[sid] = self.make()
            while len(self._runners) > self.max_sessions:
                self._runners.popitem(last=False)
        self._runners.move_to_end(sid)
        if episode_start:
            runner.reset()
        elif runner.steps:
            runner.observe(0.0 if reward is None else reward)
        return runner(obs)
