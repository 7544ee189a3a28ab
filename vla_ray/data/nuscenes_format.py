"""nuScenes (v1.0 table layout) read from its JSON tables, without ``nuscenes-devkit``.

A database is ``<dataroot>/<version>/`` (``v1.0-mini``, ``v1.0-trainval``) holding the tables
``scene``, ``sample``, ``sample_data``, ``ego_pose``, ``calibrated_sensor`` and ``sensor`` (JSON
lists of records linked by tokens; others are not read), with the files that ``sample_data``
names (``samples/CAM_FRONT/...jpg``) under ``<dataroot>``. ``--data`` takes the version folder.

One episode per scene, one step per key-frame sample (2 Hz), in ``first_sample_token`` /
``next`` order:

- observations: the six cameras' key-frame images (``CAM_FRONT``, ``CAM_FRONT_RIGHT``,
  ``CAM_FRONT_LEFT``, ``CAM_BACK``, ``CAM_BACK_LEFT``, ``CAM_BACK_RIGHT``; each by channel name
  and together as ``images`` (T, 6, H, W, 3) in that order when of one size), and ``state``:
  the ego speed (m/s) and yaw rate (rad/s) from the previous sample's ego pose (0 at the first);
- action: the next ``HORIZON`` (6, i.e. 3 s) ego positions in the current ego frame (x forward,
  y left, metres), flattened to (2 * HORIZON,); a step needs all of them, so an episode has
  ``samples - HORIZON`` steps;
- instruction: the high-level command of the episode's first step from its route: ``turn
  left`` / ``turn right`` when the last future waypoint lies more than ``TURN_M`` (2 m) to the
  side, else ``go straight`` (the convention of driving planners such as ST-P3 / UniAD).

- ``lidar`` (T, ``LIDAR_POINTS``, 4): the key-frame ``LIDAR_TOP`` sweep of each sample
  (``.pcd.bin``: float32 x, y, z, intensity, ring index per point, nuScenes' binary layout) as
  x, y, z, intensity in the ego frame (the sensor's ``calibrated_sensor`` pose applied; the ring
  index dropped); a sweep of more points keeps an evenly strided ``LIDAR_POINTS`` of them, one of
  fewer is padded with zeros, and ``lidar_mask`` (T, ``LIDAR_POINTS``) is 1 on real points. The
  points the vla-ray ``lidar`` sensor reads (``vla_ray.models.sensors``). Only key frames: the
  sweeps between samples (20 Hz) are not accumulated.

Tested on: a synthetic database written in tests in the v1.0 table layout (one scene with eight
samples, six tiny JPEG cameras and LiDAR sweeps); not on the real nuScenes mini split (no
download here).
"""

from __future__ import annotations

import io
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from vla_ray.data.contract import RawEpisode
from vla_ray.data.rllib_format import DataError

FORMAT = "nuscenes"
TABLES = ("scene", "sample", "sample_data", "ego_pose", "calibrated_sensor", "sensor")
CAMERAS = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_FRONT_LEFT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)
HORIZON = 6
TURN_M = 2.0
LIDAR = "LIDAR_TOP"
LIDAR_POINTS = 256  # points per sweep kept (the lidar sensor's default ``points``)
PCD_FIELDS = 5  # float32 per point in a .pcd.bin: x, y, z, intensity, ring index


def is_nuscenes(path: Path) -> bool:
    return path.is_dir() and (path / "scene.json").is_file() and (path / "sample.json").is_file()


