"""LeRobotDataset local folders (``codebase_version`` v3.0 and v2.1), read and written with
pyarrow and PyAV (no ``lerobot`` package: it pins torch < 2.11 and needs torchvision).

v3.0 layout: ``meta/info.json`` (schema, fps, path templates), ``meta/stats.json``,
``meta/tasks.parquet``, ``meta/episodes/chunk-XXX/file-XXX.parquet`` (one row per episode:
length, tasks, data file, ``dataset_from_index``/``dataset_to_index``, per video key its file and
``from_timestamp``/``to_timestamp``), ``data/chunk-XXX/file-XXX.parquet`` (frames of many
episodes) and ``videos/<key>/chunk-XXX/file-XXX.mp4`` (the frames of those episodes back to back).
v2.1: one parquet and one mp4 per episode, ``meta/episodes.jsonl``, ``meta/tasks.jsonl``,
``meta/episodes_stats.jsonl``.

A frame holds the observation at t, the action at t, ``next.reward`` and ``next.done``; files
written here add ``next.truncated`` (so a time limit is not read as a termination). LeRobotDataset
stores no observation after an episode's last action: the reader repeats the last one as the
episode's final observation (only a truncated episode's bootstrap state depends on it).

Mapping onto the env contract: ``observation.state`` -> ``state``; every camera
(``observation.image`` / ``observation.images.<camera>``, ``video`` or ``image`` dtype) -> its
name (``<camera>``), the only camera also -> ``image``, and two or more cameras of one shape ->
``images`` (T, N, H, W, 3) in the order of ``info.json``'s features (:func:`camera_names`);
other ``observation.<key>`` -> ``<key>``; the episode's task text -> ``instruction`` /
``instruction_mask`` (tokenised by the reader).

``image``-dtype features are stored in the frames parquet as Hugging Face ``datasets.Image``
structs (``{bytes: PNG/JPEG, path}``), decoded with Pillow; a null ``bytes`` reads ``path``
relative to the dataset root.

A Hub dataset is named ``hf://<repo_id>[@<revision>]`` and resolved through
``huggingface_hub.snapshot_download`` (repo type ``dataset``; only the local cache when
``HF_HUB_OFFLINE`` is set): a repo that is not cached is a :class:`DataError` naming it.

Tested on: folders written by :func:`write_lerobot` (v3.0, v2.1, lossless and AV1 video) and
folders built in tests by hand from LeRobot's published layout (info.json schema, episodes
metadata parquet / jsonl, ``datasets.Image`` parquet structs), as read in ``huggingface/lerobot``'s
dataset code (not written by the ``lerobot`` package itself, which pins torch < 2.11), and a fake
Hugging Face cache (``datasets--org--name/snapshots/<rev>``). No real Hub dataset was read.

Videos are written lossless by default (``libx264rgb``, crf 0: decoded frames equal the env's);
``codec="libsvtav1"`` writes LeRobot's default AV1 / yuv420p (lossy, smaller).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from vla_ray.data.contract import INSTRUCTION_KEYS, RawEpisode, episode_arrays, instruction_text
from vla_ray.data.rllib_format import DataError, require
from vla_ray.fsutil import check_output, replace_dir, temp_dir

FORMAT = "lerobot"
VERSIONS = ("v3.0", "v2.1")
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
CHUNKS_SIZE = 1000
EPISODES_PER_FILE = 500  # v3.0: episodes packed into one data parquet / mp4
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V3_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V21_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V21_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
CODECS = {  # codec -> (pix_fmt, options)
    "libx264rgb": ("rgb24", {"crf": "0", "preset": "veryfast"}),
    "libsvtav1": ("yuv420p", {"crf": "30", "preset": "8"}),
    "libx264": ("yuv420p", {"crf": "18", "preset": "veryfast"}),
}
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- writing
def _features(observation_space: Any, action_space: Any, fps: int, codec: str) -> dict:
    """LeRobot feature schema for the env's spaces: ``{feature: (obs key | None, spec)}``."""
    from gymnasium import spaces

    out: dict[str, tuple[str | None, dict]] = {}
    items = (
        observation_space.spaces.items()
        if isinstance(observation_space, spaces.Dict)
        else [("state", observation_space)]
    )
    for key, sub in items:
        if key in INSTRUCTION_KEYS:
            continue  # stored as the episode's task text
        shape = tuple(int(x) for x in sub.shape)
        if len(shape) == 3 and shape[-1] == 3 and sub.dtype == np.uint8:
            name = "observation.image" if key == "image" else f"observation.images.{key}"
            pix_fmt = CODECS[codec][0]
            info = {
                "video.height": shape[0],
                "video.width": shape[1],
                "video.codec": "av1" if codec == "libsvtav1" else "h264",
                "video.pix_fmt": "gbrp" if codec == "libx264rgb" else pix_fmt,
                "video.is_depth_map": False,
                "video.fps": fps,
                "video.channels": 3,
                "has_audio": False,
            }
            spec = {
                "dtype": "video",
                "shape": list(shape),
                "names": ["height", "width", "channels"],
                "info": info,
            }
        else:
            name = "observation.state" if key == "state" else f"observation.{key}"
            spec = {"dtype": str(np.dtype(sub.dtype)), "shape": list(shape), "names": None}
        out[name] = (key, spec)
    out["action"] = (
        None,
        {
            "dtype": str(np.dtype(action_space.dtype)),
            "shape": list(action_space.shape),
            "names": None,
        },
    )
    for name, dtype in (
        ("next.reward", "float32"),
        ("next.done", "bool"),
        ("next.truncated", "bool"),
    ):
        out[name] = (None, {"dtype": dtype, "shape": [1], "names": None})
    for name, dtype in (
        ("timestamp", "float32"),
        ("frame_index", "int64"),
        ("episode_index", "int64"),
        ("index", "int64"),
        ("task_index", "int64"),
    ):
        out[name] = (None, {"dtype": dtype, "shape": [1], "names": None})
    return out


