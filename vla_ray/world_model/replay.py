"""``SequenceReplay``: episodes (or episode fragments) kept as arrays, sampled as (B, T) windows
in the world model's layout (``prev_actions``, ``rewards`` on arrival, ``continues``,
``is_first``; the first step of every window restarts the RSSM, as DreamerV3's replay rows)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


class SequenceReplay:
    """A FIFO of episode fragments holding at most ``capacity`` steps."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = int(capacity)
        self.items: list[dict[str, Any]] = []
        self.num_steps = 0

    def add(
        self,
        observations: Mapping[str, np.ndarray],
        actions: np.ndarray,
        rewards: np.ndarray | None,
        terminated: bool,
    ) -> None:
        """One fragment: ``observations`` (L+1 rows per field), ``actions`` (L), ``rewards``
        (L, or None for a dataset without rewards), ``terminated`` (its last observation is
        terminal)."""
        actions = np.asarray(actions, dtype=np.float32).reshape(len(actions), -1)
        L = len(actions)
        if L < 1:
            return
        obs = {k: np.asarray(v) for k, v in observations.items()}
        for key, value in obs.items():
            if len(value) != L + 1:
                raise ValueError(
                    f"observations[{key!r}]: expected {L + 1} rows (one more than the {L} "
                    f"actions), got {len(value)}"
                )
        item = {"obs": obs, "actions": actions, "terminated": bool(terminated)}
        if rewards is not None:
            item["rewards"] = np.asarray(rewards, dtype=np.float32).reshape(L)
        self.items.append(item)
        self.num_steps += L
        while self.num_steps > self.capacity and len(self.items) > 1:
            self.num_steps -= len(self.items.pop(0)["actions"])

    def add_episode(self, episode: Any) -> None:
        """A (possibly unfinished) RLlib ``SingleAgentEpisode``."""
        from vla_ray.data.contract import episode_arrays

        obs, actions, rewards = episode_arrays(episode)
        self.add(obs, actions, rewards, episode.is_terminated)

    def sample(self, batch: int, length: int, rng: np.random.Generator) -> dict[str, Any]:
        """``batch`` windows of ``length`` observations (fragments shorter than that are
        padded by repeating their last step, marked ``mask`` 0)."""
        if not self.items:
            raise ValueError("replay: no data to sample from (add episodes first)")
        has_rewards = all("rewards" in it for it in self.items)
        rows = []
        for _ in range(batch):
            it = self.items[rng.integers(len(self.items))]
            n_obs = len(it["actions"]) + 1
            start = int(rng.integers(max(1, n_obs - length + 1)))
            idx = np.minimum(np.arange(start, start + length), n_obs - 1)
            valid = (np.arange(start, start + length) < n_obs).astype(np.float32)
            prev = np.zeros((length, it["actions"].shape[-1]), np.float32)
            rew = np.zeros(length, np.float32)
            for j, i in enumerate(idx):
                if j > 0 and i > 0 and valid[j]:
                    prev[j] = it["actions"][i - 1]
                    if has_rewards:
                        rew[j] = it["rewards"][i - 1]
            cont = np.ones(length, np.float32)
            if it["terminated"]:
                cont[idx == n_obs - 1] = 0.0
            first = np.zeros(length, np.float32)
            first[0] = 1.0
            row = {
                "obs": {k: v[idx] for k, v in it["obs"].items()},
                "prev_actions": prev,
                "continues": cont,
                "is_first": first,
                "mask": valid,
            }
            if has_rewards:
                row["rewards"] = rew
            rows.append(row)
        out: dict[str, Any] = {
            "obs": {k: np.stack([r["obs"][k] for r in rows]) for k in rows[0]["obs"]}
        }
        for key in rows[0]:
            if key != "obs":
                out[key] = np.stack([r[key] for r in rows])
        return out
