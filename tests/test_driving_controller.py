"""The waypoint controller tracks paths on a kinematic bicycle model (no Ray, no torch)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vla_ray.driving.controller import Control, WaypointController

DT = 0.1
ACCEL, DECEL = 4.0, 8.0  # m/s^2 at full throttle / full brake


def bicycle_step(pose: np.ndarray, speed: float, c: Control, ctl: WaypointController):
    """Rear-axle kinematic bicycle: pose (x, y, yaw), speed -> next pose, speed."""
    speed = max(0.0, speed + (c.throttle * ACCEL - c.brake * DECEL) * DT)
    delta = c.steer * ctl.max_steer
    x, y, yaw = pose
    x += speed * math.cos(yaw) * DT
    y += speed * math.sin(yaw) * DT
    yaw += speed / ctl.wheelbase * math.tan(delta) * DT
    return np.array([x, y, yaw]), speed


def ego_waypoints(path: np.ndarray, pose: np.ndarray, k: int = 8, spacing: int = 10) -> np.ndarray:
    """K path points ahead of the nearest one (every ``spacing``-th), in the ego frame."""
    i = int(np.argmin(np.linalg.norm(path - pose[:2], axis=1)))
    ahead = path[i + spacing : i + spacing * (k + 1) : spacing]
    c, s = math.cos(pose[2]), math.sin(pose[2])
    d = ahead - pose[:2]
    return np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], axis=1)


def drive(path: np.ndarray, pose: np.ndarray, steps: int, target_speed: float | None):
    """Cross-track errors and speeds over a closed-loop drive along ``path``."""
    ctl = WaypointController(dt=DT)
    speed, errors, speeds = 0.0, [], []
    for _ in range(steps):
        wp = ego_waypoints(path, pose)
        pose, speed = bicycle_step(pose, speed, ctl(wp, speed, target_speed), ctl)
        errors.append(float(np.min(np.linalg.norm(path - pose[:2], axis=1))))
        speeds.append(speed)
    return np.array(errors), np.array(speeds)


def test_tracks_straight_path_from_lateral_offset():
    path = np.stack([np.arange(0, 400, 0.1), np.zeros(4000)], axis=1)
    errors, speeds = drive(path, np.array([0.0, 1.5, 0.0]), steps=300, target_speed=8.0)
    assert errors[0] > 1.0  # starts off the path
    assert errors[150:].max() < 0.1, errors[150:].max()
    assert abs(speeds[150:].mean() - 8.0) < 0.3, speeds[150:].mean()


def test_tracks_circle_within_tolerance():
    radius = 25.0
    theta = np.arange(0, 2 * math.pi, 0.1 / radius)
    path = np.stack([radius * np.sin(theta), radius * (1 - np.cos(theta))], axis=1)  # left turn
    errors, speeds = drive(path, np.array([0.0, 0.0, 0.0]), steps=150, target_speed=6.0)
    assert errors[50:].max() < 0.5, errors[50:].max()
    assert abs(speeds[80:].mean() - 6.0) < 0.3, speeds[80:].mean()


def test_target_speed_from_waypoint_spacing_and_braking():
    ctl = WaypointController(waypoint_dt=0.5)
    wp = np.stack([np.arange(1, 6) * 5.0, np.zeros(5)], axis=1)  # 5 m per 0.5 s = 10 m/s
    assert ctl.target_speed_of(wp) == pytest.approx(10.0)
    slow = ctl(wp, speed=2.0)
    assert slow.throttle > 0 and slow.brake == 0 and slow.steer == 0
    ctl.reset()
    fast = ctl(wp, speed=20.0)
    assert fast.brake > 0 and fast.throttle == 0
    stop = WaypointController()(np.zeros((4, 2)), speed=0.0)
    assert stop.brake == 1.0 and stop.throttle == 0.0


def test_steer_sign_and_bad_waypoints():
    ctl = WaypointController()
    assert ctl(np.array([[5.0, 2.0], [10.0, 5.0]]), speed=5.0).steer > 0  # left is positive
    assert ctl(np.array([[5.0, -2.0], [10.0, -5.0]]), speed=5.0).steer < 0
    with pytest.raises(ValueError, match=r"waypoints: expected shape \(K, 2\).*\(4, 3\)"):
        ctl(np.zeros((4, 3)), speed=0.0)
