"""CARLA driving under the VLA observation contract (needs a running CARLA server).

Uses the real ``carla`` client package (``pip install 'vla-ray[carla]'``, client 0.9.16: match the
server's version). The env connects to a CARLA server at ``host:port`` (default
``$CARLA_HOST``/``$CARLA_PORT``, else ``localhost:2000``), switches the world to **synchronous
mode** with a fixed time step (``fixed_delta_seconds``, 0.05 s = 20 Hz), spawns an ego vehicle
(``role_name=vla_ray_ego``) with a front RGB camera, a collision sensor and, with ``lidar=True``, a
roof ``sensor.lidar.ray_cast``, and plans a route of ``route_length`` metres along the lane from
the spawn point. Each ``step`` applies the control and calls ``world.tick()`` once.

Observations (Dict):

- ``image``: uint8 (H, W, 3) RGB from the front camera (64x64 by default, ``image_size``, ``fov``);
- ``state``: float32: ``speed / target_speed``, lateral offset from the lane centre in half lane
  widths, sin and cos of the heading error, route progress, then the next ``route_lookahead``
  route waypoints in the ego frame (x, y in units of 10 m); with ``lidar=True`` it is followed
  by ``lidar_bins`` values: the nearest LiDAR return per horizontal sector (obstacles above the
  road, 360 degrees), divided by ``lidar_range`` (1 = nothing within range);
- ``instruction`` + ``instruction_mask``: "drive safely and follow the route" (or
  ``instruction=...``).

Actions: ``[throttle_or_brake, steer]`` in ``[-1, 1]^2``; positive first values are throttle,
negative ones brake.

Reward: ``lane_keeping_weight * lane + progress_weight * progress - collision_penalty *
collided``, where ``lane`` = 1 - |lateral offset| / half lane width (0 beyond) times the cosine of
the heading error, and ``progress`` = route metres gained this step / (``target_speed`` * dt),
clipped to ``[0, 1]``. Terminates on a collision, when the car is more than ``max_lateral_offset``
metres from the lane centre, or when the route is complete; truncates after ``max_steps``.
``info``: ``collision``, ``route_progress`` (0..1), ``is_success`` (route complete without a
collision), ``speed`` (m/s), ``lane_offset`` (m), ``lane_invasions``.

``close()`` destroys every actor the env spawned and restores the world's settings (asynchronous
mode). When no server answers, construction raises :class:`CarlaConnectionError` naming host and
port after ``connect_timeout`` seconds.

Many servers per run (one per sub-environment; a CARLA server steps one synchronous world):

- ``servers="host:port,host:port,..."`` (or a list), or ``base_port`` + ``num_servers`` (+
  ``port_stride``, default 3: a server also uses its port + 1 for streaming and + 2 as the
  multi-GPU secondary port; ``host``). Server ``i`` gets Traffic Manager port
  ``traffic_manager_port + i`` (the NPC traffic of ``num_npc_vehicles``).
- ``server_assignment="by_index"`` (default): EnvRunner ``w`` of ``W`` (RLlib's ``worker_index``;
  0 is the driver's local runner, which samples when ``W = 0``) takes the servers
  ``r, r + W, r + 2W, ...`` (``r = w - 1``) and each of its sub-environments claims the first of
  them not yet taken (an ``flock`` on this machine, released at ``close()`` or process exit; RLlib's
  new stack gives every sub-env of a runner the same ``vector_index``, so the claim numbers them,
  in ``sync`` and ``async`` vectorisation alike). ``"first_free"``: any server of the list not yet
  taken on this machine (servers running beside the EnvRunners, as on ``cluster.yaml``'s CARLA
  nodes: ``servers=localhost:2000,localhost:2003,...``).
- Too few servers raise :class:`TooFewServersError` naming how many the run needs and how many
  were given: at the start of training (:func:`check_server_count`), and in a sub-env that finds
  all its servers taken.

``python -m vla_ray.envs.carla_servers --n N --base-port P`` starts N server containers on a node.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import re
import tempfile
from dataclasses import dataclass
from typing import IO, Any

import gymnasium as gym
import numpy as np

from .pusht import encode_instruction

INSTRUCTION = "drive safely and follow the route"
EGO_ROLE = "vla_ray_ego"
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 2000
EGO_FEATURES = 5
STATE_BOUND = 10.0


DEFAULT_PORT_STRIDE = 3
DEFAULT_TM_PORT = 8000
SERVER_ASSIGNMENTS = ("by_index", "first_free")


class CarlaConnectionError(ConnectionError):
    """No CARLA server answered at the given host and port."""


class TooFewServersError(ValueError):
    """A run has more CARLA sub-environments than servers (each needs its own)."""


@dataclass(frozen=True)
class CarlaServer:
    """One CARLA server: its RPC address and the Traffic Manager port its client uses."""

    host: str
    port: int
    tm_port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _check_port(name: str, value: Any) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected an integer port, got {value!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"{name}: expected a port in 1..65535, got {port}")
    return port


def server_list(
    servers: str | list[str] | None = None,
    *,
    host: str | None = None,
    base_port: int | None = None,
    num_servers: int | None = None,
    port_stride: int = DEFAULT_PORT_STRIDE,
    traffic_manager_port: int = DEFAULT_TM_PORT,
) -> list[CarlaServer] | None:
    """The run's servers from ``servers`` ("host:port,..." or a list) or ``base_port`` +
    ``num_servers``; None when neither is given (one server: ``host``/``port``)."""
    tm = _check_port("traffic_manager_port", traffic_manager_port)
    if servers is not None and (base_port is not None or num_servers is not None):
        raise ValueError("servers: give a server list or base_port + num_servers, not both")
    if servers is not None:
        items = servers.split(",") if isinstance(servers, str) else list(servers)
        out = []
        for i, item in enumerate(items):
            name, sep, port = str(item).strip().rpartition(":")
            if not sep or not name:
                raise ValueError(f"servers[{i}]: expected host:port, got {item!r}")
            out.append(CarlaServer(name, _check_port(f"servers[{i}]", port), tm + i))
        if not out:
            raise ValueError("servers: expected at least one host:port, got none")
        return out
    if base_port is None and num_servers is None:
        return None
    if base_port is None or num_servers is None:
        raise ValueError(
            "base_port/num_servers: give both (servers at base_port + i * port_stride)"
        )
    if not isinstance(num_servers, int) or num_servers < 1:
        raise ValueError(f"num_servers: expected a positive integer, got {num_servers!r}")
    if not isinstance(port_stride, int) or port_stride < 1:
        raise ValueError(f"port_stride: expected a positive integer, got {port_stride!r}")
    base = _check_port("base_port", base_port)
    _check_port(
        "base_port + (num_servers - 1) * port_stride", base + (num_servers - 1) * port_stride
    )
    host = host or os.environ.get("CARLA_HOST") or DEFAULT_HOST
    return [CarlaServer(host, base + i * port_stride, tm + i) for i in range(num_servers)]


def needed_servers(num_env_runners: int, num_envs_per_env_runner: int) -> int:
    """Servers a run needs: one per sub-env (the driver's runner samples when there are none)."""
    return max(int(num_env_runners), 1) * max(int(num_envs_per_env_runner), 1)


def check_server_count(
    env_config: dict[str, Any], num_env_runners: int, num_envs_per_env_runner: int
) -> None:
    """TooFewServersError unless ``env_config`` lists a server for every sub-env of the run."""
    keys = ("servers", "host", "base_port", "num_servers", "port_stride", "traffic_manager_port")
    servers = server_list(**{k: env_config[k] for k in keys if k in env_config})
    given = 1 if servers is None else len(servers)
    needed = needed_servers(num_env_runners, num_envs_per_env_runner)
    if given < needed:
        where = "env.servers" if servers is not None else "one server (env.host/env.port)"
        runners = max(int(num_env_runners), 1)
        raise TooFewServersError(
            f"CARLA: {runners} EnvRunner(s) x {num_envs_per_env_runner} sub-env(s) each need "
            f"{needed} servers (one per sub-env), got {given} ({where}); start more "
            f"(python -m vla_ray.envs.carla_servers --n {needed}) and list them in env.servers "
            "or env.base_port + env.num_servers, or lower --num-env-runners / "
            "env_runners.num_envs_per_env_runner"
        )


def runner_slots(worker_index: int, num_workers: int, num_servers: int) -> list[int]:
    """Server indices EnvRunner ``worker_index`` of ``num_workers`` may use, in claim order."""
    runners = max(int(num_workers), 1)
    first = int(worker_index) - 1 if worker_index > 0 else 0
    return list(range(first, num_servers, runners))


def _lock_path(server: CarlaServer) -> str:
    name = re.sub(r"[^A-Za-z0-9.-]", "_", server.host)
    folder = os.path.join(tempfile.gettempdir(), "vla_ray_carla")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{name}_{server.port}.lock")


def claim_server(servers: list[CarlaServer], slots: list[int]) -> tuple[CarlaServer, IO]:
    """The first server of ``slots`` no other process (or env) of this machine holds, and the
    open lock file that holds it (close it to give the server back)."""
    import fcntl

    for i in slots:
        handle = open(_lock_path(servers[i]), "a")  # noqa: SIM115 (held for the env's lifetime)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return servers[i], handle
    taken = ", ".join(servers[i].address for i in slots) or "none"
    raise TooFewServersError(
        f"CARLA: every server this sub-env may use is taken by another sub-env ({taken}; "
        f"{len(servers)} servers given in all): each sub-env needs its own server; give "
        "num_env_runners x num_envs_per_env_runner servers (env.servers or env.base_port + "
        "env.num_servers), or lower --num-env-runners / env_runners.num_envs_per_env_runner"
    )


def assign_server(
    servers: list[CarlaServer], assignment: str, worker_index: int, num_workers: int
) -> tuple[CarlaServer, IO]:
    """The server of one sub-env (see the module docstring), claimed on this machine."""
    if assignment not in SERVER_ASSIGNMENTS:
        raise ValueError(
            f"server_assignment: unknown name {assignment!r}; valid names are "
            f"{', '.join(SERVER_ASSIGNMENTS)}"
        )
    if assignment == "first_free":
        return claim_server(servers, list(range(len(servers))))
    return claim_server(servers, runner_slots(worker_index, num_workers, len(servers)))


def server_address(host: str | None = None, port: int | None = None) -> tuple[str, int]:
    """``(host, port)``: the arguments, else ``$CARLA_HOST``/``$CARLA_PORT``, else localhost:2000."""
    host = host or os.environ.get("CARLA_HOST") or DEFAULT_HOST
    raw = port if port is not None else os.environ.get("CARLA_PORT", DEFAULT_PORT)
    try:
        port = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"port: expected an integer (CARLA_PORT), got {raw!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port: expected 1..65535, got {port}")
    return host, port


