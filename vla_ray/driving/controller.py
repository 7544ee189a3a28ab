"""Waypoints -> vehicle controls: pure pursuit for steering, PID for speed.

Waypoints are K future (x, y) positions in the ego frame (metres; x forward, y left), the first
about ``waypoint_dt`` seconds ahead, as a waypoint action head predicts them. The controller
turns them into ``throttle`` and ``brake`` in [0, 1] and ``steer`` in [-1, 1], the fraction of
``max_steer``; positive steer turns left (counter-clockwise). CARLA's steer is positive to the
right: an env wrapper for CARLA negates it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Control:
    """One step's vehicle command."""

    throttle: float
    brake: float
    steer: float


@dataclass
class WaypointController:
    """Pure-pursuit steering (Coulter 1992) and a PID on speed, for a kinematic bicycle.

    ``lookahead`` = clip(``lookahead_gain`` * speed + ``lookahead_min``, min, ``lookahead_max``)
    metres along the waypoint polyline (from the ego origin); the steering angle that puts the
    rear axle on an arc through that point is ``atan(2 L sin(alpha) / lookahead)``. The target
    speed is given, or the mean spacing of the waypoints over ``waypoint_dt``.
    """

    wheelbase: float = 2.7
    max_steer: float = math.radians(35.0)
    lookahead_gain: float = 0.5
    lookahead_min: float = 3.0
    lookahead_max: float = 15.0
    waypoint_dt: float = 0.5
    kp: float = 0.5
    ki: float = 0.05
    kd: float = 0.0
    dt: float = 0.1
    integral_limit: float = 10.0

    def __post_init__(self) -> None:
        for name in ("wheelbase", "max_steer", "lookahead_min", "waypoint_dt", "dt"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        if self.lookahead_max < self.lookahead_min:
            raise ValueError(
                f"lookahead_max: expected >= lookahead_min={self.lookahead_min}, "
                f"got {self.lookahead_max}"
            )
        self.reset()

    def reset(self) -> None:
        """Clear the speed PID's integral and last error (at an episode start)."""
        self._integral = 0.0
        self._last_error: float | None = None

    def target_speed_of(self, waypoints: np.ndarray) -> float:
        """Mean distance between consecutive waypoints (from the ego origin) per waypoint_dt."""
        pts = np.vstack([np.zeros((1, 2)), waypoints])
        return float(np.linalg.norm(np.diff(pts, axis=0), axis=1).mean() / self.waypoint_dt)

    def lookahead_point(self, waypoints: np.ndarray, speed: float) -> np.ndarray:
        """The point ``lookahead`` metres along the polyline origin -> waypoints (its end when
        the polyline is shorter)."""
        ld = min(max(self.lookahead_gain * speed + self.lookahead_min, 0.0), self.lookahead_max)
        pts = np.vstack([np.zeros((1, 2)), waypoints])
        seg = np.diff(pts, axis=0)
        lengths = np.linalg.norm(seg, axis=1)
        travelled = 0.0
        for start, d, n in zip(pts[:-1], seg, lengths, strict=True):
            if n > 0 and travelled + n >= ld:
                return start + d * (ld - travelled) / n
            travelled += n
        return pts[-1]

    def steer_angle(self, waypoints: np.ndarray, speed: float) -> float:
        """Pure-pursuit front-wheel angle (radians, positive left), unclipped."""
        x, y = self.lookahead_point(waypoints, speed)
        dist2 = x * x + y * y
        if dist2 < 1e-9:
            return 0.0
        # curvature of the arc through the origin, tangent to x, and (x, y): 2 y / d^2
        return math.atan(self.wheelbase * 2.0 * y / dist2)

    def __call__(
        self, waypoints: np.ndarray, speed: float, target_speed: float | None = None
    ) -> Control:
        """Controls for ego-frame ``waypoints`` (K, 2) at the current ``speed`` (m/s)."""
        wp = np.asarray(waypoints, dtype=np.float64)
        if wp.ndim != 2 or wp.shape[1] != 2 or wp.shape[0] < 1:
            raise ValueError(f"waypoints: expected shape (K, 2) with K >= 1, got {wp.shape}")
        steer = float(np.clip(self.steer_angle(wp, speed) / self.max_steer, -1.0, 1.0))
        target = self.target_speed_of(wp) if target_speed is None else float(target_speed)
        error = target - speed
        self._integral = float(
            np.clip(self._integral + error * self.dt, -self.integral_limit, self.integral_limit)
        )
        derivative = 0.0 if self._last_error is None else (error - self._last_error) / self.dt
        self._last_error = error
        u = self.kp * error + self.ki * self._integral + self.kd * derivative
        if target <= 0.0 and speed < 0.1:  # hold still
            return Control(throttle=0.0, brake=1.0, steer=steer)
        return Control(
            throttle=float(np.clip(u, 0.0, 1.0)), brake=float(np.clip(-u, 0.0, 1.0)), steer=steer
        )
