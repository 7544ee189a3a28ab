"""Format detection and conversion of Minari / D4RL / LeRobotDataset / RLDS / ROS bag data to
RLlib's offline episode format (msgpack-packed ``SingleAgentEpisode`` parquet) through
``ray.data``; the converted dataset's ``dataset.json`` keeps the actions' normalisation
statistics (``action_stats``).

``vla-ray train --data PATH`` accepts any of them: an RLlib dataset is used as is; anything else
is converted once per (dataset, env, env config) into a cache directory (``VLA_RAY_DATA_CACHE``,
default ``<tmp>/vla-ray-data``) and reused while the dataset's files are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from vla_ray.data import (
    d4rl_format,
    lerobot_format,
    minari_format,
    nuscenes_format,
    rlds_format,
    rosbag_format,
)
from vla_ray.data.contract import EnvContract
from vla_ray.data.rllib_format import (
    FORMAT as RLLIB,
)
from vla_ray.data.rllib_format import (
    META_NAME,
    DataError,
    _pack,
    dataset_files,
    read_episodes,
)
from vla_ray.env_factory import FACTORY_KEYS
from vla_ray.fsutil import check_output, replace_dir, temp_path

READERS = {
    d4rl_format.FORMAT: d4rl_format,
    minari_format.FORMAT: minari_format,
    lerobot_format.FORMAT: lerobot_format,
    rlds_format.FORMAT: rlds_format,
    rosbag_format.FORMAT: rosbag_format,
    nuscenes_format.FORMAT: nuscenes_format,
}
CONVERTER_VERSION = 2  # 2: action_stats in dataset.json, multi-camera "images"


def resolve_source(path: str | os.PathLike) -> str | os.PathLike:
    """``path`` itself, or the local snapshot folder of a Hub dataset ``hf://<repo_id>``."""
    if lerobot_format.is_hub_id(path):
        return lerobot_format.resolve_hub(path)
    return path


def detect_format(path: str | os.PathLike) -> str:
    """The format of ``path``: ``rllib`` (dataset.json / episode parquet), ``d4rl`` (.hdf5/.h5
    file), ``lerobot`` (meta/info.json, or a Hub dataset ``hf://<repo_id>``), ``rlds`` (a
    TFDS-built RLDS folder: features.json + dataset_info.json, or a spec file ``{"format":
    "rlds", ...}``), ``rosbag`` (a mapping file ``{"format": "rosbag", ...}``), ``nuscenes`` (a
    v1.0 table folder), ``minari`` (data/metadata.json + main_data.hdf5, or a local Minari id)."""
    path = resolve_source(path)
    p = Path(path)
    if minari_format.resolve(p) is not None:
        return minari_format.FORMAT
    if d4rl_format.is_d4rl(p):
        return d4rl_format.FORMAT
    if rlds_format.is_rlds(p):
        return rlds_format.FORMAT
    if rosbag_format.is_spec_file(p):
        return rosbag_format.FORMAT
    if nuscenes_format.is_nuscenes(p):
        return nuscenes_format.FORMAT
    if p.is_dir():
        if lerobot_format.is_lerobot(p):
            return lerobot_format.FORMAT
        if (p / META_NAME).is_file() or any(p.glob("*.parquet")):
            return RLLIB
    elif p.is_file() and p.suffix == ".parquet":
        return RLLIB
    if not p.exists():
        if minari_format.is_minari_id(str(path)):
            minari_format.episode_refs(path)  # raises, naming where the id was looked for
        raise DataError(f"data: {p} does not exist")
    raise DataError(
        f"data: cannot tell the format of {p}: expected an RLlib episode dataset (dataset.json), "
        "a D4RL .hdf5 file, a LeRobotDataset folder (meta/info.json), an RLDS/TFDS folder "
        "(features.json + dataset_info.json) or a Minari dataset (data/metadata.json) / local "
        "Minari id"
    )


def read_dataset(
    path: str | os.PathLike, env_id: str, env_config: dict[str, Any] | None = None
) -> list[Any]:
    """All episodes of a dataset in any format, as ``SingleAgentEpisode``s on ``env_id``'s
    spaces (in-process; :func:`convert_to_rllib` is the ray.data route for training)."""
    path = resolve_source(path)
    fmt = detect_format(path)
    if fmt == RLLIB:
        return read_episodes(path)
    reader = READERS[fmt]
    contract = EnvContract(env_id, env_config)
    return [
        contract.episode(reader.read_episode(path, ref), _episode_id(fmt, i))
        for i, ref in enumerate(reader.episode_refs(path))
    ]


def _episode_id(fmt: str, i: int) -> str:
    return f"{fmt}-{i:07d}"


class _Packer:
    """ray.data map_batches UDF: episode references -> packed RLlib episodes (one env per actor)."""

    def __init__(self, fmt: str, path: str, env_id: str, env_config: dict[str, Any]):
        self.reader = READERS[fmt]
        self.fmt, self.path = fmt, path
        self.contract = EnvContract(env_id, env_config)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        items = []
        for i, ref in zip(batch["i"], batch["ref"], strict=True):
            raw = self.reader.read_episode(self.path, json.loads(ref))
            items.append(_pack(self.contract.episode(raw, _episode_id(self.fmt, int(i)))))
        return {"item": items}


