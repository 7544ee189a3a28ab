"""LangDrive: language-routed driving through highway-env's four-way intersection.

The ego car approaches the intersection from the south; the instruction names the manoeuvre
("turn left at the intersection", "go straight at the intersection", "please turn right",
four paraphrases each, drawn per episode). The episode succeeds when the car has driven
``exit_distance`` metres into the named exit without a collision; it fails on a collision, on
entering another exit (``wrong_exit``), on leaving the road, or when ``duration`` seconds pass.
The approach is the same for every manoeuvre and the route is not in the observation, so a
policy that ignores the instruction succeeds on about one episode in three:
``instruction_mode="blind"`` gives the language-blind control (a constant manoeuvre-free
instruction).

Traffic: highway-env's IDM cars enter from all four roads (``initial_vehicles`` at the start,
then one per step with ``spawn_probability``); the east-west road has right of way, and cars
yield to the ego only where their road has lower priority than the ego's lane.

Frames. Positions in observations are in the **ego frame**: x forward, y to the driver's left as
the camera draws it (highway-env's world has y pointing down the screen), metres.

Actions (``action="controls"``): ``[throttle, steer]`` in ``[-1, 1]^2``; throttle maps to an
acceleration of ``[-5, 5]`` m/s^2 (negative brakes), steer to a front-wheel angle of
``[-pi/4, pi/4]``, positive to the left. ``action="waypoints"``: ``K = waypoints`` future
ego-frame points ``[x1, y1, ..., xK, yK]`` divided by ``waypoint_range`` metres, plus (with
``waypoint_speed``) a target speed mapped from ``[-1, 1]`` to ``[0, max_speed]`` m/s; a
:class:`~vla_ray.driving.controller.WaypointController` (pure pursuit + PID) turns them into
controls inside the env, so RL and imitation act in waypoint space.

Observations (Dict):

- ``image`` (``vla_ray/LangDrive-v0``): uint8 (H, W, 3) RGB top-down camera following the ego
  (highway-env's renderer, north up, ``scaling`` pixels per metre).
- ``state``: float32 ``(6 + 5 * observed_vehicles,)``: the ``ego`` features, then the nearest
  ``observed_vehicles`` cars within ``lidar_range`` as ``presence, x / 50, y / 50, vx / 10,
  vy / 10`` (ego frame, relative velocity), nearest first, zeros for absent ones.
- ``ego``: float32 (6,): speed / 10, yaw rate (rad/s), position x / 50, y / 50 (world, metres;
  the intersection's centre at 0), cos and sin of the heading (world).
- ``imu``: float32 (``imu_window``, 6): the last ``imu_window`` policy steps of (forward
  acceleration, leftward acceleration, 0, 0, 0, yaw rate) in m/s^2 and rad/s, oldest first
  (zeros before the episode start), as ``vla_ray.models.sensors``' ``imu`` encoders take them.
- ``lidar`` (``lidar_beams``, 4): a 2-D scan (highway-env's ray cast against the other cars'
  boxes) as points ``x, y, 0, intensity`` in the ego frame; a beam with no hit within
  ``lidar_range`` lies at that range with intensity 0 and ``lidar_mask`` 0 (hits: 1), the
  point-cloud format of the ``lidar`` encoders (``pointnet``, ``pillars``).
- ``instruction`` + ``instruction_mask``: the tokenised instruction.

Reward per step: ``progress_weight`` * (metres advanced along the instructed route / (``cruise``
* step time), clipped to ``[0, 1]``; advancing off the route counts 0) + ``success_bonus`` on
success - ``collision_penalty`` on a collision - ``wrong_exit_penalty`` on a wrong exit.

``info``: ``manoeuvre`` and ``goal`` (its name: per-goal success in evaluation and training
metrics), ``is_success``, ``collision``, ``wrong_exit``, ``offroad``, ``route_completion``
(the furthest point reached along the instructed route / its length, in ``[0, 1]``),
``distance`` (metres driven this episode), ``speed`` (m/s), ``mean_speed`` (this episode) and
``infractions`` (episode counts by kind: ``collision_vehicle``, ``offroad``, ``route_deviation``;
see ``vla_ray.driving.metrics`` for the driving score).

``expert_action()`` is a privileged scripted driver (route following by pure pursuit, IDM
behind leaders on the route, yielding at the stop line while a crossing car is predicted to come
within reach): the demonstrator for BC and DAgger.
"""

