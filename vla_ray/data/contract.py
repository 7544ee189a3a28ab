"""The observation contract between external datasets and vla-ray envs.

Every reader (Minari, D4RL, LeRobotDataset) yields :class:`RawEpisode`s with the dataset's own
keys; :class:`EnvContract` maps them onto the target env's spaces (``image`` uint8 HxWx3,
``state``, ``instruction`` + ``instruction_mask`` where the env has them) and builds RLlib
``SingleAgentEpisode``s, refusing anything that does not fit with a :class:`DataError` that names
the source, the field, what was expected and what was given.

Instructions: a dataset's task text is tokenised with the env's tokenizer (the project's shipped
word-level tokenizer unless ``env_config["tokenizer"]`` names another); a dataset without task
text gets the env's instruction when that instruction is fixed (state-only locomotion envs), and
a :class:`DataError` when it varies per episode (LangReach).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from vla_ray.data.rllib_format import DataError

INSTRUCTION_KEYS = ("instruction", "instruction_mask")
# Dataset keys accepted for a contract key, in order (after the key itself).
ALIASES: dict[str, tuple[str, ...]] = {
    "state": ("observation.state", "observation", "observations", "agent_pos"),
    "image": ("observation.image", "pixels", "rgb"),
}


@dataclass
class RawEpisode:
    """One episode as a reader found it, before mapping onto an env.

    ``observations`` is a flat array or a dict of arrays, each with ``T + 1`` rows (the reset
    observation and one after each of the ``T`` actions); ``actions`` has ``T`` rows.
    ``source`` names where it came from ("file.hdf5 episode 3"), for error messages.
    """

    observations: dict[str, np.ndarray] | np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool
    truncated: bool
    instruction: str | None = None
    source: str = ""


class EnvContract:
    """The spaces and instruction encoding of ``env_id`` (built once; the env is closed)."""

    def __init__(self, env_id: str, env_config: dict[str, Any] | None = None):
        import gymnasium as gym

        import vla_ray.envs  # noqa: F401  (registers the ids)

        self.env_id = env_id
        self.env_config = dict(env_config or {})
        # the env factory's wrapper options (vla_ray.train._EnvCreator), not env arguments: the
        # data are single steps of the env itself
        from vla_ray.setting_keys import ENV_FACTORY_KEYS

        for key in ENV_FACTORY_KEYS:
            self.env_config.pop(key, None)
        env = gym.make(env_id, **self.env_config)
        try:
            self.observation_space = env.observation_space
            self.action_space = env.action_space
            self._fixed_instruction = _fixed_instruction(env, self.observation_space)
        finally:
            env.close()
        self.tokenizer = self.env_config.get("tokenizer")

    @property
    def is_dict(self) -> bool:
        from gymnasium import spaces

        return isinstance(self.observation_space, spaces.Dict)

    def encode_instruction(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask of ``text`` at the env's instruction length."""
        length = int(self.observation_space["instruction"].shape[0])
        ids, mask = _encode(self.tokenizer, length, text)
        return ids, mask

    def observations(self, raw: RawEpisode) -> dict[str, np.ndarray] | np.ndarray:
        """``raw``'s observations mapped onto the env's observation space (``T + 1`` rows)."""
        n = len(raw.actions) + 1
        obs = raw.observations
        if not self.is_dict:
            arr = _pick(obs, "state", raw.source) if isinstance(obs, dict) else obs
            return _fit(arr, n, self.observation_space, "observations", raw.source)
        out: dict[str, np.ndarray] = {}
        given = obs if isinstance(obs, dict) else {"state": obs}
        for key, sub in self.observation_space.spaces.items():
            if key in INSTRUCTION_KEYS and _find(given, key) is None:
                out[key] = self._instruction_rows(raw, key, n)
            else:
                out[key] = _fit(_pick(given, key, raw.source), n, sub, key, raw.source)
        return out

    def _instruction_rows(self, raw: RawEpisode, key: str, n: int) -> np.ndarray:
        if raw.instruction:  # an empty task text means none
            ids, mask = self.encode_instruction(raw.instruction)
        elif self._fixed_instruction is not None:
            ids, mask = self._fixed_instruction
        else:
            raise DataError(
                f"{raw.source}: no instruction text or {key!r} observation in the dataset, and "
                f"{self.env_id}'s instruction varies per episode (give datasets with task text)"
            )
        row = ids if key == "instruction" else mask
        return np.repeat(row[None], n, axis=0).astype(self.observation_space[key].dtype)

    def episode(self, raw: RawEpisode, episode_id: str | None = None) -> Any:
        """A finished numpy ``SingleAgentEpisode`` of ``raw`` on the env's spaces."""
        from ray.rllib.env.single_agent_episode import SingleAgentEpisode

        actions, rewards = self.check_transitions(raw)
        obs = self.observations(raw)
        n = len(actions) + 1
        if isinstance(obs, dict):
            rows = [{k: v[t] for k, v in obs.items()} for t in range(n)]
        else:
            rows = list(obs)
        ep = SingleAgentEpisode(
            id_=episode_id,
            observations=rows,
            actions=list(actions),
            rewards=[float(r) for r in rewards],
            terminated=bool(raw.terminated),
            truncated=bool(raw.truncated) and not raw.terminated,
            observation_space=self.observation_space,
            action_space=self.action_space,
            len_lookback_buffer=0,
        )
        return ep.to_numpy()

    def check_transitions(self, raw: RawEpisode) -> tuple[np.ndarray, np.ndarray]:
        """Actions (env dtype) and rewards of ``raw``; DataError on shape or NaN problems."""
        space = self.action_space
        actions = np.asarray(raw.actions)
        if actions.ndim == 1 and space.shape == (1,):
            actions = actions[:, None]
        if actions.ndim < 1 or actions.shape[1:] != space.shape:
            raise DataError(
                f"{raw.source}: field 'actions' has shape {actions.shape[1:]} per step; "
                f"{self.env_id}'s action space expects {space.shape}"
            )
        if len(actions) == 0:
            raise DataError(f"{raw.source}: episode has no steps")
        if np.issubdtype(actions.dtype, np.floating) and not np.all(np.isfinite(actions)):
            bad = int(np.argwhere(~np.isfinite(actions))[0][0])
            raise DataError(f"{raw.source}: field 'actions' has NaN or inf (first at step {bad})")
        rewards = np.asarray(raw.rewards, dtype=np.float64).reshape(-1)
        if rewards.shape != (len(actions),):
            raise DataError(
                f"{raw.source}: field 'rewards' has {rewards.shape[0]} entries, "
                f"expected one per action ({len(actions)})"
            )
        if not np.all(np.isfinite(rewards)):
            raise DataError(f"{raw.source}: field 'rewards' has NaN or inf")
        return actions.astype(space.dtype, copy=False), rewards