class _VideoWriter:
    """Frames of one video key appended to one mp4 (PyAV), pts = frame number at ``fps``."""

    def __init__(self, path: Path, fps: int, shape: tuple[int, ...], codec: str):
        av = require("av", "lerobot")

        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream(codec, rate=fps)
        self.stream.height, self.stream.width = int(shape[0]), int(shape[1])
        pix_fmt, options = CODECS[codec]
        self.stream.pix_fmt = pix_fmt
        self.stream.options = dict(options)
        self.n = 0

    def add(self, frames: np.ndarray) -> None:
        av = require("av", "lerobot")

        for img in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = self.n
            self.n += 1
            for packet in self.stream.encode(frame):
                self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def _table(columns: dict[str, list[np.ndarray]], features: dict) -> Any:
    import pyarrow as pa

    arrays = {}
    for name, parts in columns.items():
        data = np.concatenate(parts)
        spec = features[name][1]
        if spec["shape"] == [1]:
            arrays[name] = pa.array(data.reshape(-1))
        else:
            width = int(np.prod(spec["shape"]))
            flat = pa.array(data.reshape(-1))
            arrays[name] = pa.FixedSizeListArray.from_arrays(flat, width)
    return pa.table(arrays)


def _stats(values: np.ndarray, image: bool = False) -> dict[str, Any]:
    """min/max/mean/std/count as LeRobot stores them (images: per channel in [0, 1], (3,1,1))."""
    if image:
        x = values.reshape(-1, 3).astype(np.float64) / 255.0
        shape = (3, 1, 1)
    else:
        x = values.reshape(len(values), -1).astype(np.float64)
        shape = values.shape[1:] or (1,)
    return {
        "min": x.min(0).reshape(shape).tolist(),
        "max": x.max(0).reshape(shape).tolist(),
        "mean": x.mean(0).reshape(shape).tolist(),
        "std": x.std(0).reshape(shape).tolist(),
        "count": [int(len(values))],
    }


