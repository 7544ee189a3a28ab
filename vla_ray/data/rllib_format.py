"""RLlib's offline episode format: parquet files whose ``item`` column holds msgpack-packed
``SingleAgentEpisode`` states, as RLlib writes with ``output_write_episodes=True`` and reads with
``offline_data(input_read_episodes=True)``.

A dataset directory holds ``part-NNNNNN.parquet`` files and a ``dataset.json`` describing where
the episodes came from (env id and config, policy, counts); readers need only the parquet files.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from vla_ray.fsutil import check_output, replace_dir, temp_dir

FORMAT = "rllib"
META_NAME = "dataset.json"
EPISODES_PER_FILE = 100


class DataError(ValueError):
    """A dataset that cannot be read or does not match what the reader expects."""


def require(module: str, fmt: str) -> Any:
    """Import ``module`` for the ``fmt`` dataset format; ImportError naming the extra otherwise."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"the {fmt!r} dataset format needs the {module!r} package: pip install 'vla-ray[data]'"
        ) from err


def _pack(episode: Any) -> bytes:
    import msgpack
    import msgpack_numpy as mnp

    return msgpack.packb(episode.get_state(), default=mnp.encode)


class UnsafeDataError(DataError):
    """Packed data that would run code when decoded (a pickled object array): never decoded."""


# gym space fields RLlib stores as base64 ``.npy`` bytes (loaded with ``allow_pickle=True``)
_SPACE_ARRAYS = ("low", "high", "nvec")


def _safe_array(obj: dict, path: str) -> Any:
    """One msgpack-numpy array/scalar, decoded without pickle: object arrays are refused."""
    import msgpack_numpy as mnp

    kind = obj.get(b"kind")
    if kind == b"O":
        raise UnsafeDataError(
            f"field {path or '(root)'}: a pickled object array (numpy kind 'O'); refusing to "
            "unpickle untrusted data (expected a numeric array)"
        )
    try:
        descr = obj[b"type"]
        if kind == b"V":
            descr = [tuple(t.decode() if isinstance(t, bytes) else t for t in d) for d in descr]
        dtype = np.dtype(mnp._unpack_dtype(descr))
    except Exception as e:
        raise DataError(f"field {path or '(root)'}: not a valid packed array ({e})") from e
    if dtype.hasobject:
        raise UnsafeDataError(
            f"field {path or '(root)'}: an array of Python objects ({dtype}); expected a numeric "
            "array"
        )
    return mnp.decode(obj)


@functools.lru_cache(maxsize=256)
def _plain_npy(value: str) -> str | None:
    """None when the base64 zlib ``.npy`` bytes load without pickle, else the reason (cached:
    every episode of a dataset repeats the same spaces)."""
    import base64
    import io
    import zlib

    try:
        np.load(io.BytesIO(zlib.decompress(base64.b64decode(value))), allow_pickle=False)
    except Exception as e:
        return str(e)
    return None


def _check_space(d: dict, path: str) -> None:
    """A serialised gym space: its arrays must load without pickle (RLlib loads them with
    ``allow_pickle=True``)."""
    for key in _SPACE_ARRAYS:
        value = d.get(key)
        if isinstance(value, str) and (why := _plain_npy(value)) is not None:
            raise UnsafeDataError(
                f"field {path}.{key}: not a plain numeric .npy array ({why}); refusing to "
                "unpickle untrusted data"
            )


