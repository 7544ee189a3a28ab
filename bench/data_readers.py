"""Benchmark: frames/s of each dataset reader (in-process ``read_episode``, the unit of work of
``ray.data``'s conversion), on synthetic data of one size, with LeRobot's video decoding timed
separately.

Datasets (``--episodes`` x ``--steps``, ``--size`` px RGB, state 8, action 7), built in a temp dir:
LeRobotDataset v3.0 with one mp4 camera (lossless H.264 RGB, vla-ray's default) and with AV1
(LeRobot's default), LeRobotDataset v3.0 with two ``image``-dtype PNG cameras in the parquet,
RLDS shards with one PNG and one JPEG camera, and (with ``rosbags``) ROS 2 bags at 30 Hz camera /
50 Hz joints / 10 Hz commands read at 10 Hz (frames/s counts the 10 Hz output ticks), and a
nuScenes v1.0 database at the real sensor sizes (``--nuscenes-scenes`` scenes of 20 key-frame
samples: six 1600x900 JPEG cameras and a 34,720-point LiDAR sweep each; frames/s counts steps,
i.e. samples with 3 s of future waypoints).

    python bench/data_readers.py --out docs/bench
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's vla_ray


def _episodes(n: int, steps: int, size: int) -> tuple[list[Any], Any, Any]:
    from gymnasium import spaces
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    obs_space = spaces.Dict(
        {
            "image": spaces.Box(0, 255, (size, size, 3), np.uint8),
            "state": spaces.Box(-np.inf, np.inf, (8,), np.float32),
        }
    )
    act_space = spaces.Box(-1, 1, (7,), np.float32)
    rng = np.random.default_rng(0)
    eps = []
    for i in range(n):
        # smooth images (a moving gradient): compressible like camera frames, unlike noise
        yy, xx = np.mgrid[:size, :size]
        obs = [
            {
                "image": np.stack(
                    [(xx + t) % 256, (yy + 2 * t) % 256, (xx + yy + i) % 256], -1
                ).astype(np.uint8),
                "state": rng.normal(size=8).astype(np.float32),
            }
            for t in range(steps + 1)
        ]
        ep = SingleAgentEpisode(
            observations=obs,
            actions=[rng.uniform(-1, 1, 7).astype(np.float32) for _ in range(steps)],
            rewards=[0.0] * steps,
            terminated=True,
            observation_space=obs_space,
            action_space=act_space,
            len_lookback_buffer=0,
        )
        eps.append(ep.to_numpy())
    return eps, obs_space, act_space


def _encode(img: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def build_image_lerobot(root: Path, eps: list[Any]) -> Path:
    """v3.0 with two image-dtype cameras (PNG in the parquet), from a video dataset's metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vla_ray.data.contract import episode_arrays

    info = json.loads((root / "meta" / "info.json").read_text())
    spec = dict(info["features"].pop("observation.image"))
    spec = {"dtype": "image", "shape": spec["shape"], "names": spec["names"]}
    info["features"] = {
        "observation.images.top": spec,
        "observation.images.wrist": dict(spec),
        **info["features"],
    }
    info["video_path"] = None
    data = root / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(data)
    cells = []
    for ep in eps:
        obs, acts, _ = episode_arrays(ep)
        cells += [{"bytes": _encode(x, "PNG"), "path": None} for x in obs["image"][: len(acts)]]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    column = pa.array(cells, type=struct)
    table = table.append_column("observation.images.top", column)
    table = table.append_column("observation.images.wrist", column)
    pq.write_table(table, data)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    import shutil

    shutil.rmtree(root / "videos")
    return root