def write_lerobot(
    episodes: Iterable[Any],
    output: str | os.PathLike,
    *,
    observation_space: Any,
    action_space: Any,
    fps: int,
    task: str = "",
    version: str = "v3.0",
    codec: str = "libx264rgb",
    robot_type: str | None = None,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write finished ``SingleAgentEpisode``s as a LeRobotDataset folder (replaced atomically;
    an existing non-empty ``output`` is an ``OutputExistsError`` unless ``overwrite``).

    Each episode's task is its instruction text (see :func:`instruction_text`), else ``task``.
    """
    import pyarrow.parquet as pq

    if version not in VERSIONS:
        raise ValueError(f"write_lerobot: version must be one of {VERSIONS}, got {version!r}")
    if codec not in CODECS:
        raise ValueError(f"write_lerobot: codec must be one of {tuple(CODECS)}, got {codec!r}")
    out = Path(output)
    check_output(out, overwrite)
    tmp = temp_dir(out)
    features = _features(observation_space, action_space, fps, codec)
    video_keys = [n for n, (_, s) in features.items() if s["dtype"] == "video"]
    tasks: dict[str, int] = {}
    episode_rows: list[dict[str, Any]] = []
    ep_stats: list[dict[str, Any]] = []
    all_values: dict[str, list[np.ndarray]] = {}
    columns: dict[str, list[np.ndarray]] = {}
    videos: dict[str, _VideoWriter] = {}
    file_index, file_episodes, file_frames, index = 0, 0, 0, 0

    def flush_file() -> None:
        nonlocal columns, videos, file_index, file_episodes, file_frames
        if not columns:
            return
        path = tmp / V3_DATA_PATH.format(
            chunk_index=file_index // CHUNKS_SIZE, file_index=file_index % CHUNKS_SIZE
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_table(columns, features), path)
        for w in videos.values():
            w.close()
        columns, videos = {}, {}
        file_index += 1
        file_episodes = file_frames = 0

    n_eps = 0
    for ep_index, ep in enumerate(episodes):
        obs, acts, rews = episode_arrays(ep)
        T = len(acts)
        text = instruction_text(ep) or task
        task_index = tasks.setdefault(text, len(tasks))
        obs = obs if isinstance(obs, dict) else {"state": obs}
        frames: dict[str, np.ndarray] = {}
        for name, (key, _) in features.items():
            if key is not None:
                frames[name] = np.asarray(obs[key][:T])
        done = np.zeros(T, bool)
        done[-1] = True
        trunc = np.zeros(T, bool)
        trunc[-1] = not ep.is_terminated
        frames.update(
            {
                "action": acts.astype(features["action"][1]["dtype"]),
                "next.reward": rews.astype(np.float32),
                "next.done": done,
                "next.truncated": trunc,
                "timestamp": (np.arange(T) / fps).astype(np.float32),
                "frame_index": np.arange(T, dtype=np.int64),
                "episode_index": np.full(T, ep_index, np.int64),
                "index": np.arange(index, index + T, dtype=np.int64),
                "task_index": np.full(T, task_index, np.int64),
            }
        )
        stats = {}
        for name, values in frames.items():
            is_video = name in video_keys
            stats[name] = _stats(values, image=is_video)
            if is_video:
                all_values.setdefault(name, []).append(values[:: max(1, T // 8)])
            else:
                all_values.setdefault(name, []).append(values)
        ep_stats.append({"episode_index": ep_index, "stats": stats})
        row: dict[str, Any] = {"episode_index": ep_index, "tasks": [text], "length": T}
        if version == "v3.0":
            chunk, fidx = file_index // CHUNKS_SIZE, file_index % CHUNKS_SIZE
            row.update(
                {
                    "data/chunk_index": chunk,
                    "data/file_index": fidx,
                    "dataset_from_index": index,
                    "dataset_to_index": index + T,
                }
            )
            for name in video_keys:
                if name not in videos:
                    path = tmp / V3_VIDEO_PATH.format(
                        video_key=name, chunk_index=chunk, file_index=fidx
                    )
                    videos[name] = _VideoWriter(path, fps, features[name][1]["shape"], codec)
                start = videos[name].n
                videos[name].add(frames[name])
                row.update(
                    {
                        f"videos/{name}/chunk_index": chunk,
                        f"videos/{name}/file_index": fidx,
                        f"videos/{name}/from_timestamp": start / fps,
                        f"videos/{name}/to_timestamp": (start + T) / fps,
                    }
                )
            row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
            for name, values in frames.items():
                if name not in video_keys:
                    columns.setdefault(name, []).append(values)
            file_episodes += 1
            file_frames += T
            if file_episodes == EPISODES_PER_FILE:
                flush_file()
        else:
            chunk = ep_index // CHUNKS_SIZE
            path = tmp / V21_DATA_PATH.format(episode_chunk=chunk, episode_index=ep_index)
            path.parent.mkdir(parents=True, exist_ok=True)
            cols = {n: [v] for n, v in frames.items() if n not in video_keys}
            pq.write_table(_table(cols, features), path)
            for name in video_keys:
                vpath = tmp / V21_VIDEO_PATH.format(
                    episode_chunk=chunk, video_key=name, episode_index=ep_index
                )
                w = _VideoWriter(vpath, fps, features[name][1]["shape"], codec)
                w.add(frames[name])
                w.close()
        episode_rows.append(row)
        index += T
        n_eps += 1
    if n_eps == 0:
        for w in videos.values():
            w.close()
        shutil.rmtree(tmp)
        raise DataError("write_lerobot: no episodes to write")
    flush_file()
    _write_meta(
        tmp,
        version,
        features,
        video_keys,
        tasks,
        episode_rows,
        ep_stats,
        all_values,
        fps=fps,
        robot_type=robot_type,
        total_frames=index,
        meta=meta,
    )
    return replace_dir(tmp, out)


def _write_meta(
    root: Path,
    version: str,
    features: dict,
    video_keys: list[str],
    tasks: dict[str, int],
    episode_rows: list[dict],
    ep_stats: list[dict],
    all_values: dict[str, list[np.ndarray]],
    *,
    fps: int,
    robot_type: str | None,
    total_frames: int,
    meta: dict[str, Any] | None,
) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "meta").mkdir(parents=True, exist_ok=True)
    n_eps = len(episode_rows)
    info: dict[str, Any] = {
        "codebase_version": version,
        "robot_type": robot_type,
        "total_episodes": n_eps,
        "total_frames": total_frames,
        "total_tasks": len(tasks),
        "chunks_size": CHUNKS_SIZE,
        "fps": fps,
        "splits": {"train": f"0:{n_eps}"},
        "features": {name: spec for name, (_, spec) in features.items()},
    }
    if version == "v3.0":
        info.update(
            data_files_size_in_mb=100,
            video_files_size_in_mb=500,
            data_path=V3_DATA_PATH,
            video_path=V3_VIDEO_PATH if video_keys else None,
        )
        # tasks.parquet: the task strings as the index, a task_index column (as pandas writes it)
        frame = pd.DataFrame(
            {"task_index": list(tasks.values())}, index=pd.Index(list(tasks), name="task")
        )
        frame.to_parquet(root / "meta" / "tasks.parquet")
        epath = root / V3_EPISODES_PATH.format(chunk_index=0, file_index=0)
        epath.parent.mkdir(parents=True, exist_ok=True)
        cols = {k: [r[k] for r in episode_rows] for k in episode_rows[0]}
        cols["tasks"] = pa.array(cols["tasks"], type=pa.list_(pa.string()))
        pq.write_table(pa.table(cols), epath)
    else:
        info.update(
            total_chunks=(n_eps - 1) // CHUNKS_SIZE + 1,
            total_videos=n_eps * len(video_keys),
            data_path=V21_DATA_PATH,
            video_path=V21_VIDEO_PATH if video_keys else None,
        )
        _write_jsonl(
            root / "meta" / "tasks.jsonl", [{"task_index": i, "task": t} for t, i in tasks.items()]
        )
        _write_jsonl(root / "meta" / "episodes.jsonl", episode_rows)
        _write_jsonl(root / "meta" / "episodes_stats.jsonl", ep_stats)
    if meta:
        info["vla_ray"] = json.loads(json.dumps(meta, default=str))
    (root / INFO_PATH).write_text(json.dumps(info, indent=4))
    stats = {
        name: _stats(np.concatenate(parts), image=name in video_keys)
        for name, parts in all_values.items()
    }
    (root / STATS_PATH).write_text(json.dumps(stats, indent=4))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- reading
def is_lerobot(path: Path) -> bool:
    return (path / INFO_PATH).is_file()


def load_info(root: str | os.PathLike) -> dict[str, Any]:
    """``meta/info.json`` checked: a known ``codebase_version``, fps and features with ``action``."""
    path = Path(root) / INFO_PATH
    if not path.is_file():
        raise DataError(f"data: {path} does not exist (not a LeRobotDataset folder)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
    version = info.get("codebase_version")
    if version not in VERSIONS:
        raise DataError(
            f"{path}: codebase_version {version!r} is not supported (supported: "
            f"{', '.join(VERSIONS)}); convert it with lerobot's conversion scripts"
        )
    for key in ("fps", "features", "data_path"):
        if key not in info:
            raise DataError(f"{path}: field {key!r} missing")
    if "action" not in info["features"]:
        raise DataError(f"{path}: features have no 'action' (given: {sorted(info['features'])})")
    return info


def load_stats(root: str | os.PathLike, info: dict[str, Any]) -> dict[str, Any] | None:
    """``meta/stats.json`` (None when absent), checked against the feature shapes."""
    path = Path(root) / STATS_PATH
    if not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
    for name, spec in info["features"].items():
        mean = (stats.get(name) or {}).get("mean")
        if mean is None or spec["dtype"] in ("video", "image"):
            continue
        if int(np.asarray(mean).size) != int(np.prod(spec["shape"])):
            raise DataError(
                f"{path}: stats of {name!r} have {np.asarray(mean).size} values, "
                f"info.json gives shape {spec['shape']}"
            )
    return stats


def _tasks(root: Path, version: str) -> dict[int, str]:
    if version == "v3.0":
        import pyarrow.parquet as pq

        path = root / "meta" / "tasks.parquet"
        try:
            table = pq.read_table(path)
        except Exception as err:
            raise DataError(f"{path}: cannot read tasks ({err})") from err
        names = table.column_names
        text_col = "task" if "task" in names else "__index_level_0__"
        if text_col not in names or "task_index" not in names:
            raise DataError(f"{path}: expected columns 'task' and 'task_index', found {names}")
        return dict(
            zip(
                table.column("task_index").to_pylist(),
                table.column(text_col).to_pylist(),
                strict=True,
            )
        )
    rows = _read_jsonl(root / "meta" / "tasks.jsonl")
    return {int(r["task_index"]): r["task"] for r in rows}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"data: {path} does not exist")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON lines ({err})") from err


def episode_refs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """One self-contained reference per episode (files, row range, video offsets, task text)."""
    root = Path(path)
    info = load_info(root)
    load_stats(root, info)
    version = info["codebase_version"]
    tasks = _tasks(root, version)
    video_keys = [n for n, s in info["features"].items() if s["dtype"] == "video"]
    refs = []
    if version == "v3.0":
        import pyarrow.parquet as pq

        files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise DataError(f"{root / 'meta' / 'episodes'}: no episode metadata parquet files")
        for f in files:
            try:
                rows = pq.read_table(f).to_pylist()
            except Exception as err:
                raise DataError(f"{f}: cannot read episode metadata ({err})") from err
            for r in rows:
                ref = dict(
                    episode_index=int(r["episode_index"]),
                    length=int(r["length"]),
                    data=info["data_path"].format(
                        chunk_index=r["data/chunk_index"], file_index=r["data/file_index"]
                    ),
                    videos={
                        k: (
                            info["video_path"].format(
                                video_key=k,
                                chunk_index=r[f"videos/{k}/chunk_index"],
                                file_index=r[f"videos/{k}/file_index"],
                            ),
                            float(r[f"videos/{k}/from_timestamp"]),
                        )
                        for k in video_keys
                    },
                    task=(r.get("tasks") or [None])[0],
                )
                refs.append(ref)
    else:
        chunks = int(info.get("chunks_size", CHUNKS_SIZE))
        for r in _read_jsonl(root / "meta" / "episodes.jsonl"):
            i = int(r["episode_index"])
            refs.append(
                dict(
                    episode_index=i,
                    length=int(r["length"]),
                    data=info["data_path"].format(episode_chunk=i // chunks, episode_index=i),
                    videos={
                        k: (
                            info["video_path"].format(
                                episode_chunk=i // chunks, video_key=k, episode_index=i
                            ),
                            0.0,
                        )
                        for k in video_keys
                    },
                    task=(r.get("tasks") or [None])[0],
                )
            )
    for ref in refs:
        ref["root"] = str(root)
        ref["fps"] = float(info["fps"])
        ref["task_table"] = {str(k): v for k, v in tasks.items()}
    return refs


def _frames_table(path: str) -> Any:
    """The frames parquet (cached per file version: episodes of one file share it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError as err:
        raise DataError(f"data: {path} does not exist") from err
    return _read_frames(path, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=2)
def _read_frames(path: str, mtime_ns: int, size: int) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except FileNotFoundError as err:
        raise DataError(f"data: {path} does not exist") from err
    except Exception as err:
        raise DataError(f"{path}: cannot read frames (truncated or not parquet?): {err}") from err


def _column(table: Any, name: str, source: str) -> np.ndarray:
    import pyarrow as pa

    if name not in table.column_names:
        raise DataError(f"{source}: field {name!r} missing (columns: {table.column_names})")
    col = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return np.stack([np.asarray(x) for x in col.to_pylist()]) if len(col) else np.zeros((0,))
    return col.to_numpy(zero_copy_only=False)


def camera_names(info: dict[str, Any]) -> list[str]:
    """The dataset's cameras (``video``/``image`` features under ``observation.``), in
    ``info.json`` order, by their observation key (``observation.images.top`` -> ``top``); this is
    the order of the ``images`` observation."""
    return [
        name.removeprefix("observation.").removeprefix("images.")
        for name, spec in info["features"].items()
        if name.startswith("observation.") and spec.get("dtype") in ("video", "image")
    ]


def _shaped(values: np.ndarray, n: int, shape: list[int], name: str, source: str) -> np.ndarray:
    """``values`` as ``(n, *shape)``; a DataError naming the field when the sizes differ."""
    per_row = int(np.prod(shape))
    if values.size != n * per_row:
        got = values.shape[1:] if values.ndim > 1 and len(values) == n else values.shape
        raise DataError(
            f"{source}: field {name!r} has shape {tuple(got)} for {n} frames, info.json gives "
            f"{list(shape)} per frame"
        )
    return values.reshape(n, *shape)


def _hwc(spec: dict[str, Any]) -> tuple[int, ...]:
    """A camera feature's (H, W, C) from its info.json shape and names (LeRobot writes
    ``["height", "width", "channels"]``; some converted datasets ``["channels", ...]``)."""
    shape = tuple(int(x) for x in spec["shape"])
    names = spec.get("names") or []
    if len(shape) == 3 and names and names[0] in ("channels", "channel", "c"):
        return (shape[1], shape[2], shape[0])
    return shape


def _check_image_shape(values: np.ndarray, spec: dict, name: str, source: str) -> None:
    want = _hwc(spec)
    if values.shape[1:] != want:
        raise DataError(
            f"{source}: field {name!r} has frames of shape {values.shape[1:]}, info.json gives "
            f"{want} (height, width, channels)"
        )


def _decode_images(table: Any, name: str, spec: dict, root: Path, source: str) -> np.ndarray:
    """An ``image``-dtype column (``datasets.Image`` structs) decoded to uint8 (T, H, W, 3)."""
    import io

    from PIL import Image

    if name not in table.column_names:
        raise DataError(f"{source}: field {name!r} missing (columns: {table.column_names})")
    frames = []
    for row, cell in enumerate(table.column(name).to_pylist()):
        if isinstance(cell, dict):
            data, rel = cell.get("bytes"), cell.get("path")
        else:
            data, rel = cell, None
        try:
            if data is None and rel:
                img = Image.open(root / rel)
            elif data is not None:
                img = Image.open(io.BytesIO(data))
            else:
                raise DataError(f"{source} row {row}: field {name!r} has no image bytes or path")
            frames.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
        except DataError:
            raise
        except Exception as err:  # PIL: truncated or unknown image data, missing file
            raise DataError(
                f"{source} row {row}: field {name!r} is not a readable image ({err})"
            ) from err
        if frames[-1].shape != frames[0].shape:
            raise DataError(
                f"{source} row {row}: field {name!r} has an image of shape {frames[-1].shape}, "
                f"row 0 has {frames[0].shape}"
            )
    values = np.stack(frames) if frames else np.zeros((0, *_hwc(spec)), np.uint8)
    _check_image_shape(values, spec, name, source)
    return values


HUB_PREFIX = "hf://"


def is_hub_id(spec: str | os.PathLike) -> bool:
    return str(spec).startswith(HUB_PREFIX)


def resolve_hub(spec: str | os.PathLike) -> Path:
    """The local folder of a Hub dataset ``hf://<repo_id>[@<revision>]`` (the Hugging Face cache's
    snapshot, downloaded when online; only the cache when ``HF_HUB_OFFLINE`` is set)."""
    from huggingface_hub import constants, snapshot_download

    repo, _, revision = str(spec).removeprefix(HUB_PREFIX).partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise DataError(f"data: {spec!r}: expected hf://<org>/<name>[@<revision>]")
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    offline = bool(constants.HF_HUB_OFFLINE) or flag in ("1", "ON", "YES", "TRUE")
    try:
        folder = snapshot_download(
            repo, repo_type="dataset", revision=revision or None, local_files_only=offline
        )
    except Exception as err:
        where = constants.HF_HUB_CACHE
        if offline:
            raise DataError(
                f"data: LeRobot dataset {repo!r} (revision {revision or 'main'}) is not in the "
                f"Hugging Face cache {where} and HF_HUB_OFFLINE is set; download it on a "
                f"connected machine (huggingface-cli download --repo-type dataset {repo}) or "
                f"give a local folder"
            ) from err
        raise DataError(f"data: cannot get LeRobot dataset {repo!r} from the Hub: {err}") from err
    return Path(folder)


def _decode_video(path: Path, start_s: float, fps: float, n: int, source: str) -> np.ndarray:
    av = require("av", "lerobot")

    if not path.is_file():
        raise DataError(f"{source}: video {path} does not exist")
    start = int(round(start_s * fps))
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if start > 0:
                container.seek(int(start_s / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                idx = int(round(float(frame.pts * stream.time_base) * fps))
                if idx < start:
                    continue
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == n:
                    break
    except av.error.FFmpegError as err:
        raise DataError(f"{source}: cannot decode video {path} (truncated?): {err}") from err
    if len(frames) != n:
        raise DataError(
            f"{source}: video {path} has {len(frames)} frames from {start_s:.3f}s, expected {n} "
            "(truncated file?)"
        )
    return np.stack(frames)


def read_episode(path: str | os.PathLike, ref: dict[str, Any]) -> RawEpisode:
    """One episode's frames and decoded video, mapped to contract keys (see the module doc)."""
    import pyarrow.compute as pc

    root = Path(ref.get("root", path))
    info = load_info(root)
    i, n = int(ref["episode_index"]), int(ref["length"])
    data_path = root / ref["data"]
    source = f"{data_path} episode {i}"
    table = _frames_table(str(data_path))
    if "episode_index" in table.column_names:
        table = table.filter(pc.equal(table.column("episode_index"), i))
    if table.num_rows != n:
        raise DataError(f"{source}: {table.num_rows} frames in the file, metadata says length {n}")
    if "frame_index" in table.column_names:
        order = np.argsort(_column(table, "frame_index", source), kind="stable")
        table = table.take(order)
    features = info["features"]
    obs: dict[str, np.ndarray] = {}
    cameras = camera_names(info)
    for name, spec in features.items():
        if not name.startswith("observation."):
            continue
        key = name.removeprefix("observation.").removeprefix("images.")
        if spec["dtype"] == "video":
            vpath, start = ref["videos"][name]
            values = _decode_video(root / vpath, start, float(info["fps"]), n, source)
            _check_image_shape(values, spec, name, source)
        elif spec["dtype"] == "image":
            values = _decode_images(table, name, spec, root, source)
        else:
            values = _shaped(_column(table, name, source), n, spec["shape"], name, source)
        obs[key] = values
    if len(cameras) == 1:
        obs["image"] = obs[cameras[0]]
    elif len(cameras) > 1:
        shapes = {obs[c].shape[1:] for c in cameras}
        if len(shapes) == 1:  # cameras of different sizes: only by name
            obs["images"] = np.stack([obs[c] for c in cameras], axis=1)
    obs = {k: np.concatenate([v, v[-1:]]) for k, v in obs.items()}  # final obs: see module doc
    actions = _shaped(
        _column(table, "action", source), n, features["action"]["shape"], "action", source
    )
    names = table.column_names
    rewards = (
        _column(table, "next.reward", source).reshape(n) if "next.reward" in names else np.zeros(n)
    )
    done = (
        bool(_column(table, "next.done", source).reshape(n)[-1]) if "next.done" in names else False
    )
    trunc = (
        bool(_column(table, "next.truncated", source).reshape(n)[-1])
        if "next.truncated" in names
        else not done
    )
    text = ref.get("task")
    if text is None and "task_index" in names:
        text = ref["task_table"].get(str(int(_column(table, "task_index", source)[0])))
    return RawEpisode(
        observations=obs,
        actions=actions,
        rewards=rewards,
        terminated=done and not trunc,
        truncated=trunc or not done,
        instruction=text,
        source=source,
    )