from __future__ import annotations

import math
import os
from collections import deque
from typing import Any

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

from vla_ray.driving.controller import WaypointController  # noqa: E402

from .pusht import encode_instruction  # noqa: E402

# manoeuvre -> exit index of highway-env's intersection (the ego enters from road 0, south)
MANOEUVRES: dict[str, int] = {"left": 1, "straight": 2, "right": 3}
# Paraphrases; the project's word-level tokenizer knows "left", "right" and "forward" (other
# words it lacks, such as "straight" and "intersection", encode as [UNK]).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "left": (
        "turn left at the intersection",
        "go left at the next corner",
        "turn to the left side",
        "please turn left",
    ),
    "straight": (
        "go straight at the intersection",
        "drive forward at the next corner",
        "keep going forward",
        "go forward across the middle",
    ),
    "right": (
        "turn right at the intersection",
        "go right at the next corner",
        "turn to the right side",
        "please turn right",
    ),
}
BLIND_INSTRUCTION = "drive safely and follow the route"
INSTRUCTION_MODES = ("text", "blind")
ACTION_MODES = ("controls", "waypoints")
EGO_DIM = 6
VEHICLE_FEATURES = 5
IMU_CHANNELS = 6
POS_SCALE = 50.0
SPEED_SCALE = 10.0
ACCEL_RANGE = (-5.0, 5.0)
STEER_RANGE = (-math.pi / 4, math.pi / 4)
ROUTE_STEP = 1.0  # metres between route polyline points
ON_ROUTE = 2.5  # metres: a point closer to the instructed route counts as on it
CONFLICT_DISTANCE = 6.0  # metres between car centres that the expert treats as a crash
CAR_LENGTH = 5.0
CAR_WIDTH = 2.0  # highway-env's Vehicle.LENGTH; its bicycle model turns with this wheelbase


def _check(name: str, value: Any, low: float, high: float | None = None, integer=False) -> Any:
    """``value`` when it is a number (an int with ``integer``) in ``[low, high]``; otherwise
    ValueError naming the field, the expected range and the value given."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    if ok:
        ok = low <= value and (high is None or value <= high)
    if not ok:
        what = "an int" if integer else "a number"
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"LangDriveEnv: `{name}` must be {what} {rng}, got {value!r}")
    return int(value) if integer else float(value)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"LangDriveEnv: `{name}` must be one of {choices}, got {value!r}")
    return value


def _scene_class():
    """highway-env's IntersectionEnv without its own (pandas) observation: this env observes."""
    from highway_env.envs.common.observation import ObservationType
    from highway_env.envs.intersection_env import IntersectionEnv

    class _NoObservation(ObservationType):
        def space(self) -> gym.spaces.Space:
            return gym.spaces.Box(0.0, 0.0, (1,), np.float32)

        def observe(self) -> np.ndarray:
            return np.zeros(1, np.float32)

    class _Scene(IntersectionEnv):
        def define_spaces(self) -> None:
            super().define_spaces()
            self.observation_type = _NoObservation(self)
            self.observation_space = self.observation_type.space()

    return _Scene