def build_rlds(root: Path, eps: list[Any]) -> Path:
    from vla_ray.data.contract import episode_arrays
    from vla_ray.data.tfrecord import make_example, write_records

    root.mkdir(parents=True)
    recs, size = [], None
    for ep in eps:
        obs, acts, rews = episode_arrays(ep)
        T = len(acts)
        size = obs["image"].shape[1]
        recs.append(
            make_example(
                {
                    "steps/observation/image_0": [_encode(x, "PNG") for x in obs["image"][:T]],
                    "steps/observation/image_1": [_encode(x, "JPEG") for x in obs["image"][:T]],
                    "steps/observation/state": obs["state"][:T].reshape(-1).tolist(),
                    "steps/action": acts.reshape(-1).tolist(),
                    "steps/language_instruction": [b"pick up the cube"] * T,
                    "steps/is_terminal": [0] * (T - 1) + [1],
                }
            )
        )
    write_records(root / "bench-train.tfrecord-00000-of-00001", recs)

    def d(f: dict) -> dict:
        return {"featuresDict": {"features": f}}

    def img(fmt: str) -> dict:
        return {
            "image": {
                "shape": {"dimensions": [str(size), str(size), "3"]},
                "dtype": "uint8",
                "encodingFormat": fmt,
            }
        }

    def tensor(shape: list[int], dtype: str) -> dict:
        return {"tensor": {"shape": {"dimensions": [str(x) for x in shape]}, "dtype": dtype}}

    step = {
        "observation": d(
            {"image_0": img("png"), "image_1": img("jpeg"), "state": tensor([8], "float32")}
        ),
        "action": tensor([7], "float32"),
        "language_instruction": {"text": {}},
        "is_terminal": {"tensor": {"shape": {}, "dtype": "bool"}},
    }
    features = d({"steps": {"sequence": {"feature": d(step), "length": "-1"}}})
    (root / "features.json").write_text(json.dumps(features))
    info = {"name": "bench", "version": "1.0.0", "splits": [{"name": "train"}]}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


def build_rosbags(folder: Path, n: int, seconds: float, size: int) -> Path | None:
    try:
        from rosbags.rosbag2 import Writer
        from rosbags.typesys import Stores, get_typestore
    except ImportError:
        return None
    ts = get_typestore(Stores.ROS2_HUMBLE)
    T = ts.types
    header = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](0, 0), frame_id="")
    yy, xx = np.mgrid[:size, :size]
    bags = []
    for b in range(n):
        path = folder / f"bag{b}"
        with Writer(path, version=9) as w:
            cam = w.add_connection("/cam", "sensor_msgs/msg/Image", typestore=ts)
            js = w.add_connection("/joints", "sensor_msgs/msg/JointState", typestore=ts)
            cmd = w.add_connection("/cmd", "std_msgs/msg/Float32MultiArray", typestore=ts)
            msgs = []
            for t in np.arange(0, seconds, 1 / 30):
                img = np.stack([(xx + int(t * 30)) % 256, yy, xx], -1).astype(np.uint8)
                m = T["sensor_msgs/msg/Image"](header, size, size, "rgb8", 0, size * 3, img.ravel())
                msgs.append((t, cam, m, "sensor_msgs/msg/Image"))
            for t in np.arange(0, seconds, 1 / 50):
                z = np.zeros(8)
                m = T["sensor_msgs/msg/JointState"](header, [str(i) for i in range(8)], z + t, z, z)
                msgs.append((t, js, m, "sensor_msgs/msg/JointState"))
            layout = T["std_msgs/msg/MultiArrayLayout"]([], 0)
            for t in np.arange(0, seconds, 1 / 10):
                m = T["std_msgs/msg/Float32MultiArray"](layout, np.full(7, t, np.float32))
                msgs.append((t, cmd, m, "std_msgs/msg/Float32MultiArray"))
            for t, conn, m, kind in sorted(msgs, key=lambda x: x[0]):
                w.write(conn, int(t * 1e9), ts.serialize_cdr(m, kind))
        bags.append(path.name)
    spec = {
        "format": "rosbag",
        "bags": bags,
        "rate": 10,
        "observations": {
            "image": "/cam",
            "state": {"topic": "/joints", "fields": ["position"]},
        },
        "action": {"topic": "/cmd"},
    }
    (folder / "topics.json").write_text(json.dumps(spec))
    return folder / "topics.json"


