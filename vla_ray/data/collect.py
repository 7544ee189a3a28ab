"""``vla-ray collect``: roll out a policy (scripted expert, random, or a checkpoint) and write the
episodes as an offline dataset."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vla_ray.data.d4rl_format import d4rl_path
from vla_ray.data.rllib_format import FORMAT as RLLIB_FORMAT
from vla_ray.data.rllib_format import write_episodes
from vla_ray.fsutil import check_output

# rllib: RLlib episode parquet; minari: Minari dataset; lerobot: LeRobotDataset v3.0 folder;
# d4rl: D4RL-style HDF5 file (see vla_ray/data/*_format.py)
FORMATS = (RLLIB_FORMAT, "minari", "lerobot", "d4rl")
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
    random_prob: float = 0.0,
    seed: int = 0,
    env_config: dict[str, Any] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Collect ``episodes`` episodes (episode i reset with ``seed + i``) into ``output``.

    ``noise`` adds Gaussian noise of that std to every action (clipped to the action space), for
    medium style data; ``random_prob`` replaces the policy's action, at each step with that
    probability, by a uniformly random one (epsilon-greedy exploration: replay style data whose
    mistakes do not average out). Returns the dataset summary (also written to
    ``dataset.json``). An existing non-empty ``output`` is refused (``OutputExistsError``,
    before any rollout) unless ``overwrite``.

    ``env_config["safety"]`` (a rules file, as for training and eval) puts every action through
    the safety layer: the dataset records the action the env was sent (after the rules, noise
    and random actions included), each step's ``info`` its interventions, and the summary the
    interventions per rule id (``safety_interventions``) and ``mean_episode_cost``.
    """
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode
    from tqdm import tqdm

    import vla_ray.envs  # noqa: F401  (registers the ids)
    from vla_ray.safety import EPISODE_COST_INFO_KEY, SAFETY_INFO_KEY, SafetyWrapper, make_env

    if fmt not in FORMATS:
        raise ValueError(f"--format: unknown format {fmt!r}; available: {', '.join(FORMATS)}")
    if episodes < 1:
        raise ValueError(f"--episodes: must be >= 1, got {episodes}")
    if noise < 0:
        raise ValueError(f"--noise: must be >= 0, got {noise}")
    if not 0.0 <= random_prob <= 1.0:
        raise ValueError(f"--random-prob: must be in [0, 1], got {random_prob}")
    check_output(d4rl_path(output) if fmt == "d4rl" else output, overwrite)
    env = make_env(env_id, env_config)  # env_config["safety"]: the safety layer's rules
    shielded = isinstance(env, SafetyWrapper)
    act = make_actor(policy, env, env_id, seed)
    rng = np.random.default_rng(seed)
    space = env.action_space
    if random_prob > 0 and not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        raise ValueError(f"--random-prob: {env_id}'s action space {space} has unbounded dimensions")
    returns, successes = [], []
    safety: list[dict[str, int]] = []
    costs: list[float] = []

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
                if random_prob > 0 and rng.random() < random_prob:
                    action = rng.uniform(space.low, space.high).astype(np.float32)
                action = np.clip(action, space.low, space.high).astype(np.float32)
                obs, reward, term, trunc, info = env.step(action)
                if shielded:  # what the env was sent, not what the policy asked for
                    action = env.last_action.reshape(space.shape).astype(np.float32)
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
            if shielded:
                safety.append(dict(info[SAFETY_INFO_KEY]))
                costs.append(float(info[EPISODE_COST_INFO_KEY]))
            yield ep

    meta = dict(env=env_id, env_config=env_config or {}, policy=policy, noise=noise, seed=seed)
    if random_prob > 0:
        meta["random_prob"] = random_prob
    try:
        path = _write(fmt, generate(), output, meta, env, overwrite)
    finally:
        env.close()
    summary = dict(
        output=str(path),
        format=fmt,
        episodes=episodes,
        mean_return=float(np.mean(returns)),
        success_rate=float(np.mean(successes)),
    )
    if safety:
        summary["safety_interventions"] = {r: int(sum(s[r] for s in safety)) for r in safety[0]}
        summary["mean_episode_cost"] = float(np.mean(costs))
    return summary


def _write(
    fmt: str,
    episodes: Any,
    output: str | os.PathLike,
    meta: dict[str, Any],
    env: Any,
    overwrite: bool,
):
    """Write ``episodes`` in ``fmt``; returns the dataset's path."""
    if fmt == RLLIB_FORMAT:
        return write_episodes(episodes, output, meta, overwrite=overwrite)
    if fmt == "d4rl":
        from vla_ray.data.d4rl_format import write_d4rl

        return write_d4rl(episodes, output, meta, overwrite=overwrite)
    if fmt == "minari":
        from vla_ray.data.minari_format import write_minari

        return write_minari(
            episodes,
            output,
            env_id=meta["env"],
            observation_space=env.observation_space,
            action_space=env.action_space,
            meta=meta,
            overwrite=overwrite,
        )
    from vla_ray.data.lerobot_format import write_lerobot

    fps = env.metadata.get("render_fps")
    if not fps:
        dt = getattr(env.unwrapped, "dt", None)
        fps = round(1.0 / dt) if dt else 10
    return write_lerobot(
        episodes,
        output,
        observation_space=env.observation_space,
        action_space=env.action_space,
        fps=int(fps),
        task="",  # envs without an instruction: empty task text (readers use the env's own)
        meta=meta,
        overwrite=overwrite,
    )