class LangDriveEnv(gym.Env):
    """Instruction-routed intersection driving: camera, 2-D LiDAR, IMU and ego signals
    (module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 5}

    def __init__(
        self,
        image: bool = True,
        image_size: int | tuple[int, int] | list[int] = 64,
        scaling: float = 1.5,
        instruction_mode: str = "text",
        manoeuvre: str | None = None,
        instruction_max_length: int = 16,
        tokenizer: str | None = None,
        observed_vehicles: int = 4,
        lidar_beams: int = 32,
        lidar_range: float = 40.0,
        imu_window: int = 10,
        initial_vehicles: int = 4,
        spawn_probability: float = 0.1,
        duration: float = 25.0,
        policy_frequency: int = 5,
        simulation_frequency: int = 15,
        cruise: float = 8.0,
        max_speed: float = 12.0,
        exit_distance: float = 20.0,
        action: str = "controls",
        waypoints: int = 4,
        waypoint_range: float = 20.0,
        waypoint_speed: bool = True,
        waypoint_spacing: float = 3.0,
        progress_weight: float = 1.0,
        success_bonus: float = 10.0,
        collision_penalty: float = 10.0,
        wrong_exit_penalty: float = 5.0,
        render_mode: str | None = "rgb_array",
    ) -> None:
        try:
            scene_class = _scene_class()
        except ImportError as err:  # pragma: no cover - depends on the install
            raise ImportError(
                "vla_ray/LangDrive-v0 needs the highway-env package: pip install 'vla-ray[envs]'"
            ) from err
        if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
            h = w = int(image_size)
        elif isinstance(image_size, (list, tuple)) and len(image_size) == 2:
            h, w = (int(v) for v in image_size)
        else:
            raise ValueError(
                f"LangDriveEnv: `image_size` must be an int or [H, W], got {image_size!r}"
            )
        if image and not (8 <= h <= 512 and 8 <= w <= 512):
            raise ValueError(
                f"LangDriveEnv: `image_size` must be in [8, 512] pixels per side, got {h}x{w}"
            )
        self.image = bool(image)
        self.instruction_mode = _choice("instruction_mode", instruction_mode, INSTRUCTION_MODES)
        if manoeuvre is not None:
            _choice("manoeuvre", manoeuvre, tuple(MANOEUVRES))
        self.fixed_manoeuvre = manoeuvre
        self.action_mode = _choice("action", action, ACTION_MODES)
        self.observed_vehicles = _check("observed_vehicles", observed_vehicles, 0, 32, True)
        self.lidar_beams = _check("lidar_beams", lidar_beams, 4, 1024, True)
        self.lidar_range = _check("lidar_range", lidar_range, 1.0, 200.0)
        self.imu_window = _check("imu_window", imu_window, 1, 200, True)
        initial_vehicles = _check("initial_vehicles", initial_vehicles, 1, 30, True)
        spawn_probability = _check("spawn_probability", spawn_probability, 0.0, 1.0)
        self.duration = _check("duration", duration, 1.0, 600.0)
        policy_frequency = _check("policy_frequency", policy_frequency, 1, 50, True)
        simulation_frequency = _check("simulation_frequency", simulation_frequency, 1, 200, True)
        if simulation_frequency % policy_frequency:
            raise ValueError(
                "LangDriveEnv: `simulation_frequency` must be a multiple of policy_frequency="
                f"{policy_frequency}, got {simulation_frequency!r}"
            )
        self.cruise = _check("cruise", cruise, 0.5, 30.0)
        self.max_speed = _check("max_speed", max_speed, self.cruise, 40.0)
        self.exit_distance = _check("exit_distance", exit_distance, 1.0, 90.0)
        self.n_waypoints = _check("waypoints", waypoints, 1, 32, True)
        self.waypoint_range = _check("waypoint_range", waypoint_range, 1.0, 200.0)
        self.waypoint_spacing = _check("waypoint_spacing", waypoint_spacing, 0.1, 50.0)
        self.waypoint_speed = bool(waypoint_speed)
        self.weights = dict(
            progress=_check("progress_weight", progress_weight, 0.0),
            success=_check("success_bonus", success_bonus, 0.0),
            collision=_check("collision_penalty", collision_penalty, 0.0),
            wrong_exit=_check("wrong_exit_penalty", wrong_exit_penalty, 0.0),
        )
        self.render_mode = render_mode
        self._dt = 1.0 / policy_frequency

        L = _check("instruction_max_length", instruction_max_length, 1, 512, True)
        texts = [t for m in MANOEUVRES for t in TEMPLATES[m]] + [BLIND_INSTRUCTION]
        self._encoded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        vocab = 0
        for text in texts:
            ids, mask, vocab = encode_instruction(text, L, tokenizer)
            self._encoded[text] = (ids, mask)

        self._scene = scene_class(
            config={
                "action": {
                    "type": "ContinuousAction",
                    "acceleration_range": list(ACCEL_RANGE),
                    "steering_range": list(STEER_RANGE),
                    "longitudinal": True,
                    "lateral": True,
                    "clip": True,
                },
                "duration": self.duration,
                "initial_vehicle_count": initial_vehicles,
                "spawn_probability": spawn_probability,
                "policy_frequency": policy_frequency,
                "simulation_frequency": simulation_frequency,
                "offroad_terminal": False,
                "screen_width": w,
                "screen_height": h,
                "scaling": _check("scaling", scaling, 0.1, 50.0),
                "centering_position": [0.5, 0.5],
                "offscreen_rendering": True,
            },
            render_mode="rgb_array",
        )
        from highway_env.envs.common.observation import LidarObservation

        self._lidar = LidarObservation(
            self._scene, cells=self.lidar_beams, maximum_range=self.lidar_range, normalize=False
        )
        self.controller = WaypointController(
            wheelbase=CAR_LENGTH,
            max_steer=STEER_RANGE[1],
            waypoint_dt=self.waypoint_spacing / self.cruise,
            kp=1.0,
            ki=0.0,
            dt=self._dt,
        )

        n_state = EGO_DIM + VEHICLE_FEATURES * self.observed_vehicles
        spaces: dict[str, gym.Space] = {}
        if self.image:
            spaces["image"] = gym.spaces.Box(0, 255, (h, w, 3), np.uint8)
        spaces["state"] = gym.spaces.Box(-np.inf, np.inf, (n_state,), np.float32)
        spaces["ego"] = gym.spaces.Box(-np.inf, np.inf, (EGO_DIM,), np.float32)
        spaces["imu"] = gym.spaces.Box(-np.inf, np.inf, (self.imu_window, IMU_CHANNELS), np.float32)
        r = self.lidar_range
        spaces["lidar"] = gym.spaces.Box(-r, r, (self.lidar_beams, 4), np.float32)
        spaces["lidar_mask"] = gym.spaces.Box(0, 1, (self.lidar_beams,), np.int64)
        spaces["instruction"] = gym.spaces.Box(0, vocab - 1, (L,), np.int64)
        spaces["instruction_mask"] = gym.spaces.Box(0, 1, (L,), np.int64)
        self.observation_space = gym.spaces.Dict(spaces)
        if self.action_mode == "controls":
            self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        else:
            n = 2 * self.n_waypoints + int(self.waypoint_speed)
            self.action_space = gym.spaces.Box(-1.0, 1.0, (n,), np.float32)

        self.manoeuvre = self.fixed_manoeuvre or "straight"
        self.instruction = TEMPLATES[self.manoeuvre][0]
        self._route = np.zeros((2, 2))
        self._route_s = np.zeros(2)

    # -- geometry --------------------------------------------------------------------------------
    @property
    def ego(self):
        """highway-env's ego vehicle."""
        return self._scene.vehicle

    def _to_ego(self, points: np.ndarray) -> np.ndarray:
        """World points (N, 2) -> ego frame (x forward, y left as drawn)."""
        v = self.ego
        c, s = math.cos(v.heading), math.sin(v.heading)
        d = np.asarray(points, dtype=np.float64).reshape(-1, 2) - v.position
        return np.stack([d @ np.array([c, s]), d @ np.array([s, -c])], axis=1)

    def _from_ego(self, points: np.ndarray) -> np.ndarray:
        """Ego-frame points (N, 2) -> world."""
        v = self.ego
        c, s = math.cos(v.heading), math.sin(v.heading)
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return v.position + np.outer(p[:, 0], [c, s]) + np.outer(p[:, 1], [s, -c])

    def _build_route(self) -> None:
        exit_ = MANOEUVRES[self.manoeuvre]
        net = self._scene.road.network
        lanes = [("o0", "ir0", 0), ("ir0", f"il{exit_}", 0), (f"il{exit_}", f"o{exit_}", 0)]
        points = []
        for i, index in enumerate(lanes):
            lane = net.get_lane(index)
            end = lane.length if i < 2 else min(lane.length, self.exit_distance + 15.0)
            s = np.arange(0.0, end, ROUTE_STEP)
            points.extend(lane.position(float(x), 0.0) for x in s)
            if i == 0:
                self._entry_s = float(lane.length)  # the stop line, along the route
            if i == 1:
                self._exit_s = self._entry_s + float(lane.length)
        self._route = np.asarray(points, dtype=np.float64)
        seg = np.linalg.norm(np.diff(self._route, axis=0), axis=1)
        self._route_s = np.concatenate([[0.0], np.cumsum(seg)])
        self._exit_lane = (f"il{exit_}", f"o{exit_}")

    def _project(self, position: np.ndarray, start: int = 0) -> tuple[float, float, int]:
        """(arc length, distance, segment index) of the closest point of the route to
        ``position``, searching segments from ``start``."""
        a = self._route[start:-1]
        b = self._route[start + 1 :]
        ab = b - a
        t = np.clip(np.einsum("ij,ij->i", position - a, ab) / np.einsum("ij,ij->i", ab, ab), 0, 1)
        closest = a + ab * t[:, None]
        d = np.linalg.norm(closest - position, axis=1)
        i = int(np.argmin(d))
        return (
            float(self._route_s[start + i] + t[i] * np.linalg.norm(ab[i])),
            float(d[i]),
            start + i,
        )

    def _route_point(self, s: float) -> np.ndarray:
        s = float(np.clip(s, 0.0, self._route_s[-1]))
        return np.array(
            [
                np.interp(s, self._route_s, self._route[:, 0]),
                np.interp(s, self._route_s, self._route[:, 1]),
            ]
        )

    def _predict_ego(self, times: np.ndarray) -> tuple[list, list]:
        """Ego positions and headings along the instructed route at constant speed (what
        highway-env's road rules use to make cars with a lower priority yield to the ego)."""
        speed = max(float(self.ego.speed), 0.0)
        positions, headings = [], []
        for t in times:
            s = self._s + speed * float(t)
            p, q = self._route_point(s), self._route_point(s + ROUTE_STEP)
            positions.append(p)
            headings.append(math.atan2(q[1] - p[1], q[0] - p[0]))
        return positions, headings

    # -- observations ----------------------------------------------------------------------------
    def _ego_features(self) -> np.ndarray:
        v = self.ego
        return np.array(
            [
                v.speed / SPEED_SCALE,
                self._yaw_rate,
                v.position[0] / POS_SCALE,
                v.position[1] / POS_SCALE,
                math.cos(v.heading),
                math.sin(v.heading),
            ],
            dtype=np.float32,
        )

    def _others(self) -> list:
        return [o for o in self._scene.road.vehicles if o is not self.ego]

    def _vehicle_features(self) -> np.ndarray:
        feats = np.zeros((self.observed_vehicles, VEHICLE_FEATURES), np.float32)
        if not self.observed_vehicles:
            return feats.reshape(-1)
        others = self._others()
        if others:
            pos = self._to_ego(np.array([o.position for o in others]))
            dist = np.linalg.norm(pos, axis=1)
            order = [i for i in np.argsort(dist) if dist[i] <= self.lidar_range]
            heading = self.ego.heading
            c, s = math.cos(heading), math.sin(heading)
            for row, i in enumerate(order[: self.observed_vehicles]):
                dv = others[i].velocity - self.ego.velocity
                vel = np.array([dv @ np.array([c, s]), dv @ np.array([s, -c])])
                feats[row] = [1.0, *(pos[i] / POS_SCALE), *(vel / SPEED_SCALE)]
        return feats.reshape(-1)

    def _lidar_scan(self) -> tuple[np.ndarray, np.ndarray]:
        v = self.ego
        grid = self._lidar.trace(v.position, v.velocity)
        dist = grid[:, 0].astype(np.float64)
        angles = np.arange(self.lidar_beams) * (2 * np.pi / self.lidar_beams)
        world = v.position + dist[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        hit = dist < self.lidar_range - 1e-6
        points = np.zeros((self.lidar_beams, 4), np.float32)
        points[:, :2] = self._to_ego(world)
        points[:, 3] = hit
        return points, hit.astype(np.int64)

    def _obs(self) -> dict[str, np.ndarray]:
        ego = self._ego_features()
        obs: dict[str, np.ndarray] = {}
        if self.image:
            obs["image"] = self._camera()
        obs["state"] = np.concatenate([ego, self._vehicle_features()]).astype(np.float32)
        obs["ego"] = ego
        obs["imu"] = np.asarray(self._imu, dtype=np.float32)
        obs["lidar"], obs["lidar_mask"] = self._lidar_scan()
        ids, mask = self._encoded[self.instruction]
        obs["instruction"] = ids.copy()
        obs["instruction_mask"] = mask.copy()
        return obs

    def _camera(self) -> np.ndarray:
        scene = self._scene
        if scene.viewer is None:
            from highway_env.envs.common.graphics import EnvViewer

            scene.viewer = EnvViewer(scene)
        scene.viewer.enabled = True  # off-screen drawing needs no display
        frame = scene.render()
        scene.enable_auto_render = False
        return np.ascontiguousarray(frame, dtype=np.uint8)

    # -- gymnasium API ---------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        scene_seed = int(self.np_random.integers(2**31 - 1))
        self._scene.reset(seed=scene_seed)
        # highway-env clears cars within 20 m of the ego while iterating over the list it
        # removes from, which can leave one on top of the ego
        road = self._scene.road
        road.vehicles = [
            o
            for o in road.vehicles
            if o is self.ego or np.linalg.norm(o.position - self.ego.position) >= 20.0
        ]
        names = tuple(MANOEUVRES)
        manoeuvre = (options or {}).get("manoeuvre", self.fixed_manoeuvre)
        if manoeuvre is None:
            manoeuvre = names[int(self.np_random.integers(len(names)))]
        self.manoeuvre = _choice("manoeuvre", manoeuvre, names)
        if self.instruction_mode == "blind":
            self.instruction = BLIND_INSTRUCTION
        else:
            templates = TEMPLATES[self.manoeuvre]
            self.instruction = templates[int(self.np_random.integers(len(templates)))]
        self._build_route()
        self._s, _, self._seg = self._project(self.ego.position)
        # highway-env's road rules predict every car's path; for the ego (a free kinematic car)
        # they would simulate a deep copy of the scene: predict along the route instead
        self.ego.predict_trajectory_constant_speed = self._predict_ego
        self._s0 = self._s_best = self._s
        self._route_length = self._exit_s + self.exit_distance - self._s0
        self._yaw_rate = 0.0
        self._imu = deque(
            [np.zeros(IMU_CHANNELS, np.float32)] * self.imu_window, maxlen=self.imu_window
        )
        self._distance = 0.0
        self._speed_sum = 0.0
        self._steps = 0
        self._infractions = {"collision_vehicle": 0, "offroad": 0, "route_deviation": 0}
        self.controller.reset()
        info = self._info(success=False, collided=False, wrong=False, offroad=False)
        return self._obs(), info

    def controls(self, action: np.ndarray) -> np.ndarray:
        """The ``[throttle, steer]`` command an action of this env's action space gives
        (waypoint actions go through the controller)."""
        a = np.clip(np.asarray(action, dtype=np.float32).reshape(self.action_space.shape), -1, 1)
        if self.action_mode == "controls":
            return a
        k = self.n_waypoints
        wp = a[: 2 * k].reshape(k, 2).astype(np.float64) * self.waypoint_range
        target = (float(a[2 * k]) + 1.0) / 2.0 * self.max_speed if self.waypoint_speed else None
        c = self.controller(wp, float(self.ego.speed), target)
        # throttle - brake (PID output) -> acceleration, in [-1, 1]
        return np.array([c.throttle - c.brake, c.steer], dtype=np.float32)

    def step(self, action: np.ndarray):
        throttle, steer = self.controls(action)
        v = self.ego
        # braking stops the car; it does not reverse (highway-env's model would)
        throttle = max(float(throttle), -max(float(v.speed), 0.0) / (ACCEL_RANGE[1] * self._dt))
        pos0, vel0, heading0 = v.position.copy(), v.velocity.copy(), float(v.heading)
        # highway-env's positive steering turns clockwise as drawn: to the driver's right
        self._scene.step(np.array([throttle, -steer], dtype=np.float32))
        v = self.ego
        dheading = (float(v.heading) - heading0 + np.pi) % (2 * np.pi) - np.pi
        self._yaw_rate = -dheading / self._dt  # positive: turning left as drawn
        c, s = math.cos(v.heading), math.sin(v.heading)
        acc = (v.velocity - vel0) / self._dt
        self._imu.append(
            np.array(
                [acc @ np.array([c, s]), acc @ np.array([s, -c]), 0.0, 0.0, 0.0, self._yaw_rate],
                dtype=np.float32,
            )
        )
        self._distance += float(np.linalg.norm(v.position - pos0))
        self._speed_sum += float(v.speed)
        self._steps += 1

        start = max(self._seg - 5, 0)
        self._s, lateral, self._seg = self._project(v.position, start)
        progress = 0.0
        if lateral <= ON_ROUTE:
            progress = max(0.0, self._s - max(self._s_best, self._s0))
            self._s_best = max(self._s_best, self._s)
        progress = float(np.clip(progress / (self.cruise * self._dt), 0.0, 1.0))

        collided = bool(v.crashed)
        offroad = not bool(v.on_road)
        lane = v.lane_index
        in_exit = lane[0].startswith("il") and lane[1].startswith("o")
        along = v.lane.local_coordinates(v.position)[0] if in_exit else 0.0
        wrong = bool(in_exit and (lane[0], lane[1]) != self._exit_lane and along >= 3.0)
        success = bool(
            not collided
            and (lane[0], lane[1]) == self._exit_lane
            and along >= self.exit_distance
            and lateral <= ON_ROUTE
        )
        self._infractions["collision_vehicle"] += int(collided)
        self._infractions["offroad"] += int(offroad)
        self._infractions["route_deviation"] += int(wrong)
        w = self.weights
        reward = w["progress"] * progress + w["success"] * success
        reward -= w["collision"] * collided + w["wrong_exit"] * wrong
        terminated = bool(collided or wrong or success or offroad)
        truncated = bool(self._scene.time >= self.duration) and not terminated
        info = self._info(success=success, collided=collided, wrong=wrong, offroad=offroad)
        return self._obs(), float(reward), terminated, truncated, info

    def _info(self, success: bool, collided: bool, wrong: bool, offroad: bool) -> dict[str, Any]:
        completion = (self._s_best - self._s0) / max(self._route_length, 1e-6)
        if success:
            completion = 1.0
        return dict(
            manoeuvre=self.manoeuvre,
            goal=self.manoeuvre,
            instruction=self.instruction,
            is_success=bool(success),
            collision=bool(collided),
            wrong_exit=bool(wrong),
            offroad=bool(offroad),
            route_completion=float(np.clip(completion, 0.0, 1.0)),
            distance=float(self._distance),
            speed=float(self.ego.speed),
            mean_speed=float(self._speed_sum / max(self._steps, 1)),
            infractions=dict(self._infractions),
        )

    # -- the scripted expert ---------------------------------------------------------------------
    def expert_plan(self) -> tuple[np.ndarray, float]:
        """Privileged plan: ``waypoints`` ego-frame points every ``waypoint_spacing`` metres
        along the instructed route ahead, and a target speed (m/s): IDM behind the nearest car
        on the route, a stop at the stop line while a car is predicted to cross the ego's path
        within the next seconds."""
        v = self.ego
        s = self._s
        k = self.n_waypoints
        world = np.array([self._route_point(s + (i + 1) * self.waypoint_spacing) for i in range(k)])
        waypoints = self._to_ego(world)

        speed = float(v.speed)
        v0 = self.cruise
        gap, lead_speed = math.inf, 0.0
        from highway_env.utils import rect_corners

        start = max(self._seg - 5, 0)
        for o in self._others():
            if np.linalg.norm(o.position - v.position) > 45.0:
                continue
            # the car's centre and corners: a turning car reaches across the route with them
            pts = [o.position, *rect_corners(o.position, o.LENGTH, o.WIDTH, o.heading)]
            hits = [self._project(np.asarray(p), start) for p in pts]
            hits = [(so, d) for so, d, _ in hits if d < CAR_WIDTH / 2 + 0.5 and so > s]
            if not hits:
                continue
            so = min(h[0] for h in hits)
            g = so - s - CAR_LENGTH / 2
            if g < gap:
                along = self._route_point(so + 1.0) - self._route_point(so)
                lead_speed = max(0.0, float(o.velocity @ along / (np.linalg.norm(along) + 1e-9)))
                gap = g
        if s < self._entry_s - 0.5 and self._conflict(s, speed):
            stop_gap = self._entry_s - 1.5 - s
            if stop_gap < gap:
                gap, lead_speed = stop_gap, 0.0
        a_max, b, s_min, t_head = 3.0, 3.0, 2.0, 1.0
        acc = a_max * (1.0 - (speed / v0) ** 4)
        if gap < math.inf:
            dv = speed - lead_speed
            s_star = s_min + max(0.0, speed * t_head + speed * dv / (2 * math.sqrt(a_max * b)))
            acc -= a_max * (s_star / max(gap, 0.1)) ** 2
        acc = float(np.clip(acc, ACCEL_RANGE[0], a_max))
        # the controller's P term maps a speed error e to kp * e * 5 m/s^2
        gain = self.controller.kp * ACCEL_RANGE[1]
        target = float(np.clip(speed + acc / gain, 0.0, self.max_speed))
        return waypoints, target

    def _conflict(self, s: float, speed: float, horizon: float = 4.0) -> bool:
        """Whether a car not behind the ego on its road is predicted (constant speed along its
        route) within ``CONFLICT_DISTANCE`` of where the ego would be in the next ``horizon``
        seconds if it went on now (accelerating at 3 m/s^2 up to cruise speed)."""
        times = np.arange(0.25, horizon, 0.25)
        t_cruise = max(self.cruise - speed, 0.0) / 3.0
        tc = np.minimum(times, t_cruise)
        travel = speed * tc + 1.5 * tc**2 + self.cruise * (times - tc)
        # only the ego's path up to the end of the junction can cross another car's
        keep = s + travel <= self._exit_s + CAR_LENGTH
        if not keep.any():
            return False
        times, travel = times[keep], travel[keep]
        ego_pts = np.array([self._route_point(s + d) for d in travel])
        for o in self._others():
            if not hasattr(o, "predict_trajectory_constant_speed") or o.speed < 0.5:
                continue
            if getattr(o, "is_yielding", False):  # stopping for the ego or another car
                continue
            if np.linalg.norm(o.position - self.ego.position) > 50.0:
                continue
            if o.lane_index[:2] == self.ego.lane_index[:2] and self._project(o.position)[0] < s:
                continue  # following the ego on its road
            pts, _ = o.predict_trajectory_constant_speed(times)
            if np.min(np.linalg.norm(np.asarray(pts) - ego_pts, axis=1)) < CONFLICT_DISTANCE:
                return True
        return False

    def expert_action(self) -> np.ndarray:
        """The expert's action in this env's action space."""
        waypoints, target = self.expert_plan()
        if self.action_mode == "waypoints":
            wp = np.clip(waypoints / self.waypoint_range, -1.0, 1.0).reshape(-1)
            if self.waypoint_speed:
                wp = np.append(wp, 2.0 * target / self.max_speed - 1.0)
            return wp.astype(np.float32)
        c = self.controller(waypoints, float(self.ego.speed), target)
        return np.array([c.throttle - c.brake, c.steer], dtype=np.float32)

    def render(self) -> np.ndarray:
        """The camera frame (``rgb_array``)."""
        return self._camera()

    def close(self) -> None:
        self._scene.close()
