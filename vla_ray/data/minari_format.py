"""Minari datasets, read and written through the ``minari`` package.

A dataset is a directory ``<root>/<dataset_id>/data/`` holding ``metadata.json`` and
``main_data.hdf5`` (minari's own storage); ``root`` is ``MINARI_DATASETS_PATH`` (default
``~/.minari/datasets``) for datasets named by id (``mujoco/hopper/medium-v0``). Nothing is
downloaded: ids must already be local.

Writing uses minari's storage API (``MinariStorage.new`` + ``update_episodes`` with
``EpisodeBuffer``s, as ``minari.create_dataset_from_buffers`` does) rather than
``minari.DataCollector``, whose step-by-step buffering imports jax (``minari[create]``);
``minari.load_dataset`` / ``MinariDataset`` open the result unchanged. Images are stored raw
(``jpeg_encoding=False``), so observations round-trip exactly.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from vla_ray.data.contract import RawEpisode, episode_arrays, instruction_text
from vla_ray.data.rllib_format import DataError, require
from vla_ray.fsutil import check_output, replace_dir, temp_dir

FORMAT = "minari"
ID_PATTERN = re.compile(r"^([\w.-]+/){0,2}[\w.-]+-v\d+$")


def datasets_root() -> Path:
    """Where minari keeps datasets by id (``MINARI_DATASETS_PATH`` or ``~/.minari/datasets``)."""
    root = os.environ.get("MINARI_DATASETS_PATH")
    return Path(root) if root else Path.home() / ".minari" / "datasets"


def dataset_id_for(output: Path, env_id: str) -> str:
    """The id stored in a dataset written to ``output``: its path under the datasets root when
    it lies there, else ``vla_ray/<env>/<name>-v0``."""
    try:
        rel = output.resolve().relative_to(datasets_root().resolve()).as_posix()
        if ID_PATTERN.match(rel):
            return rel
    except ValueError:
        pass
    env = re.sub(r"[^\w]+", "-", env_id.split("/")[-1].split("-v")[0].lower()).strip("-")
    name = output.name if re.search(r"-v\d+$", output.name) else f"{output.name}-v0"
    return f"vla_ray/{env}/{name}"


def write_minari(
    episodes: Iterable[Any],
    output: str | os.PathLike,
    *,
    env_id: str,
    observation_space: Any,
    action_space: Any,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write finished ``SingleAgentEpisode``s as a Minari dataset at ``output`` (replaced
    atomically; ``output/data/`` holds minari's files). Returns ``output``. An existing
    non-empty ``output`` is an ``OutputExistsError`` unless ``overwrite``."""
    import gymnasium as gym

    minari = require("minari", "minari")
    from minari.data_collector import EpisodeBuffer
    from minari.dataset.minari_storage import MinariStorage

    out = Path(output)
    check_output(out, overwrite)
    tmp = temp_dir(out)
    try:
        spec = gym.spec(env_id)
    except gym.error.Error:
        spec = None
    storage = MinariStorage.new(
        tmp / "data",
        observation_space=observation_space,
        action_space=action_space,
        env_spec=spec,
        data_format="hdf5",
        jpeg_encoding=False,
    )
    meta = dict(meta or {})
    storage.update_metadata(
        {
            "dataset_id": dataset_id_for(out, env_id),
            "minari_version": minari.__version__,
            "algorithm_name": str(meta.get("policy", "vla-ray collect")),
            "description": f"vla-ray collect: {meta}",
        }
    )

    def buffers():
        for i, ep in enumerate(episodes):
            obs, acts, rews = episode_arrays(ep)
            T = len(acts)
            text = instruction_text(ep)
            yield EpisodeBuffer(
                id=i,
                seed=meta.get("seed", 0) + i if "seed" in meta else None,
                observations=obs,
                actions=acts,
                rewards=rews.astype(np.float64),
                terminations=np.array([False] * (T - 1) + [bool(ep.is_terminated)]),
                truncations=np.array([False] * (T - 1) + [not ep.is_terminated]),
                infos={"instruction": [text] * (T + 1)} if text else None,
            )

    storage.update_episodes(buffers())
    if storage.total_episodes == 0:
        shutil.rmtree(tmp)
        raise DataError("write_minari: no episodes to write")
    return replace_dir(tmp, out)


def resolve(path_or_id: str | os.PathLike) -> Path | None:
    """The ``data/`` directory of a Minari dataset given as a path or a local id, else None."""
    p = Path(path_or_id)
    for cand in (p, p / "data"):
        # hdf5 storage (what vla-ray writes) or minari's arrow storage
        if (cand / "metadata.json").is_file() and (
            (cand / "main_data.hdf5").exists() or cand.name == "data"
        ):
            return cand
    if p.name == "main_data.hdf5" and (p.parent / "metadata.json").is_file():
        return p.parent
    text = str(path_or_id)
    if not p.exists() and ID_PATTERN.match(text):
        cand = datasets_root() / text / "data"
        if (cand / "metadata.json").is_file():
            return cand
    return None


def is_minari_id(text: str) -> bool:
    return bool(ID_PATTERN.match(text)) and not Path(text).exists()


def _open(data_dir: Path):
    require("minari", "minari")
    from minari import MinariDataset

    try:
        return MinariDataset(data_dir)
    except Exception as err:
        raise DataError(f"{data_dir}: cannot open as a Minari dataset: {err}") from err


def episode_refs(path: str | os.PathLike) -> list[dict[str, Any]]:
    data_dir = _require(path)
    ds = _open(data_dir)
    return [dict(index=int(i)) for i in ds.episode_indices]


def read_episode(path: str | os.PathLike, ref: dict[str, Any]) -> RawEpisode:
    data_dir = _require(path)
    index = int(ref["index"])
    source = f"{data_dir / 'main_data.hdf5'} episode {index}"
    try:
        ep = next(iter(_open(data_dir).iterate_episodes([index])))
    except DataError:
        raise
    except KeyError as err:
        raise DataError(f"{source}: missing field {err} (truncated or not a Minari file?)") from err
    except Exception as err:
        raise DataError(f"{source}: cannot read ({type(err).__name__}: {err})") from err
    terms = np.asarray(ep.terminations, bool)
    truncs = np.asarray(ep.truncations, bool)
    text = None
    infos = ep.infos or {}
    if "instruction" in infos and len(infos["instruction"]):
        raw = infos["instruction"][0]
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
    obs = ep.observations
    if isinstance(obs, dict):
        obs = {k: np.asarray(v) for k, v in obs.items()}
    return RawEpisode(
        observations=obs,
        actions=np.asarray(ep.actions),
        rewards=np.asarray(ep.rewards),
        terminated=bool(terms[-1]) if len(terms) else False,
        truncated=bool(truncs[-1]) if len(truncs) else True,
        instruction=text,
        source=source,
    )


def _require(path: str | os.PathLike) -> Path:
    data_dir = resolve(path)
    if data_dir is None:
        hint = (
            f"; as an id it would be at {datasets_root() / str(path)} (MINARI_DATASETS_PATH); "
            "vla-ray never downloads datasets"
            if ID_PATTERN.match(str(path))
            else ""
        )
        raise DataError(f"data: {path} is not a Minari dataset (no data/metadata.json){hint}")
    return data_dir
