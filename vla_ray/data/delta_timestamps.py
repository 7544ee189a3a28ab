"""History and chunk windows of LeRobot episodes by time offsets (LeRobot's ``delta_timestamps``).

``delta_timestamps`` maps a feature name to offsets in seconds from the current frame, e.g.
``{"observation.state": [-0.2, -0.1, 0.0], "action": [0.0, 0.1, 0.2, 0.3]}``: an observation
history of 3 frames and a chunk of 4 actions. As in LeRobot:

- every offset must be a whole number of frames at the dataset's ``fps`` (within
  ``tolerance_s``, default 1e-4 s); the frame offset is ``round(offset * fps)``;
- a window never crosses its episode: frames before the first or after the last are the
  episode's first/last frame repeated, and ``<name>_is_pad`` (T, n) is True for them.

:func:`read_windows` returns, for every frame t of one episode, each named feature's window
(T, n, *shape) and its pad mask. Names are LeRobot's feature names (``observation.state``,
``observation.images.<camera>``, ``action``, ``next.reward``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vla_ray.data.rllib_format import DataError

DEFAULT_TOLERANCE_S = 1e-4


def delta_indices(
    delta_timestamps: Mapping[str, Sequence[float]],
    fps: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> dict[str, np.ndarray]:
    """Frame offsets per feature; ``DataError`` naming the feature and the offsets that are not
    a whole number of frames at ``fps``."""
    if not isinstance(delta_timestamps, Mapping) or not delta_timestamps:
        raise DataError(
            "delta_timestamps: expected a mapping of feature name -> offsets in seconds, "
            f"got {delta_timestamps!r}"
        )
    out = {}
    for name, offsets in delta_timestamps.items():
        values = np.asarray(offsets, dtype=np.float64).reshape(-1) if offsets is not None else []
        if len(values) == 0 or not np.all(np.isfinite(values)):
            raise DataError(
                f"delta_timestamps[{name!r}]: expected a non-empty list of finite seconds, "
                f"got {offsets!r}"
            )
        frames = np.round(values * fps)
        off = np.abs(frames / fps - values) > tolerance_s
        if off.any():
            raise DataError(
                f"delta_timestamps[{name!r}]: offsets {values[off].tolist()} are not whole "
                f"frames at {fps:g} fps (multiples of {1 / fps:g} s within {tolerance_s:g} s)"
            )
        out[name] = frames.astype(np.int64)
    return out


def window(values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``values`` (T, ...) -> (T, n, ...) with row t holding ``values[t + offsets]`` clamped to
    the episode, and the pad mask (T, n) (True where clamped)."""
    n = len(values)
    idx = np.arange(n)[:, None] + np.asarray(offsets)[None, :]
    pad = (idx < 0) | (idx >= n)
    return values[np.clip(idx, 0, max(n - 1, 0))], pad


def read_windows(
    path: str | os.PathLike,
    ref: dict[str, Any],
    delta_timestamps: Mapping[str, Sequence[float]],
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> dict[str, np.ndarray]:
    """One episode (``ref`` from ``lerobot_format.episode_refs``) as windows: for each name in
    ``delta_timestamps`` its (T, n, *shape) frames and ``<name>_is_pad`` (T, n)."""
    from vla_ray.data import lerobot_format as lf

    info = lf.load_info(path)
    fps = float(info["fps"])
    if not math.isfinite(fps) or fps <= 0:
        raise DataError(f"{path}: meta/info.json: fps: expected a positive number, got {fps!r}")
    offsets = delta_indices(delta_timestamps, fps, tolerance_s)
    raw = lf.read_episode(path, ref)
    T = len(raw.actions)
    frames: dict[str, np.ndarray] = {"action": np.asarray(raw.actions)}
    frames["next.reward"] = np.asarray(raw.rewards)
    for name in info["features"]:
        if name.startswith("observation."):
            key = name.removeprefix("observation.").removeprefix("images.")
            frames[name] = raw.observations[key][:T]  # the frames only (no repeated final obs)
    out: dict[str, np.ndarray] = {}
    for name, off in offsets.items():
        if name not in frames:
            raise DataError(
                f"{raw.source}: delta_timestamps names {name!r}, not a feature of the dataset "
                f"(features: {sorted(frames)})"
            )
        out[name], out[f"{name}_is_pad"] = window(frames[name], off)
    return out