def episode_arrays(ep: Any) -> tuple[dict[str, np.ndarray] | np.ndarray, np.ndarray, np.ndarray]:
    """``(observations (T+1 rows), actions (T), rewards (T))`` of a finished episode."""
    if not ep.is_numpy:
        ep.to_numpy()
    obs = ep.get_observations()
    if isinstance(obs, dict):
        obs = {k: np.asarray(v) for k, v in obs.items()}
    else:
        obs = np.asarray(obs)
    return obs, np.asarray(ep.get_actions()), np.asarray(ep.get_rewards(), dtype=np.float32)


def instruction_text(ep: Any, tokenizer: str | None = None) -> str | None:
    """The episode's instruction: the reset info's ``instruction`` text, else its decoded tokens."""
    info = ep.get_infos(0) or {}
    if isinstance(info.get("instruction"), str):
        return info["instruction"]
    obs = ep.get_observations(0)
    if isinstance(obs, dict) and "instruction" in obs:
        from vla_ray.tokenizer import load_tokenizer

        ids = np.asarray(obs["instruction"])
        mask = np.asarray(obs.get("instruction_mask", np.ones_like(ids)))
        return load_tokenizer(tokenizer).decode(ids[mask > 0].tolist(), skip_special_tokens=True)
    return None


@functools.lru_cache(maxsize=64)
def _encode(tokenizer: str | None, length: int, text: str) -> tuple[np.ndarray, np.ndarray]:
    from vla_ray.tokenizer import encode_instructions, load_tokenizer

    ids, mask = encode_instructions([text], length, load_tokenizer(tokenizer))
    return ids[0], mask[0]


def _fixed_instruction(env: Any, space: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The env's instruction tokens when they are the same for every reset, else None."""
    from gymnasium import spaces

    if not isinstance(space, spaces.Dict) or "instruction" not in space.spaces:
        return None
    seen = []
    for seed in (0, 1, 2):
        obs, _ = env.reset(seed=seed)
        mask = obs.get("instruction_mask", np.ones_like(obs["instruction"]))
        seen.append((np.asarray(obs["instruction"]), np.asarray(mask)))
    first = seen[0]
    if all(np.array_equal(s[0], first[0]) and np.array_equal(s[1], first[1]) for s in seen):
        return first
    return None


def _find(given: dict[str, np.ndarray], key: str) -> np.ndarray | None:
    for name in (key, *ALIASES.get(key, ())):
        if name in given:
            return given[name]
    if key == "image" and "images" in given:  # a multi-camera env's ``image``: its first camera
        return given["images"][:, 0]
    return None


def _pick(given: dict[str, np.ndarray], key: str, source: str) -> np.ndarray:
    value = _find(given, key)
    if value is None:
        raise DataError(
            f"{source}: observation key {key!r} missing (the dataset has "
            f"{sorted(given)}; accepted names: {[key, *ALIASES.get(key, ())]}"
            + (", or 'images' (its first camera))" if key == "image" else ")")
        )
    return value


def _fit(arr: Any, n: int, space: Any, name: str, source: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 0 or arr.shape[0] != n:
        raise DataError(
            f"{source}: observation {name!r} has {arr.shape[0] if arr.ndim else 0} rows, "
            f"expected {n} (one more than the actions)"
        )
    if arr.shape[1:] != space.shape:
        raise DataError(
            f"{source}: observation {name!r} has shape {arr.shape[1:]}, "
            f"the env's space expects {space.shape}"
        )
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        if np.issubdtype(space.dtype, np.floating) and np.all(np.isfinite(space.low)):
            raise DataError(f"{source}: observation {name!r} has NaN or inf")
        if np.any(np.isnan(arr)):
            raise DataError(f"{source}: observation {name!r} has NaN")
    return arr.astype(space.dtype, copy=False)