def build_nuscenes(
    dataroot: Path, scenes: int, samples: int, width: int, height: int, points: int
) -> Path:
    """A nuScenes v1.0 database (tables + ``samples/`` files) at the real sensor sizes: six
    ``width`` x ``height`` JPEG cameras and a ``points``-point ``LIDAR_TOP`` sweep per key-frame
    sample (2 Hz), each scene driving straight at 5 m/s."""
    from vla_ray.data import nuscenes_format as nu

    version = dataroot / "v1.0-bench"
    version.mkdir(parents=True)
    channels = [*nu.CAMERAS, nu.LIDAR]
    sensors = [
        {"token": f"s-{c}", "channel": c, "modality": "lidar" if c == nu.LIDAR else "camera"}
        for c in channels
    ]
    calib = [
        {
            "token": f"c-{c}",
            "sensor_token": f"s-{c}",
            "translation": [1.0, 0.0, 1.8],
            "rotation": [1.0, 0.0, 0.0, 0.0],
            "camera_intrinsic": []
            if c == nu.LIDAR
            else [[1266, 0, 816], [0, 1266, 491], [0, 0, 1]],
        }
        for c in channels
    ]
    rng = np.random.default_rng(0)
    # one camera picture and one sweep reused (the reader decodes every file it is given)
    base = rng.integers(0, 255, (-(-height // 8), -(-width // 8), 3), dtype=np.uint8)
    picture = np.kron(base, np.ones((8, 8, 1), np.uint8))[:height, :width]
    jpeg = _encode(picture, "JPEG")
    cloud = rng.normal(0, 20, (points, 5)).astype(np.float32).tobytes()
    tables: dict[str, list[dict[str, Any]]] = {k: [] for k in ("scene", "sample", "sample_data")}
    tables["ego_pose"] = []
    for s in range(scenes):
        for i in range(samples):
            stamp = 1_532_402_927_647_951 + s * 10**9 + i * 500_000
            tok = f"sample{s}-{i}"
            tables["sample"].append(
                {
                    "token": tok,
                    "timestamp": stamp,
                    "prev": f"sample{s}-{i - 1}" if i else "",
                    "next": f"sample{s}-{i + 1}" if i < samples - 1 else "",
                    "scene_token": f"scene{s}",
                }
            )
            tables["ego_pose"].append(
                {
                    "token": f"pose{s}-{i}",
                    "timestamp": stamp,
                    "rotation": [1.0, 0.0, 0.0, 0.0],
                    "translation": [2.5 * i, 0.0, 0.0],
                }
            )
            for c in channels:
                lidar = c == nu.LIDAR
                name = f"samples/{c}/n015-2018-07-24-11-22-45+0800__{c}__{stamp}"
                path = dataroot / (name + (".pcd.bin" if lidar else ".jpg"))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(cloud if lidar else jpeg)
                tables["sample_data"].append(
                    {
                        "token": f"sd-{c}-{s}-{i}",
                        "sample_token": tok,
                        "ego_pose_token": f"pose{s}-{i}",
                        "calibrated_sensor_token": f"c-{c}",
                        "timestamp": stamp,
                        "fileformat": "pcd" if lidar else "jpg",
                        "is_key_frame": True,
                        "height": 0 if lidar else height,
                        "width": 0 if lidar else width,
                        "filename": str(path.relative_to(dataroot)),
                        "prev": "",
                        "next": "",
                    }
                )
        tables["scene"].append(
            {
                "token": f"scene{s}",
                "log_token": "log0",
                "nbr_samples": samples,
                "first_sample_token": f"sample{s}-0",
                "last_sample_token": f"sample{s}-{samples - 1}",
                "name": f"scene-{s:04d}",
                "description": "straight, synthetic",
            }
        )
    tables["calibrated_sensor"] = calib
    tables["sensor"] = sensors
    tables["log"] = [{"token": "log0", "location": "boston-seaport", "vehicle": "n015"}]
    for name, rows in tables.items():
        (version / f"{name}.json").write_text(json.dumps(rows))
    return version


def time_reader(name: str, module: Any, path: Path, repeats: int) -> dict[str, Any]:
    """Frames/s of reading every episode ``repeats`` times (best pass), and the decode share."""
    from vla_ray.data import lerobot_format

    refs = module.episode_refs(path)
    decode = [0.0]
    original = lerobot_format._decode_video

    def timed(*args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return original(*args, **kw)
        finally:
            decode[0] += time.perf_counter() - t

    lerobot_format._decode_video = timed
    best, best_decode, frames = None, 0.0, 0
    try:
        for _ in range(repeats):
            decode[0] = 0.0
            lerobot_format._read_frames.cache_clear()
            t0 = time.perf_counter()
            frames = sum(len(module.read_episode(path, r).actions) for r in refs)
            dt = time.perf_counter() - t0
            if best is None or dt < best:
                best, best_decode = dt, decode[0]
    finally:
        lerobot_format._decode_video = original
    row = {
        "reader": name,
        "episodes": len(refs),
        "frames": frames,
        "seconds": round(best, 3),
        "frames_per_s": round(frames / best, 1),
    }
    if best_decode:
        row["video_decode_s"] = round(best_decode, 3)
        row["frames_per_s_without_video"] = round(frames / max(best - best_decode, 1e-9), 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nuscenes-scenes", type=int, default=2, help="20 samples (10 s) each")
    ap.add_argument(
        "--nuscenes-points", type=int, default=34_720, help="points per LiDAR sweep (nuScenes')"
    )
    ap.add_argument("--out", help="write data_readers.json here")
    args = ap.parse_args()

    from vla_ray.data import lerobot_format, nuscenes_format, rlds_format, rosbag_format
    from vla_ray.data.lerobot_format import write_lerobot

    eps, obs_space, act_space = _episodes(args.episodes, args.steps, args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        kw = dict(observation_space=obs_space, action_space=act_space, fps=10, task="pick")
        for codec in ("libx264rgb", "libsvtav1"):
            path = write_lerobot(eps, tmp / f"lerobot-{codec}", codec=codec, **kw)
            rows.append(
                time_reader(f"lerobot v3.0 mp4 ({codec})", lerobot_format, path, args.repeats)
            )
        path = build_image_lerobot(write_lerobot(eps, tmp / "lerobot-img", **kw), eps)
        rows.append(
            time_reader("lerobot v3.0 2x image dtype (PNG)", lerobot_format, path, args.repeats)
        )
        path = build_rlds(tmp / "rlds" / "bench" / "1.0.0", eps)
        rows.append(time_reader("rlds (PNG + JPEG camera)", rlds_format, path, args.repeats))
        spec = build_rosbags(tmp / "ros", args.episodes, args.steps / 10, args.size)
        if spec is not None:
            rows.append(
                time_reader("rosbag 2 (30 Hz rgb8 -> 10 Hz)", rosbag_format, spec, args.repeats)
            )
        path = build_nuscenes(
            tmp / "nuscenes", args.nuscenes_scenes, 20, 1600, 900, args.nuscenes_points
        )
        rows.append(
            time_reader("nuscenes (6 JPEG 1600x900 + LiDAR)", nuscenes_format, path, args.repeats)
        )
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "settings": vars(args),
        "rows": rows,
    }
    for r in rows:
        extra = (
            f"  (video decode {r['video_decode_s']}s; "
            f"{r['frames_per_s_without_video']} frames/s without)"
            if "video_decode_s" in r
            else ""
        )
        print(f"{r['reader']:<36} {r['frames']:>6} frames  {r['frames_per_s']:>9} frames/s{extra}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "data_readers.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