def convert_to_rllib(
    path: str | os.PathLike,
    output: str | os.PathLike,
    env_id: str,
    env_config: dict[str, Any] | None = None,
    *,
    batch_size: int = 8,
    overwrite: bool = False,
) -> Path:
    """Convert a Minari / D4RL / LeRobotDataset dataset to an RLlib episode dataset at ``output``
    (replaced atomically) with ``ray.data``: references -> ``map_batches`` (read, map onto the
    env's spaces, validate, pack) -> ``write_parquet``. Needs Ray to be initialised. An existing
    non-empty ``output`` is an ``OutputExistsError`` unless ``overwrite``."""
    import ray

    path = resolve_source(path)
    fmt = detect_format(path)
    if fmt == RLLIB:
        raise DataError(f"data: {path} is already an RLlib episode dataset")
    reader = READERS[fmt]
    refs = reader.episode_refs(path)
    if not refs:
        raise DataError(f"data: {path} has no episodes")
    out = Path(output)
    check_output(out, overwrite)
    tmp = temp_path(out)
    rows = [{"i": i, "ref": json.dumps(r)} for i, r in enumerate(refs)]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 16)))
    ds = ds.map_batches(
        _Packer,
        fn_constructor_args=(fmt, str(path), env_id, dict(env_config or {})),
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=1,
        num_cpus=0.5,
    )
    try:
        ds.write_parquet(str(tmp))
    except Exception as err:  # a DataError inside a ray.data task arrives wrapped
        cause = _data_error_in(err)
        if cause is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(str(cause)) from err
        raise
    from vla_ray.data.stats import dataset_action_statistics

    meta = dict(
        format=RLLIB,
        episodes=len(refs),
        # per-dimension normalisation statistics of the converted actions (mean/std, q01/q99)
        action_stats=dataset_action_statistics(str(tmp)),
        env=env_id,
        env_config=env_config or {},
        converted_from=dict(format=fmt, path=str(path)),
    )
    (tmp / META_NAME).write_text(json.dumps(meta, indent=2, default=str))
    return replace_dir(tmp, out)


def _data_error_in(err: BaseException) -> BaseException | None:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, DataError):
            return err
        text = str(err)
        if "DataError" in text:
            tail = text.split("DataError:")[-1].strip().splitlines()
            return DataError(tail[0] if tail else text)
        err = err.__cause__ or err.__context__
    return None


def cache_dir() -> Path:
    return Path(
        os.environ.get("VLA_RAY_DATA_CACHE") or Path(tempfile.gettempdir()) / "vla-ray-data"
    )


def _fingerprint(path: str | os.PathLike, fmt: str, env_id: str, env_config: dict) -> str:
    p = Path(path)
    if p.exists():
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
        if fmt == rlds_format.FORMAT and p.is_file():  # a spec file: and the folder it names
            root = rlds_format.load_spec(p).root
            files += sorted(x for x in root.rglob("*") if x.is_file())
        if fmt == rosbag_format.FORMAT:  # a mapping file: and its bags
            for bag in map(Path, rosbag_format.load_spec(p)["bags"]):
                files += (
                    [bag] if bag.is_file() else sorted(x for x in bag.rglob("*") if x.is_file())
                )
        stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    else:  # a Minari id
        data_dir = minari_format.resolve(path)
        stamp = [
            (str(data_dir), sorted((f.name, f.stat().st_mtime_ns) for f in data_dir.iterdir()))
        ]
    key = json.dumps(
        [CONVERTER_VERSION, fmt, stamp, env_id, env_config], sort_keys=True, default=str
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def offline_input(
    data: str | os.PathLike, env_id: str, env_config: dict[str, Any] | None = None
) -> list[str]:
    """The RLlib episode parquet files for ``data`` in any format (converted + cached when not
    RLlib's own); what ``config.offline_data(input_=...)`` gets."""
    data = resolve_source(data)
    fmt = detect_format(data)
    if fmt == RLLIB:
        return dataset_files(data)
    # the env factory's wrapper options (expert mixing, the shield, chunks) are not env arguments
    env_config = {k: v for k, v in (env_config or {}).items() if k not in FACTORY_KEYS}
    name = Path(str(data)).name.replace(".", "_") or "data"
    target = cache_dir() / f"{name}-{fmt}-{_fingerprint(data, fmt, env_id, env_config)}"
    if (target / META_NAME).is_file():
        print(f"data: {fmt} dataset {data} -> cached RLlib episodes in {target}", file=sys.stderr)
    else:
        print(
            f"data: converting {fmt} dataset {data} for {env_id} to RLlib episodes with ray.data "
            f"-> {target} (cached; set VLA_RAY_DATA_CACHE to move it)",
            file=sys.stderr,
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        # a content-addressed cache entry: an incomplete one (no dataset.json) is replaced
        convert_to_rllib(data, target, env_id, env_config, overwrite=True)
    return dataset_files(target)
