"""``vla-ray collect``: roll out a policy (scripted expert, random, or a checkpoint) and write the
episodes as an offline dataset."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vla_ray.data.rllib_format import FORMAT as RLLIB_FORMAT
from vla_ray.data.rllib_format import write_episodes

FORMATS = (RLLIB_FORMAT,)
POLICIES = ("expert", "random")


def make_actor(policy: str, env: Any, env_id: str, seed: int) -> Callable[[dict], np.ndarray]:
    """``obs -> action`` for ``policy``: "expert", "random" or a checkpoint path."""
    if policy == "expert":
        from vla_ray.envs.experts import get_expert

        expert = get_expert(env_id)
        return lambda obs: expert(env)
    if policy == "random":
        env.action_space.seed(seed)
        return lambda obs: np.asarray(env.action_space.sample(), dtype=np.float32)
    if not Path(policy).exists():
        raise ValueError(
            f"--policy: expected one of {POLICIES} or an existing checkpoint path, got {policy!r}"
        )
    from vla_ray.evaluate import load_policy

    loaded = load_policy(policy)

    def act(obs: dict) -> np.ndarray:
        batch = {k: np.asarray(v)[None] for k, v in obs.items()}
        return np.asarray(loaded(batch))[0, : int(np.prod(env.action_space.shape))]

    return act


def collect(
    env_id: str,
    policy: str,
    episodes: int,
    output: str | os.PathLike,
    *,
    fmt: str = RLLIB_FORMAT,
    noise: float = 0.0,
    seed: int = 0,
    env_config: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Collect ``episodes`` episodes (episode i reset with ``seed + i``) into ``output``.

    ``noise`` adds Gaussian noise of that std to every action (clipped to the action space), for
    medium / replay style data. Returns the dataset summary (also written to ``dataset.json``).
    """
    import gymnasium as gym
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode
    from tqdm import tqdm

    import vla_ray.envs  # noqa: F401  (registers the ids)

    if fmt not in FORMATS:
        raise ValueError(f"--format: unknown format {fmt!r}; available: {', '.join(FORMATS)}")
    if episodes < 1:
        raise ValueError(f"--episodes: must be >= 1, got {episodes}")
    if noise < 0:
        raise ValueError(f"--noise: must be >= 0, got {noise}")
    env = gym.make(env_id, **(env_config or {}))
    act = make_actor(policy, env, env_id, seed)
    rng = np.random.default_rng(seed)
    space = env.action_space
    returns, successes = [], []

    def generate():
        for i in tqdm(range(episodes), disable=not progress, unit="ep", desc="collect"):
            obs, info = env.reset(seed=seed + i)
            ep = SingleAgentEpisode(
                observation_space=env.observation_space, action_space=env.action_space
            )
            ep.add_env_reset(observation=obs, infos=info)
            done = False
            while not done:
                action = np.asarray(act(obs), dtype=np.float32).reshape(space.shape)
                if noise > 0:
                    action = action + rng.normal(0.0, noise, size=action.shape)
                action = np.clip(action, space.low, space.high).astype(np.float32)
                obs, reward, term, trunc, info = env.step(action)
                ep.add_env_step(
                    observation=obs,
                    action=action,
                    reward=float(reward),
                    infos=info,
                    terminated=term,
                    truncated=trunc,
                )
                done = term or trunc
            returns.append(ep.get_return())
            successes.append(bool(info.get("is_success", False)))
            yield ep

    meta = dict(env=env_id, env_config=env_config or {}, policy=policy, noise=noise, seed=seed)
    try:
        path = write_episodes(generate(), output, meta)
    finally:
        env.close()
    summary = dict(
        output=str(path),
        format=fmt,
        episodes=episodes,
        mean_return=float(np.mean(returns)),
        success_rate=float(np.mean(successes)),
    )
    return summary
