"""Scripted (privileged) experts for the vla-ray environments, for demonstrations and DAgger."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np


class ScriptedExpert:
    """Calls the env's privileged ``expert_action()`` and optionally adds Gaussian noise."""

    def __init__(self, noise: float = 0.0, seed: int | None = None) -> None:
        if noise < 0:
            raise ValueError(f"ScriptedExpert: `noise` must be >= 0, got {noise!r}")
        self.noise = float(noise)
        self.rng = np.random.default_rng(seed)

    def __call__(self, env: gym.Env) -> np.ndarray:
        """Expert action for the env's current state (clipped to its action space when noisy)."""
        action = np.asarray(env.unwrapped.expert_action(), dtype=np.float32)
        if self.noise > 0:
            action = action + self.rng.normal(0.0, self.noise, size=action.shape)
            space = env.action_space
            action = np.clip(action, space.low, space.high).astype(np.float32)
        return action


ENV_EXPERT = "env"
EXPERT_LABEL = "expert_action"
ObsExpert = Callable[[Any], np.ndarray]


class ExpertError(ValueError):
    """An ``expert`` setting that names no usable expert (the message says what was expected)."""


def _import_expert(spec: str) -> ObsExpert:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ExpertError(
            f"expert: cannot import module {module_name!r} of {spec!r} ({err}); expected "
            f"{EXPERT_FORMS}"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ExpertError(
            f"expert: module {module_name!r} has no callable {attr!r} (from {spec!r}); expected "
            "a function taking one observation and returning an action"
        )
    return fn


def _checkpoint_expert(path: str) -> ObsExpert:
    from vla_ray.evaluate import load_policy

    policy = load_policy(path)  # named errors for a folder that is no checkpoint

    def act(obs: Any) -> np.ndarray:
        batch = {k: np.asarray(v)[None] for k, v in obs.items()}
        return np.asarray(policy(batch)[0], dtype=np.float32)

    return act


EXPERT_FORMS = (
    f"{ENV_EXPERT!r} (the env's built-in expert), a checkpoint directory (a saved VLA or an "
    "RLlib checkpoint, acting deterministically) or 'module:function' (observation -> action)"
)


def check_expert_spec(spec: str, env_id: str | None = None) -> str:
    """``spec`` when it names an expert (``EXPERT_FORMS``), else an ExpertError naming it;
    ``ENV_EXPERT`` needs an env with a built-in expert. Loads nothing."""
    if not isinstance(spec, str) or not spec.strip():
        raise ExpertError(f"expert: expected {EXPERT_FORMS}; got {spec!r}")
    if spec == ENV_EXPERT:
        if env_id is not None and env_id not in EXPERTS:
            raise ExpertError(
                f"expert: {env_id!r} has no built-in expert (envs with one: {sorted(EXPERTS)}); "
                "give a checkpoint directory or 'module:function'"
            )
        return spec
    if Path(spec).exists():
        if not Path(spec).is_dir():
            raise ExpertError(f"expert: {spec!r} is a file; expected a checkpoint directory")
        return spec
    module_name, sep, attr = spec.partition(":")
    if sep and module_name and attr.isidentifier():
        return spec
    raise ExpertError(
        f"expert: {spec!r} is neither an existing checkpoint directory nor 'module:function'; "
        f"expected {EXPERT_FORMS}"
    )


def load_obs_expert(spec: str) -> ObsExpert | None:
    """The expert named by ``spec`` as ``observation -> action``; None for ``ENV_EXPERT``
    (the env's privileged ``expert_action()``, which sees the simulator state)."""
    spec = check_expert_spec(spec)
    if spec == ENV_EXPERT:
        return None
    if Path(spec).is_dir():
        return _checkpoint_expert(spec)
    return _import_expert(spec)


class ExpertMixing(gym.Wrapper):
    """Executes the expert's action instead of the agent's with probability ``expert_beta``.

    DAgger's beta schedule: the learner sets ``expert_beta`` on every sub-env between iterations
    (``vector_env.set_attr("expert_beta", b)``). ``info["expert_acted"]`` says which one acted.
    ``expert`` (see ``load_obs_expert``): the env's built-in expert (default), or one acting on
    observations, whose action for every observation is reported as ``info["expert_action"]``
    (the label DAgger relabels with).
    """

    def __init__(
        self,
        env: gym.Env,
        expert_beta: float = 0.0,
        seed: int | None = None,
        expert: str = ENV_EXPERT,
    ) -> None:
        super().__init__(env)
        if not 0.0 <= float(expert_beta) <= 1.0:
            raise ValueError(f"ExpertMixing: `expert_beta` must be in [0, 1], got {expert_beta!r}")
        self.expert_beta = float(expert_beta)
        self._rng = np.random.default_rng(seed)
        self._expert = load_obs_expert(expert)
        self._label: np.ndarray | None = None

    def _labelled(self, obs: Any, info: dict[str, Any]) -> dict[str, Any]:
        if self._expert is None:
            return info
        self._label = np.asarray(self._expert(obs), dtype=np.float32).reshape(
            self.action_space.shape
        )
        return dict(info, **{EXPERT_LABEL: self._label})

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return obs, self._labelled(obs, info)

    def step(self, action):
        acted = bool(self.expert_beta > 0 and self._rng.random() < self.expert_beta)
        if acted:
            action = (
                self._label
                if self._expert is not None
                else np.asarray(self.env.unwrapped.expert_action(), dtype=np.float32)
            )
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = self._labelled(obs, dict(info, expert_acted=acted))
        return obs, reward, terminated, truncated, info


EXPERTS: dict[str, type[ScriptedExpert]] = {
    "vla_ray/LangReach-v0": ScriptedExpert,
    "vla_ray/LangReachState-v0": ScriptedExpert,
    "vla_ray/LangDrive-v0": ScriptedExpert,
    "vla_ray/LangDriveState-v0": ScriptedExpert,
}


def get_expert(env_id: str, **kwargs: Any) -> ScriptedExpert:
    """Build the scripted expert registered for ``env_id`` (kwargs go to its constructor)."""
    if env_id not in EXPERTS:
        raise ValueError(
            f"get_expert: no scripted expert for env_id {env_id!r}; "
            f"envs with an expert: {sorted(EXPERTS)}"
        )
    return EXPERTS[env_id](**kwargs)


def rollout_expert(env: gym.Env, expert: ScriptedExpert, episodes: int, seed: int = 0) -> dict:
    """Run ``episodes`` episodes (episode i reset with ``seed + i``); success rate, return, length."""
    if episodes < 1:
        raise ValueError(f"rollout_expert: `episodes` must be >= 1, got {episodes!r}")
    successes, returns, lengths = [], [], []
    for i in range(episodes):
        _, info = env.reset(seed=seed + i)
        total, steps, done = 0.0, 0, False
        while not done:
            _, reward, terminated, truncated, info = env.step(expert(env))
            total += float(reward)
            steps += 1
            done = terminated or truncated
        successes.append(bool(info.get("is_success", False)))
        returns.append(total)
        lengths.append(steps)
    return {
        "success_rate": float(np.mean(successes)),
        "mean_return": float(np.mean(returns)),
        "mean_length": float(np.mean(lengths)),
    }
