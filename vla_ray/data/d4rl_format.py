"""D4RL-style HDF5 files, read and written with h5py (no ``d4rl`` package).

The deprecated ``d4rl`` package is not used: it needs ``mujoco-py`` and the MuJoCo 2.1 binaries,
is unmaintained, and only its file layout matters here. A file holds per-step arrays of equal
length N: ``observations``, ``actions``, ``rewards``, ``terminals``, ``timeouts``, optional
``next_observations`` and ``infos/*``. Episodes end where ``terminals | timeouts`` is set.

Without ``next_observations`` the observation after an episode's last action is unknown: the
reader then repeats the last observation (harmless after a termination, where RL does not
bootstrap) and logs that it did so. Files written here always carry ``next_observations``.

Dict observations (vla-ray envs): ``observations`` / ``next_observations`` hold the ``state`` key
(what D4RL tools read); the other keys (``image``, ``instruction`` ...) go to the groups
``extra_observations/<key>`` / ``extra_next_observations/<key>``, and the instruction text to
``infos/instruction``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from vla_ray.data.contract import RawEpisode, episode_arrays, instruction_text
from vla_ray.data.rllib_format import DataError, require
from vla_ray.fsutil import check_output, temp_path

FORMAT = "d4rl"
REQUIRED = ("observations", "actions", "rewards", "terminals", "timeouts")
SUFFIXES = (".hdf5", ".h5")
log = logging.getLogger(__name__)


def write_d4rl(
    episodes: Iterable[Any],
    output: str | os.PathLike,
    meta: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write finished ``SingleAgentEpisode``s as one D4RL HDF5 file (atomically); returns it.
    An existing ``output`` is an ``OutputExistsError`` unless ``overwrite``."""
    h5py = require("h5py", "d4rl")

    out = d4rl_path(output)
    check_output(out, overwrite)
    cols: dict[str, list] = {k: [] for k in (*REQUIRED, "next_observations")}
    extra: dict[str, list] = {}
    extra_next: dict[str, list] = {}
    texts: list[str] = []
    for ep in episodes:
        obs, acts, rews = episode_arrays(ep)
        T = len(acts)
        if isinstance(obs, dict):
            if "state" not in obs:
                raise DataError("write_d4rl: Dict observations need a 'state' key")
            for k, v in obs.items():
                if k != "state":
                    extra.setdefault(k, []).append(v[:-1])
                    extra_next.setdefault(k, []).append(v[1:])
            flat = obs["state"]
            texts += [instruction_text(ep) or ""] * T
        else:
            flat = obs
        cols["observations"].append(flat[:-1])
        cols["next_observations"].append(flat[1:])
        cols["actions"].append(acts)
        cols["rewards"].append(rews)
        term = np.zeros(T, bool)
        timeout = np.zeros(T, bool)
        term[-1] = bool(ep.is_terminated)
        timeout[-1] = not ep.is_terminated
        cols["terminals"].append(term)
        cols["timeouts"].append(timeout)
    if not cols["actions"]:
        raise DataError("write_d4rl: no episodes to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    try:
        _write_h5(h5py, tmp, cols, extra, extra_next, texts, meta)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return out


def _write_h5(h5py, tmp, cols, extra, extra_next, texts, meta) -> None:
    with h5py.File(tmp, "w") as f:
        for k, parts in cols.items():
            f.create_dataset(k, data=np.concatenate(parts), compression="gzip")
        for group, data in (("extra_observations", extra), ("extra_next_observations", extra_next)):
            for k, parts in data.items():
                f.create_dataset(f"{group}/{k}", data=np.concatenate(parts), compression="gzip")
        if texts:
            f.create_dataset("infos/instruction", data=texts, dtype=h5py.string_dtype())
        for k, v in (meta or {}).items():
            f.attrs[k] = v if isinstance(v, (int, float, str)) else str(v)


def d4rl_path(output: str | os.PathLike) -> Path:
    """The file ``write_d4rl`` writes for ``output`` (``.hdf5`` added when it has no suffix
    of the format)."""
    out = Path(output)
    return out if out.suffix in SUFFIXES else out.with_suffix(".hdf5")


def is_d4rl(path: Path) -> bool:
    return path.is_file() and path.suffix in SUFFIXES


def episode_refs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """One ``{"start", "end"}`` row range per episode of the file (checks the required keys)."""
    with _open(path) as f:
        n = _check_lengths(f, path)
        try:
            done = np.asarray(f["terminals"][:], bool) | np.asarray(f["timeouts"][:], bool)
        except OSError as err:
            raise DataError(f"{path}: cannot read terminals/timeouts (truncated?): {err}") from err
    ends = (np.flatnonzero(done) + 1).tolist()
    if not ends or ends[-1] != n:
        if n > (ends[-1] if ends else 0):
            log.warning(
                "%s: the last %d steps end without terminal/timeout: kept as truncated",
                path,
                n - (ends[-1] if ends else 0),
            )
        ends.append(n)
    starts = [0, *ends[:-1]]
    return [dict(start=s, end=e) for s, e in zip(starts, ends, strict=True) if e > s]


def read_episode(path: str | os.PathLike, ref: dict[str, Any]) -> RawEpisode:
    """The episode at rows ``ref["start"]:ref["end"]`` of the file."""
    s, e = int(ref["start"]), int(ref["end"])
    source = f"{path} rows {s}:{e}"
    with _open(path) as f:
        try:
            obs = _obs_rows(f, "observations", "next_observations", s, e, source)
            extra = f.get("extra_observations")
            if isinstance(obs, np.ndarray) and extra is not None:
                nxt = f["extra_next_observations"]
                obs = {"state": obs}
                for k in extra:
                    obs[k] = np.concatenate([extra[k][s:e], nxt[k][e - 1 : e]])
            text = None
            if "infos" in f and "instruction" in f["infos"]:
                raw = f["infos/instruction"][s]
                text = raw.decode() if isinstance(raw, bytes) else str(raw)
            terminated = bool(f["terminals"][e - 1])
            return RawEpisode(
                observations=obs,
                actions=np.asarray(f["actions"][s:e]),
                rewards=np.asarray(f["rewards"][s:e]),
                terminated=terminated,
                truncated=not terminated,
                instruction=text or None,
                source=source,
            )
        except (OSError, KeyError) as err:
            raise DataError(f"{source}: cannot read ({err})") from err


def _obs_rows(f: Any, key: str, next_key: str, s: int, e: int, source: str) -> np.ndarray:
    obs = np.asarray(f[key][s:e])
    if next_key in f:
        last = np.asarray(f[next_key][e - 1 : e])
    else:
        log.info(
            "%s: no %s; the episode's final observation repeats the last one", source, next_key
        )
        last = obs[-1:]
    return np.concatenate([obs, last])


def _open(path: str | os.PathLike):
    h5py = require("h5py", "d4rl")

    p = Path(path)
    if not p.is_file():
        raise DataError(f"data: {p} does not exist")
    try:
        return h5py.File(p, "r")
    except OSError as err:  # truncated / not HDF5
        raise DataError(f"data: cannot open {p} as HDF5 (truncated or not HDF5?): {err}") from err


def _check_lengths(f: Any, path: str | os.PathLike) -> int:
    missing = [k for k in REQUIRED if k not in f]
    if missing:
        raise DataError(
            f"{path}: D4RL key(s) {missing} missing (the file has {sorted(f.keys())}; "
            f"required: {list(REQUIRED)})"
        )
    n = f["actions"].shape[0]
    for k in (*REQUIRED, "next_observations"):
        if k in f and f[k].shape[0] != n:
            raise DataError(f"{path}: field {k!r} has {f[k].shape[0]} rows, 'actions' has {n}")
    try:  # a truncated file opens but fails on reading its chunks
        for k in REQUIRED:
            f[k][n - 1 : n] if n else None
    except OSError as err:
        raise DataError(f"{path}: cannot read field {k!r} (truncated file?): {err}") from err
    return n
