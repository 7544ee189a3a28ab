"""nuScenes v1.0 tables: a synthetic database in the published layout (one scene, eight key-frame
samples, six tiny JPEG cameras, the ego driving a left arc), read as one episode of future
waypoints in the ego frame; missing tables, files and bad poses refused by name."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vla_ray.data import DataError
from vla_ray.data import nuscenes_format as nu
from vla_ray.data.convert import detect_format

R, OMEGA, DT, SAMPLES = 20.0, 0.3, 0.5, 8  # a left arc of radius 20 m at 0.3 rad/s, 2 Hz


def _quat(yaw: float) -> list[float]:
    return [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))]


def sweep(i: int) -> np.ndarray:
    """Sample i's LiDAR points (x, y, z, intensity, ring), sensor frame: 3 + i points, and 400
    at sample 1 (more than the reader keeps)."""
    n = 400 if i == 1 else 3 + i
    k = np.arange(n, dtype=np.float32)
    return np.stack([k + 1, 0.5 * k, -k / 10, k % 7, k % 32], axis=1).astype(np.float32)


def write_db(dataroot: Path) -> Path:
    version = dataroot / "v1.0-mini"
    version.mkdir(parents=True)
    sensors = [{"token": f"s-{c}", "channel": c, "modality": "camera"} for c in nu.CAMERAS]
    sensors.append({"token": "s-lidar", "channel": "LIDAR_TOP", "modality": "lidar"})
    calib = [
        {
            "token": f"c-{s['channel']}",
            "sensor_token": s["token"],
            "translation": [1.0, 0.0, 1.5],
            # the LiDAR turned 90 degrees left: its x axis is the ego's y
            "rotation": _quat(np.pi / 2) if s["channel"] == "LIDAR_TOP" else [1.0, 0.0, 0.0, 0.0],
            "camera_intrinsic": [[10, 0, 3], [0, 10, 2], [0, 0, 1]]
            if "CAM" in s["channel"]
            else [],
        }
        for s in sensors
    ]
    samples, sample_data, poses = [], [], []
    for i in range(SAMPLES):
        t = i * DT
        th = OMEGA * t
        stamp = 1_532_402_927_647_951 + int(t * 1e6)
        samples.append(
            {
                "token": f"sample{i}",
                "timestamp": stamp,
                "prev": f"sample{i - 1}" if i else "",
                "next": f"sample{i + 1}" if i < SAMPLES - 1 else "",
                "scene_token": "scene0",
            }
        )
        poses.append(
            {
                "token": f"pose{i}",
                "timestamp": stamp,
                "rotation": _quat(th),
                "translation": [R * np.sin(th) + 100.0, R * (1 - np.cos(th)) + 50.0, 0.0],
            }
        )
        for k, c in enumerate([*nu.CAMERAS, "LIDAR_TOP"]):
            name = f"samples/{c}/n015-2018-07-24-11-22-45+0800__{c}__{stamp}"
            path = dataroot / (name + (".pcd.bin" if c == "LIDAR_TOP" else ".jpg"))
            path.parent.mkdir(parents=True, exist_ok=True)
            if c == "LIDAR_TOP":
                path.write_bytes(sweep(i).tobytes())
            else:
                buf = io.BytesIO()
                Image.fromarray(np.full((4, 6, 3), 30 * k + i, np.uint8)).save(buf, "JPEG")
                path.write_bytes(buf.getvalue())
            sample_data.append(
                {
                    "token": f"sd-{c}-{i}",
                    "sample_token": f"sample{i}",
                    "ego_pose_token": f"pose{i}",
                    "calibrated_sensor_token": f"c-{c}",
                    "timestamp": stamp,
                    "fileformat": "pcd" if c == "LIDAR_TOP" else "jpg",
                    "is_key_frame": True,
                    "height": 0 if c == "LIDAR_TOP" else 4,
                    "width": 0 if c == "LIDAR_TOP" else 6,
                    "filename": str(path.relative_to(dataroot)),
                    "prev": f"sd-{c}-{i - 1}" if i else "",
                    "next": f"sd-{c}-{i + 1}" if i < SAMPLES - 1 else "",
                }
            )
    scene = {
        "token": "scene0",
        "log_token": "log0",
        "nbr_samples": SAMPLES,
        "first_sample_token": "sample0",
        "last_sample_token": f"sample{SAMPLES - 1}",
        "name": "scene-0061",
        "description": "left turn, synthetic",
    }
    tables = {
        "scene": [scene],
        "sample": samples,
        "sample_data": sample_data,
        "ego_pose": poses,
        "calibrated_sensor": calib,
        "sensor": sensors,
        "log": [{"token": "log0", "location": "singapore-onenorth", "vehicle": "n015"}],
    }
    for name, rows in tables.items():
        (version / f"{name}.json").write_text(json.dumps(rows, indent=0))
    nu._tables.cache_clear()
    return version


def test_scene_as_waypoint_episode(tmp_path):
    db = write_db(tmp_path / "nuscenes")
    assert detect_format(db) == "nuscenes"
    (raw,) = [nu.read_episode(db, r) for r in nu.episode_refs(db)]
    n = SAMPLES - nu.HORIZON
    assert raw.actions.shape == (n, 2 * nu.HORIZON)
    # on a circle the future in the ego frame is the same arc from every step
    d = OMEGA * DT * np.arange(1, nu.HORIZON + 1)
    arc = np.stack([R * np.sin(d), R * (1 - np.cos(d))], axis=1).reshape(-1)
    for t in range(n):
        np.testing.assert_allclose(raw.actions[t], arc, atol=1e-4)
    obs = raw.observations
    assert obs["images"].shape == (n + 1, 6, 4, 6, 3)
    assert abs(int(obs["CAM_BACK"][1, 0, 0, 0]) - (30 * 3 + 1)) <= 2  # JPEG of camera 3, sample 1
    chord = 2 * R * np.sin(OMEGA * DT / 2) / DT
    np.testing.assert_allclose(obs["state"][0], [0.0, 0.0])
    np.testing.assert_allclose(obs["state"][1:], [[chord, OMEGA]] * n, rtol=1e-4)
    assert raw.instruction == "turn left" and raw.truncated
    # LiDAR: (T + 1, 256, 4) in the ego frame (sensor x -> ego y, then the mount offset)
    assert obs["lidar"].shape == (n + 1, nu.LIDAR_POINTS, 4)
    assert obs["lidar_mask"][0].sum() == 3 and obs["lidar_mask"][1].sum() == nu.LIDAR_POINTS
    s0 = sweep(0)
    expected = np.stack([1.0 - s0[:, 1], s0[:, 0], 1.5 + s0[:, 2], s0[:, 3]], axis=1)
    np.testing.assert_allclose(obs["lidar"][0, :3], expected, atol=1e-5)
    assert not obs["lidar"][0, 3:].any()  # padding
    kept = obs["lidar"][1][:, 1]  # ego y = sensor x = k + 1: evenly strided over 400
    assert kept[0] == 1.0 and kept[-1] == 400.0 and np.all(np.diff(kept) > 0)
    assert nu.command(np.array([[5.0, -3.0]])) == "turn right"
    assert nu.command(np.array([[5.0, 1.0]])) == "go straight"


def test_bad_databases(tmp_path):
    db = write_db(tmp_path / "a")
    (db / "ego_pose.json").unlink()
    with pytest.raises(DataError, match=r"table ego_pose.json missing"):
        nu.episode_refs(db)
    db = write_db(tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "samples" / "CAM_BACK_LEFT")
    with pytest.raises(DataError, match=r"sample 0 \(sample0\) CAM_BACK_LEFT: file .* does not"):
        nu.read_episode(db, nu.episode_refs(db)[0])
    db = write_db(tmp_path / "c")
    poses = json.loads((db / "ego_pose.json").read_text())
    poses[2]["translation"] = [float("nan"), 0.0, 0.0]
    (db / "ego_pose.json").write_text(json.dumps(poses))
    nu._tables.cache_clear()
    with pytest.raises(DataError, match=r"sample 2 \(sample2\): ego_pose pose2 fields"):
        nu.read_episode(db, nu.episode_refs(db)[0])
    db = write_db(tmp_path / "d")
    samples = json.loads((db / "sample.json").read_text())
    samples[3]["next"] = "sample-missing"
    (db / "sample.json").write_text(json.dumps(samples))
    nu._tables.cache_clear()
    with pytest.raises(DataError, match=r"field 'next' names sample token 'sample-missing'"):
        nu.read_episode(db, nu.episode_refs(db)[0])
    db = write_db(tmp_path / "e")
    lidar = sorted((tmp_path / "e" / "samples" / "LIDAR_TOP").iterdir())[2]
    lidar.write_bytes(lidar.read_bytes()[:-6])
    with pytest.raises(
        DataError, match=r"sample 2 \(sample2\) LIDAR_TOP: .* not whole points of 5"
    ):
        nu.read_episode(db, nu.episode_refs(db)[0])
    db = write_db(tmp_path / "f")
    lidar = sorted((tmp_path / "f" / "samples" / "LIDAR_TOP").iterdir())[0]
    bad = sweep(0)
    bad[1, 2] = np.nan
    lidar.write_bytes(bad.tobytes())
    with pytest.raises(DataError, match=r"sample 0 \(sample0\) LIDAR_TOP: .* non-finite"):
        nu.read_episode(db, nu.episode_refs(db)[0])