def connect(host: str | None = None, port: int | None = None, timeout: float = 5.0):
    """A ``carla.Client`` that has answered; CarlaConnectionError naming host:port otherwise."""
    try:
        import carla
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "the CARLA env needs the carla client package: pip install 'vla-ray[carla]'"
        ) from err
    host, port = server_address(host, port)
    client = carla.Client(host, port)
    client.set_timeout(float(timeout))
    try:
        client.get_server_version()
    except RuntimeError as err:
        raise CarlaConnectionError(
            f"CARLA: no server answered at {host}:{port} within {timeout:g} s ({err}). Start one "
            "(e.g. docker run --rm --gpus all --net=host carlasim/carla:0.9.16 "
            "bash CarlaUE4.sh -RenderOffScreen) or point CARLA_HOST/CARLA_PORT at it."
        ) from None
    return client


class CarlaDrivingEnv(gym.Env):
    """Ego vehicle + RGB camera (+ LiDAR) in a CARLA world, stepped synchronously."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        servers: str | list[str] | None = None,
        base_port: int | None = None,
        num_servers: int | None = None,
        port_stride: int = DEFAULT_PORT_STRIDE,
        traffic_manager_port: int = DEFAULT_TM_PORT,
        server_assignment: str = "by_index",
        worker_index: int = 0,
        num_workers: int = 0,
        num_npc_vehicles: int = 0,
        connect_timeout: float = 5.0,
        timeout: float = 20.0,
        town: str | None = None,
        image_size: int | tuple[int, int] | list[int] = (64, 64),
        fov: float = 90.0,
        fixed_delta_seconds: float = 0.05,
        lidar: bool = False,
        lidar_bins: int = 32,
        lidar_range: float = 30.0,
        vehicle_filter: str = "vehicle.tesla.model3",
        route_length: float = 200.0,
        route_lookahead: int = 3,
        target_speed: float = 8.0,
        max_steps: int = 1000,
        max_lateral_offset: float = 3.0,
        lane_keeping_weight: float = 0.5,
        progress_weight: float = 0.5,
        collision_penalty: float = 5.0,
        instruction: str = INSTRUCTION,
        instruction_max_length: int = 16,
        tokenizer: str | None = None,
        render_mode: str | None = "rgb_array",
    ):
        if isinstance(image_size, (int, np.integer)):
            h = w = int(image_size)
        else:
            h, w = (int(v) for v in image_size)
        if h < 8 or w < 8:
            raise ValueError(f"image_size: expected at least 8x8 pixels, got {h}x{w}")
        if not fixed_delta_seconds > 0:
            raise ValueError(f"fixed_delta_seconds: expected > 0, got {fixed_delta_seconds!r}")
        pool = server_list(
            servers,
            host=host,
            base_port=base_port,
            num_servers=num_servers,
            port_stride=port_stride,
            traffic_manager_port=traffic_manager_port,
        )
        self._server_lock: IO | None = None
        if pool is None:
            self.host, self.port = server_address(host, port)
            self.tm_port = _check_port("traffic_manager_port", traffic_manager_port)
        else:
            if port is not None:
                raise ValueError("port: not used with servers/base_port (one port per server)")
            server, self._server_lock = assign_server(
                pool, server_assignment, worker_index, num_workers
            )
            self.host, self.port, self.tm_port = server.host, server.port, server.tm_port
        if not isinstance(num_npc_vehicles, int) or num_npc_vehicles < 0:
            raise ValueError(
                f"num_npc_vehicles: expected an integer >= 0, got {num_npc_vehicles!r}"
            )
        self.num_npc_vehicles = num_npc_vehicles
        self._traffic_manager = None
        self.render_mode = render_mode
        self.image_hw = (h, w)
        self.fov = float(fov)
        self.dt = float(fixed_delta_seconds)
        self.lidar = bool(lidar)
        self.lidar_bins = int(lidar_bins)
        self.lidar_range = float(lidar_range)
        self.vehicle_filter = vehicle_filter
        self.route_length = float(route_length)
        self.route_lookahead = int(route_lookahead)
        self.target_speed = float(target_speed)
        self.max_steps = int(max_steps)
        self.max_lateral_offset = float(max_lateral_offset)
        self.weights = (float(lane_keeping_weight), float(progress_weight))
        self.collision_penalty = float(collision_penalty)
        self.timeout = float(timeout)
        self.instruction = instruction
        self._ids, self._mask, vocab = encode_instruction(
            instruction, instruction_max_length, tokenizer
        )
        L = int(instruction_max_length)
        n_state = EGO_FEATURES + 2 * self.route_lookahead + (self.lidar_bins if self.lidar else 0)
        self.observation_space = gym.spaces.Dict(
            {
                "image": gym.spaces.Box(0, 255, (h, w, 3), np.uint8),
                "state": gym.spaces.Box(-STATE_BOUND, STATE_BOUND, (n_state,), np.float32),
                "instruction": gym.spaces.Box(0, vocab - 1, (L,), np.int64),
                "instruction_mask": gym.spaces.Box(0, 1, (L,), np.int64),
            }
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

        import carla

        self._carla = carla
        try:
            self.client = connect(self.host, self.port, connect_timeout)
        except BaseException:
            self._release_server()
            raise
        self.client.set_timeout(self.timeout)
        self.world = self.client.load_world(town) if town else self.client.get_world()
        self._original_settings = self.world.get_settings()
        settings = self.world.get_settings()
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = self.dt
        self.world.apply_settings(settings)
        self.map = self.world.get_map()
        self._actors: list[Any] = []
        self._sensors: list[Any] = []
        self._queues: dict[str, queue.Queue] = {}
        self._collided = False
        self._lane_invasions = 0
        self.vehicle = None
        self._route: list[Any] = []
        self._route_index = 0
        self._steps = 0
        self._last_image = np.zeros((h, w, 3), np.uint8)

    # -- actors ----------------------------------------------------------------------------------
    def _destroy_actors(self) -> None:
        carla = self._carla
        for sensor in self._sensors:
            with contextlib.suppress(RuntimeError):
                sensor.stop()
        ids = [a.id for a in self._sensors + self._actors]
        if ids:
            self.client.apply_batch_sync([carla.command.DestroyActor(i) for i in ids], True)
        self._sensors, self._actors, self._queues = [], [], {}
        self.vehicle = None

    def _attach(self, name: str, blueprint, transform) -> None:
        sensor = self.world.spawn_actor(blueprint, transform, attach_to=self.vehicle)
        self._sensors.append(sensor)
        q: queue.Queue = queue.Queue()
        self._queues[name] = q
        sensor.listen(q.put)

    def _spawn(self) -> None:
        carla = self._carla
        library = self.world.get_blueprint_library()
        candidates = library.filter(self.vehicle_filter) or library.filter("vehicle.*")
        bp = candidates[int(self.np_random.integers(len(candidates)))]
        bp.set_attribute("role_name", EGO_ROLE)
        points = self.map.get_spawn_points()
        if not points:
            raise RuntimeError(f"CARLA map {self.map.name!r} has no spawn points")
        order = self.np_random.permutation(len(points))
        for i in order[:20]:
            self.vehicle = self.world.try_spawn_actor(bp, points[int(i)])
            if self.vehicle is not None:
                break
        if self.vehicle is None:
            raise RuntimeError("CARLA: could not spawn the ego vehicle (20 spawn points occupied)")
        self._actors.append(self.vehicle)
        h, w = self.image_hw
        cam = library.find("sensor.camera.rgb")
        cam.set_attribute("image_size_x", str(w))
        cam.set_attribute("image_size_y", str(h))
        cam.set_attribute("fov", str(self.fov))
        cam.set_attribute("sensor_tick", "0.0")
        self._attach("camera", cam, carla.Transform(carla.Location(x=1.5, z=2.4)))
        col = library.find("sensor.other.collision")
        self._attach("collision", col, carla.Transform())
        inv = library.find("sensor.other.lane_invasion")
        self._attach("lane_invasion", inv, carla.Transform())
        if self.lidar:
            lid = library.find("sensor.lidar.ray_cast")
            lid.set_attribute("range", str(self.lidar_range))
            lid.set_attribute("rotation_frequency", str(1.0 / self.dt))
            lid.set_attribute("channels", "16")
            lid.set_attribute("points_per_second", "56000")
            self._attach("lidar", lid, carla.Transform(carla.Location(z=2.4)))
        if self.num_npc_vehicles:
            self._spawn_traffic(library, points, order[20:])

    def _spawn_traffic(self, library, points, order) -> None:
        """NPC vehicles on autopilot, driven by this env's own Traffic Manager port."""
        if self._traffic_manager is None:
            self._traffic_manager = self.client.get_trafficmanager(self.tm_port)
            self._traffic_manager.set_synchronous_mode(True)
        self._traffic_manager.set_random_device_seed(int(self.np_random.integers(2**31)))
        vehicles = library.filter("vehicle.*")
        spawned = 0
        for i in order:
            if spawned >= self.num_npc_vehicles:
                break
            bp = vehicles[int(self.np_random.integers(len(vehicles)))]
            npc = self.world.try_spawn_actor(bp, points[int(i)])
            if npc is not None:
                npc.set_autopilot(True, self.tm_port)
                self._actors.append(npc)
                spawned += 1

    def _plan_route(self) -> None:
        wp = self.map.get_waypoint(self.vehicle.get_location(), project_to_road=True)
        route, travelled, spacing = [wp], 0.0, 2.0
        while travelled < self.route_length:
            nxt = wp.next(spacing)
            if not nxt:
                break
            wp = nxt[0]
            route.append(wp)
            travelled += spacing
        self._route = route
        self._route_index = 0

    # -- sensing ---------------------------------------------------------------------------------
    def _get(self, name: str, frame: int):
        """The sensor message of ``frame`` (older ones are dropped)."""
        q = self._queues[name]
        while True:
            data = q.get(timeout=self.timeout)
            if data.frame >= frame:
                return data

    def _drain_events(self) -> None:
        for name in ("collision", "lane_invasion"):
            q = self._queues.get(name)
            while q is not None and not q.empty():
                q.get_nowait()
                if name == "collision":
                    self._collided = True
                else:
                    self._lane_invasions += 1

    def _camera_image(self, frame: int) -> np.ndarray:
        image = self._get("camera", frame)
        bgra = np.frombuffer(image.raw_data, dtype=np.uint8).reshape(image.height, image.width, 4)
        return np.ascontiguousarray(bgra[:, :, 2::-1])

    def _lidar_features(self, frame: int) -> np.ndarray:
        scan = self._get("lidar", frame)
        pts = np.frombuffer(scan.raw_data, dtype=np.float32).reshape(-1, 4)[:, :3]
        out = np.ones(self.lidar_bins, np.float32)
        pts = pts[pts[:, 2] > -2.0]  # drop road returns (sensor 2.4 m above the ground)
        if len(pts):
            angle = np.arctan2(pts[:, 1], pts[:, 0])
            sector = ((angle + np.pi) / (2 * np.pi) * self.lidar_bins).astype(int)
            sector = np.clip(sector, 0, self.lidar_bins - 1)
            dist = np.linalg.norm(pts[:, :2], axis=1) / self.lidar_range
            np.minimum.at(out, sector, np.clip(dist, 0.0, 1.0).astype(np.float32))
        return out

    def _lane_geometry(self) -> tuple[float, float, float]:
        """(lateral offset in m, heading error in rad, half lane width in m)."""
        tf = self.vehicle.get_transform()
        wp = self.map.get_waypoint(tf.location, project_to_road=True)
        wt = wp.transform
        yaw = math.radians(wt.rotation.yaw)
        dx, dy = tf.location.x - wt.location.x, tf.location.y - wt.location.y
        lateral = -math.sin(yaw) * dx + math.cos(yaw) * dy
        err = math.radians(tf.rotation.yaw) - yaw
        err = (err + math.pi) % (2 * math.pi) - math.pi
        return lateral, err, max(wp.lane_width / 2.0, 0.5)

    def _advance_route(self) -> float:
        """Move the route index past waypoints the car has reached; metres gained."""
        loc = self.vehicle.get_location()
        best = self._route_index
        window = self._route[self._route_index : self._route_index + 20]
        dists = [loc.distance(wp.transform.location) for wp in window]
        if dists:
            best = self._route_index + int(np.argmin(dists))
        gained = 2.0 * max(0, best - self._route_index)
        self._route_index = max(self._route_index, best)
        return gained

    def _progress(self) -> float:
        return float(min(1.0, self._route_index / max(len(self._route) - 1, 1)))

    def _speed(self) -> float:
        v = self.vehicle.get_velocity()
        return float(math.sqrt(v.x**2 + v.y**2 + v.z**2))

    def _observe(self, frame: int) -> dict[str, np.ndarray]:
        lateral, err, half = self._lane_geometry()
        ego = [self._speed() / self.target_speed, lateral / half, math.sin(err), math.cos(err)]
        ego.append(self._progress())
        tf = self.vehicle.get_transform()
        yaw = math.radians(tf.rotation.yaw)
        ahead = []
        for k in range(1, self.route_lookahead + 1):
            wp = self._route[min(self._route_index + 3 * k, len(self._route) - 1)]
            dx = wp.transform.location.x - tf.location.x
            dy = wp.transform.location.y - tf.location.y
            ahead += [
                (math.cos(yaw) * dx + math.sin(yaw) * dy) / 10.0,
                (-math.sin(yaw) * dx + math.cos(yaw) * dy) / 10.0,
            ]
        parts = [np.asarray(ego + ahead, np.float32)]
        if self.lidar:
            parts.append(self._lidar_features(frame))
        state = np.clip(np.concatenate(parts), -STATE_BOUND, STATE_BOUND).astype(np.float32)
        self._last_image = self._camera_image(frame)
        return {
            "image": self._last_image,
            "state": state,
            "instruction": self._ids.copy(),
            "instruction_mask": self._mask.copy(),
        }

    # -- gymnasium API ---------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        self._destroy_actors()
        self._spawn()
        self._plan_route()
        self._collided, self._lane_invasions, self._steps = False, 0, 0
        frame = self.world.tick()
        self._drain_events()
        self._collided = False
        obs = self._observe(frame)
        info = dict(collision=False, route_progress=0.0, is_success=False, speed=self._speed())
        return obs, info

    def step(self, action: np.ndarray):
        if self.vehicle is None:
            raise RuntimeError("step: call reset() first")
        a = np.clip(np.asarray(action, dtype=np.float32).reshape(2), -1.0, 1.0)
        throttle, brake = float(max(a[0], 0.0)), float(max(-a[0], 0.0))
        self.vehicle.apply_control(
            self._carla.VehicleControl(throttle=throttle, brake=brake, steer=float(a[1]))
        )
        frame = self.world.tick()
        self._steps += 1
        self._drain_events()
        gained = self._advance_route()
        obs = self._observe(frame)
        lateral, err, half = self._lane_geometry()
        lane = max(0.0, 1.0 - abs(lateral) / half) * max(0.0, math.cos(err))
        progress = min(1.0, gained / (self.target_speed * self.dt))
        w_lane, w_progress = self.weights
        reward = w_lane * lane + w_progress * progress
        reward -= self.collision_penalty * float(self._collided)
        route_progress = self._progress()
        success = route_progress >= 1.0 and not self._collided
        terminated = self._collided or success or abs(lateral) > self.max_lateral_offset
        truncated = self._steps >= self.max_steps and not terminated
        info = dict(
            collision=self._collided,
            route_progress=route_progress,
            is_success=bool(success),
            speed=self._speed(),
            lane_offset=float(lateral),
            lane_invasions=self._lane_invasions,
        )
        return obs, float(reward), bool(terminated), bool(truncated), info

    def render(self) -> np.ndarray:
        """The last front-camera frame."""
        return self._last_image

    def close(self) -> None:
        """Destroy the spawned actors and give the world back its original settings."""
        if getattr(self, "world", None) is None:
            self._release_server()
            return
        try:
            self._destroy_actors()
            if self._traffic_manager is not None:
                self._traffic_manager.set_synchronous_mode(False)
            self.world.apply_settings(self._original_settings)
        finally:
            self.world = None
            self._release_server()

    def _release_server(self) -> None:
        """Give the claimed server back to this machine's other sub-envs."""
        lock, self._server_lock = getattr(self, "_server_lock", None), None
        if lock is not None:
            lock.close()
