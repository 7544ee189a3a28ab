"""Scripted (privileged) experts for the vla-ray environments, for demonstrations and DAgger."""

from __future__ import annotations

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


class ExpertMixing(gym.Wrapper):
    """Executes the env's expert action instead of the agent's with probability ``expert_beta``.

    DAgger's beta schedule: the learner sets ``expert_beta`` on every sub-env between iterations
    (``vector_env.set_attr("expert_beta", b)``). ``info["expert_acted"]`` says which one acted.
    """

    def __init__(self, env: gym.Env, expert_beta: float = 0.0, seed: int | None = None) -> None:
        super().__init__(env)
        if not 0.0 <= float(expert_beta) <= 1.0:
            raise ValueError(f"ExpertMixing: `expert_beta` must be in [0, 1], got {expert_beta!r}")
        self.expert_beta = float(expert_beta)
        self._rng = np.random.default_rng(seed)

    def step(self, action):
        acted = bool(self.expert_beta > 0 and self._rng.random() < self.expert_beta)
        if acted:
            action = np.asarray(self.env.unwrapped.expert_action(), dtype=np.float32)
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = dict(info, expert_acted=acted)
        return obs, reward, terminated, truncated, info


EXPERTS: dict[str, type[ScriptedExpert]] = {
    "vla_ray/LangReach-v0": ScriptedExpert,
    "vla_ray/LangReachState-v0": ScriptedExpert,
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