@lru_cache(maxsize=2)
def _tables(root: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Every needed table as ``{token: record}``; a DataError naming a missing/bad table."""
    out = {}
    for name in TABLES:
        path = Path(root) / f"{name}.json"
        if not path.is_file():
            raise DataError(f"{root}: table {name}.json missing (nuScenes v1.0 layout)")
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(rows, list) or any("token" not in r for r in rows):
            raise DataError(f"{path}: expected a list of records with a 'token'")
        out[name] = {r["token"]: r for r in rows}
    return out


def episode_refs(path: str | os.PathLike) -> list[dict[str, Any]]:
    root = Path(path)
    tables = _tables(str(root.resolve()))
    scenes = sorted(tables["scene"].values(), key=lambda s: s.get("name", s["token"]))
    return [
        {"root": str(root.resolve()), "scene": s["token"], "index": i} for i, s in enumerate(scenes)
    ]


def _get(tables: dict, table: str, token: str, where: str, field: str) -> dict[str, Any]:
    row = tables[table].get(token)
    if row is None:
        raise DataError(
            f"{where}: field {field!r} names {table} token {token!r}, not in {table}.json"
        )
    return row


def _yaw(q: list[float]) -> float:
    w, x, y, z = q
    return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))


def _image(path: Path, where: str) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise DataError(f"{where}: file {path} does not exist")
    try:
        return np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"), np.uint8)
    except Exception as err:
        raise DataError(f"{where}: {path} is not a readable image ({err})") from err


def _rotation(q: list[float]) -> np.ndarray:
    """3x3 rotation of a unit quaternion (w, x, y, z)."""
    w, x, y, z = np.asarray(q, float) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def read_sweep(path: Path, where: str) -> np.ndarray:
    """A ``.pcd.bin`` sweep as (N, 5) float32; ``DataError`` for a missing or truncated file
    (size not whole points) or non-finite values."""
    if not path.is_file():
        raise DataError(f"{where}: file {path} does not exist")
    raw = path.read_bytes()
    width = 4 * PCD_FIELDS
    if len(raw) % width:
        raise DataError(
            f"{where}: {path} has {len(raw)} bytes, not whole points of {PCD_FIELDS} float32 "
            f"(x, y, z, intensity, ring; {width} bytes each): truncated?"
        )
    points = np.frombuffer(raw, np.float32).reshape(-1, PCD_FIELDS)
    if not np.all(np.isfinite(points)):
        raise DataError(f"{where}: {path} holds non-finite point values")
    return points


def lidar_points(
    points: np.ndarray, calibration: dict[str, Any], size: int = LIDAR_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """A sweep (N, 5) in the sensor frame -> (size, 4) x, y, z, intensity in the ego frame and
    its mask (size,) (1 on real points; evenly strided when N > size, zero-padded when less)."""
    if len(points) > size:
        points = points[np.linspace(0, len(points) - 1, size).round().astype(int)]
    rot = _rotation(calibration["rotation"])
    xyz = points[:, :3] @ rot.T + np.asarray(calibration["translation"], float)
    out = np.zeros((size, 4), np.float32)
    mask = np.zeros(size, np.float32)
    out[: len(points), :3], out[: len(points), 3] = xyz, points[:, 3]
    mask[: len(points)] = 1.0
    return out, mask


def command(waypoints: np.ndarray) -> str:
    """The high-level command of a (H, 2) future route in the ego frame (y left)."""
    y = float(waypoints[-1, 1])
    return "turn left" if y > TURN_M else "turn right" if y < -TURN_M else "go straight"


def read_episode(path: str | os.PathLike, ref: dict[str, Any]) -> RawEpisode:
    root = Path(ref["root"])
    tables = _tables(str(root))
    scene = _get(tables, "scene", ref["scene"], f"{root / 'scene.json'}", "token")
    source = f"{root} scene {scene.get('name', scene['token'])} (episode {ref['index']})"
    # key-frame sample_data of each sample by channel
    channel = {
        cs["token"]: _get(tables, "sensor", cs["sensor_token"], source, "sensor_token")["channel"]
        for cs in tables["calibrated_sensor"].values()
    }
    by_sample: dict[str, dict[str, dict]] = {}
    for sd in tables["sample_data"].values():
        if sd.get("is_key_frame"):
            ch = channel.get(sd["calibrated_sensor_token"])
            if ch is None:
                raise DataError(
                    f"{source}: sample_data {sd['token']} field 'calibrated_sensor_token' is not "
                    "in calibrated_sensor.json"
                )
            by_sample.setdefault(sd["sample_token"], {})[ch] = sd
    samples, token = [], scene["first_sample_token"]
    while token:
        sample = _get(tables, "sample", token, source, "next")
        samples.append(sample)
        token = sample.get("next") or ""
    if len(samples) <= HORIZON:
        raise DataError(f"{source}: {len(samples)} samples, a step needs {HORIZON} future ones")
    images: dict[str, list[np.ndarray]] = {c: [] for c in CAMERAS}
    poses, times, lidar, lidar_mask = [], [], [], []
    for i, sample in enumerate(samples):
        where = f"{source} sample {i} ({sample['token']})"
        data = by_sample.get(sample["token"], {})
        for cam in CAMERAS:
            if cam not in data:
                raise DataError(f"{where}: no key-frame sample_data for camera {cam}")
            images[cam].append(_image(root.parent / data[cam]["filename"], f"{where} {cam}"))
        if LIDAR not in data:
            raise DataError(f"{where}: no key-frame sample_data for {LIDAR}")
        sweep = read_sweep(root.parent / data[LIDAR]["filename"], f"{where} {LIDAR}")
        calib = tables["calibrated_sensor"][data[LIDAR]["calibrated_sensor_token"]]
        t, q = calib.get("translation"), calib.get("rotation")
        if not (
            isinstance(t, list)
            and isinstance(q, list)
            and len(t) == 3
            and len(q) == 4
            and np.all(np.isfinite([*t, *q]))
            and np.linalg.norm(q) > 0
        ):
            raise DataError(
                f"{where}: calibrated_sensor {calib['token']} fields 'translation'/'rotation' "
                f"must be 3 and 4 finite numbers (a non-zero quaternion), got {t} / {q}"
            )
        points, mask = lidar_points(sweep, calib)
        lidar.append(points)
        lidar_mask.append(mask)
        pose = _get(
            tables, "ego_pose", data["CAM_FRONT"]["ego_pose_token"], where, "ego_pose_token"
        )
        xyz, q = np.asarray(pose["translation"], float), pose["rotation"]
        if xyz.shape != (3,) or len(q) != 4 or not np.all(np.isfinite([*xyz, *q])):
            raise DataError(
                f"{where}: ego_pose {pose['token']} fields 'translation'/'rotation' must be 3 "
                f"and 4 finite numbers, got {pose['translation']} / {q}"
            )
        poses.append((xyz[:2], _yaw(q)))
        times.append(float(sample["timestamp"]) * 1e-6)
    n = len(samples) - HORIZON
    waypoints, state = [], []
    for t in range(len(samples)):
        (p, yaw) = poses[t]
        c, s = np.cos(-yaw), np.sin(-yaw)
        rot = np.array([[c, -s], [s, c]])
        if t < n:
            future = np.stack([poses[t + k][0] for k in range(1, HORIZON + 1)]) - p
            waypoints.append((future @ rot.T).astype(np.float32))
        if t == 0:
            state.append([0.0, 0.0])
        else:
            dt = max(times[t] - times[t - 1], 1e-3)
            speed = float(np.linalg.norm(p - poses[t - 1][0])) / dt
            dyaw = (yaw - poses[t - 1][1] + np.pi) % (2 * np.pi) - np.pi
            state.append([speed, dyaw / dt])
    obs: dict[str, np.ndarray] = {c: np.stack(images[c][: n + 1]) for c in CAMERAS}
    if len({obs[c].shape for c in CAMERAS}) == 1:
        obs["images"] = np.stack([obs[c] for c in CAMERAS], axis=1)
    obs["state"] = np.asarray(state[: n + 1], np.float32)
    obs["lidar"] = np.stack(lidar[: n + 1])
    obs["lidar_mask"] = np.stack(lidar_mask[: n + 1])
    return RawEpisode(
        observations=obs,
        actions=np.stack(waypoints).reshape(n, -1),
        rewards=np.zeros(n),
        terminated=False,
        truncated=True,
        instruction=command(waypoints[0]),
        source=source,
    )