def _decode_tree(obj: Any, path: str) -> Any:
    """Decode msgpack-numpy arrays inside an unpacked tree, refusing anything that unpickles."""
    if isinstance(obj, dict):
        if b"nd" in obj:
            return _safe_array(obj, path)
        if b"complex" in obj:
            return complex(obj[b"data"].decode())
        if isinstance(obj.get("space"), str):
            _check_space(obj, path)
        return {k: _decode_tree(v, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_tree(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    return obj


def unpack_state(item: bytes) -> dict[str, Any]:
    """A packed ``SingleAgentEpisode`` state (msgpack + msgpack-numpy) decoded safely: object
    arrays (which msgpack-numpy would unpickle) and pickled gym-space arrays are refused with an
    ``UnsafeDataError`` naming the field."""
    import msgpack

    raw = msgpack.unpackb(item)
    if not isinstance(raw, dict):
        raise DataError(f"not a packed episode state (got {type(raw).__name__})")
    try:
        return _decode_tree(raw, "")
    except DataError as e:
        raise type(e)(f"episode {raw.get('id_')!s}: {e}") from None


def _unpack(item: bytes) -> Any:
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    return SingleAgentEpisode.from_state(unpack_state(item))


def check_packed(items: Iterable[bytes], source: str = "data") -> None:
    """Decode every packed episode of ``items`` safely (``unpack_state``): a DataError naming
    ``source``, the row and the field on the first that cannot be decoded or would unpickle."""
    for i, item in enumerate(items):
        try:
            unpack_state(item)
        except DataError as e:
            raise type(e)(f"data: {source} row {i}: {e}") from None


def write_episodes(
    episodes: Iterable[Any],
    output: str | os.PathLike,
    meta: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write finished ``SingleAgentEpisode``s to ``output`` (replaced atomically); returns it.
    An existing non-empty ``output`` is an ``OutputExistsError`` unless ``overwrite``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(output)
    check_output(out, overwrite)
    tmp = temp_dir(out)
    batch: list[bytes] = []
    n_files = n_eps = n_steps = 0

    def flush() -> None:
        nonlocal n_files
        if batch:
            pq.write_table(pa.table({"item": batch}), tmp / f"part-{n_files:06d}.parquet")
            n_files += 1
            batch.clear()

    try:
        for ep in episodes:
            if not ep.is_done:
                raise DataError(f"write_episodes: episode {ep.id_} is not finished (not done)")
            batch.append(_pack(ep.to_numpy() if not ep.is_numpy else ep))
            n_eps += 1
            n_steps += len(ep)
            if len(batch) == EPISODES_PER_FILE:
                flush()
        flush()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if n_eps == 0:
        shutil.rmtree(tmp)
        raise DataError("write_episodes: no episodes to write")
    info = dict(format=FORMAT, episodes=n_eps, steps=n_steps, files=n_files, **(meta or {}))
    (tmp / META_NAME).write_text(json.dumps(info, indent=2, default=str))
    return replace_dir(tmp, out)


def dataset_files(path: str | os.PathLike) -> list[str]:
    """The parquet files of a dataset directory (or the single file given); DataError if none."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data: {p} does not exist")
    files = [p] if p.is_file() else sorted(p.glob("*.parquet"))
    if not files:
        raise DataError(f"data: no .parquet files in {p} (expected an RLlib episode dataset)")
    return [str(f.resolve()) for f in files]


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``dataset.json`` of a dataset directory ({} when absent)."""
    f = Path(path) / META_NAME
    return json.loads(f.read_text()) if f.is_file() else {}


def read_episodes(path: str | os.PathLike) -> list[Any]:
    """All episodes of a dataset, in file order; DataError naming the file on a bad one."""
    import pyarrow.parquet as pq
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    episodes = []
    for f in dataset_files(path):
        try:
            table = pq.read_table(f, columns=["item"])
        except Exception as e:  # truncated / not parquet / no item column
            raise DataError(f"data: cannot read {f} as RLlib episodes: {e}") from e
        for i, item in enumerate(table.column("item").to_pylist()):
            try:
                state = unpack_state(item)
            except DataError as e:
                raise type(e)(f"data: {f} row {i}: {e}") from None
            except Exception as e:
                raise DataError(f"data: {f} row {i}: not a packed episode ({e})") from e
            try:
                episodes.append(SingleAgentEpisode.from_state(state))
            except Exception as e:
                raise DataError(
                    f"data: {f} row {i} (episode {state.get('id_')}): not a packed episode "
                    f"({type(e).__name__}: {e})"
                ) from e
    return episodes


def check_episodes(episodes: Iterable[Any], observation_space: Any, action_space: Any) -> None:
    """Every observation/action fits the env's spaces and is finite; DataError naming the field."""
    from gymnasium import spaces

    for ep in episodes:
        acts = np.asarray(ep.get_actions())
        if acts.shape[1:] != action_space.shape:
            raise DataError(
                f"data: episode {ep.id_}: actions have shape {acts.shape[1:]}, "
                f"the env's action space expects {action_space.shape}"
            )
        if not np.all(np.isfinite(acts)):
            raise DataError(f"data: episode {ep.id_}: actions contain NaN or inf")
        obs = ep.get_observations()
        if isinstance(observation_space, spaces.Dict):
            for key, sub in observation_space.spaces.items():
                if key not in obs:
                    raise DataError(f"data: episode {ep.id_}: observation key {key!r} missing")
                shape = np.asarray(obs[key]).shape[1:]
                if shape != sub.shape:
                    raise DataError(
                        f"data: episode {ep.id_}: observation {key!r} has shape {shape}, "
                        f"the env's space expects {sub.shape}"
                    )
