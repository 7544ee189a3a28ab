"""Embedded driving: ``highway-env`` under the VLA observation contract.

The ego car drives on a straight multi-lane highway among IDM-controlled traffic (highway-env's
``HighwayEnvFast``: other cars do not collide with each other). Controls are continuous
(highway-env's ``ContinuousAction``): ``action = [throttle, steering]`` in ``[-1, 1]^2``, mapped to
an acceleration of ``[-5, 5]`` m/s^2 and a steering angle of ``[-pi/4, pi/4]`` rad.

Observations (Dict):

- ``image`` (``vla_ray/Highway-v0`` only): uint8 (H, W, 3) **RGB** bird's-eye camera that follows
  the ego car (highway-env's pygame renderer, drawn off-screen at the observation size, 64x64 by
  default, ``scaling`` pixels per metre). RGB, not grayscale, because the contract's ``image`` and
  every vision encoder are 3-channel; the ego car is drawn in its own colour.
- ``state``: float32 ``(3 + observed_vehicles * 7,)``: three ego lane features (lateral offset in
  half lane widths, heading error sin, speed / ``target_speed``) followed by highway-env's
  ``Kinematics`` observation flattened (rows: ego then the nearest ``observed_vehicles - 1`` cars;
  columns ``presence, x, y, vx, vy, cos_h, sin_h``, relative to the ego and normalised to
  ``[-1, 1]``).
- ``instruction`` + ``instruction_mask``: "keep the lane and avoid collisions" or "drive safely
  and follow the route" (drawn per episode; ``instruction=...`` fixes one).

Reward per step, with ``lane`` = 1 - |lateral offset| / (half lane width) (0 beyond) times the
cosine of the heading error, and ``progress`` = distance advanced along the road this step /
(``target_speed`` * step time), clipped to ``[0, 1]``::

    reward = on_road * (lane_keeping_weight * lane + progress_weight * progress)
             - collision_penalty * collided

The episode terminates on a collision, when the car leaves the road (``offroad_terminal``) or
when the route is complete (``route_progress`` reaches 1); highway-env truncates it after
``duration`` seconds. ``info`` carries ``collision`` (bool), ``route_progress`` (distance
travelled / ``route_length``, in ``[0, 1]``), ``is_success`` (route complete without a collision),
``speed``, ``lane_offset`` and ``on_road``, and the driving metrics' keys
(``vla_ray.driving.metrics``: ``route_completion`` = ``route_progress``, ``distance`` in metres
and ``mean_speed`` in m/s over the episode's steps so far), so that training and ``vla-ray eval``
report route completion, collision rate and mean speed.

Registered ids: ``vla_ray/Highway-v0`` (image + state) and ``vla_ray/HighwayState-v0`` (state only,
for state-only VLAs and fast tests). Any other highway-env setting goes in ``highway_config``.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # no display needed: drawing is off-screen
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

from .pusht import encode_instruction  # noqa: E402

INSTRUCTIONS = ("keep the lane and avoid collisions", "drive safely and follow the route")
FEATURES = ["presence", "x", "y", "vx", "vy", "cos_h", "sin_h"]
EGO_FEATURES = 3
STATE_BOUND = 5.0


class HighwayDrivingEnv(gym.Env):
    """highway-env with continuous control, camera + kinematics observations, lane-keeping,
    progress and collision reward (module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 5}

    def __init__(
        self,
        image: bool = True,
        image_size: int | tuple[int, int] | list[int] = (64, 64),
        scaling: float = 2.5,
        instruction: str | None = None,
        instruction_max_length: int = 16,
        tokenizer: str | None = None,
        lanes_count: int = 3,
        vehicles_count: int = 20,
        observed_vehicles: int = 5,
        duration: float = 20.0,
        policy_frequency: int = 5,
        simulation_frequency: int = 10,
        target_speed: float = 25.0,
        route_length: float = 400.0,
        lane_keeping_weight: float = 0.5,
        progress_weight: float = 0.5,
        collision_penalty: float = 5.0,
        offroad_terminal: bool = True,
        highway_config: dict[str, Any] | None = None,
        render_mode: str | None = "rgb_array",
    ):
        try:
            from highway_env.envs.highway_env import HighwayEnvFast
        except ImportError as err:  # pragma: no cover - depends on the install
            raise ImportError(
                "vla_ray/Highway-v0 needs the highway-env package: pip install 'vla-ray[envs]'"
            ) from err
        if isinstance(image_size, (int, np.integer)):
            h = w = int(image_size)
        else:
            h, w = (int(v) for v in image_size)
        if image and (h < 8 or w < 8):
            raise ValueError(f"image_size: expected at least 8x8 pixels, got {h}x{w}")
        for name, value in (
            ("route_length", route_length),
            ("target_speed", target_speed),
            ("duration", duration),
        ):
            if not value > 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
        if int(observed_vehicles) < 1:
            raise ValueError(f"observed_vehicles: expected >= 1, got {observed_vehicles!r}")
        self.image = bool(image)
        self.render_mode = render_mode
        self.target_speed = float(target_speed)
        self.route_length = float(route_length)
        self.weights = (float(lane_keeping_weight), float(progress_weight))
        self.collision_penalty = float(collision_penalty)
        self.offroad_terminal = bool(offroad_terminal)
        self.fixed_instruction = instruction
        texts = (instruction,) if instruction else INSTRUCTIONS
        encoded = [encode_instruction(t, instruction_max_length, tokenizer) for t in texts]
        self._instructions = [
            (t, ids, mask) for t, (ids, mask, _) in zip(texts, encoded, strict=True)
        ]
        vocab = encoded[0][2]
        config = {
            "observation": {
                "type": "Kinematics",
                "vehicles_count": int(observed_vehicles),
                "features": FEATURES,
                "absolute": False,
                "normalize": True,
                "clip": True,
            },
            "action": {"type": "ContinuousAction", "longitudinal": True, "lateral": True},
            "lanes_count": int(lanes_count),
            "vehicles_count": int(vehicles_count),
            "duration": float(duration),
            "policy_frequency": int(policy_frequency),
            "simulation_frequency": int(simulation_frequency),
            "offroad_terminal": self.offroad_terminal,
            "screen_width": w,
            "screen_height": h,
            "scaling": float(scaling),
            "centering_position": [0.3, 0.5],
            "offscreen_rendering": True,
        }
        config.update(highway_config or {})
        self._env = HighwayEnvFast(config=config, render_mode="rgb_array")
        self._dt = 1.0 / float(self._env.config["policy_frequency"])
        n_state = EGO_FEATURES + int(observed_vehicles) * len(FEATURES)
        L = int(instruction_max_length)
        spaces: dict[str, gym.Space] = {}
        if self.image:
            spaces["image"] = gym.spaces.Box(0, 255, (h, w, 3), np.uint8)
        spaces["state"] = gym.spaces.Box(-STATE_BOUND, STATE_BOUND, (n_state,), np.float32)
        spaces["instruction"] = gym.spaces.Box(0, vocab - 1, (L,), np.int64)
        spaces["instruction_mask"] = gym.spaces.Box(0, 1, (L,), np.int64)
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.instruction = texts[0]
        self._inst = self._instructions[0]
        self._x0 = 0.0
        self._x_prev = 0.0
        self._speed_sum = 0.0
        self._steps = 0

    # -- helpers -------------------------------------------------------------------------------
    def _lane_geometry(self) -> tuple[float, float, float]:
        """(lateral offset / half lane width, heading error, longitudinal position)."""
        env = self._env
        vehicle = env.vehicle
        lane = env.road.network.get_lane(vehicle.lane_index)
        s, lateral = lane.local_coordinates(vehicle.position)
        half = max(lane.width_at(s) / 2.0, 1e-6)
        heading_err = float(vehicle.heading - lane.heading_at(s))
        heading_err = (heading_err + np.pi) % (2 * np.pi) - np.pi
        return float(lateral / half), heading_err, float(vehicle.position[0])

    def _camera(self) -> np.ndarray:
        if self._env.viewer is None:
            from highway_env.envs.common.graphics import EnvViewer

            self._env.viewer = EnvViewer(self._env)
        # the viewer turns itself off under SDL_VIDEODRIVER=dummy; off-screen drawing needs no display
        self._env.viewer.enabled = True
        frame = self._env.render()
        # render() asks highway-env to also draw every intermediate simulation frame (for videos)
        self._env.enable_auto_render = False
        return np.ascontiguousarray(frame, dtype=np.uint8)

    def _obs(self, kinematics: np.ndarray) -> dict[str, np.ndarray]:
        offset, heading_err, _ = self._lane_geometry()
        speed = float(self._env.vehicle.speed) / self.target_speed
        ego = np.array([offset, np.sin(heading_err), speed], dtype=np.float32)
        state = np.concatenate([ego, np.asarray(kinematics, dtype=np.float32).reshape(-1)])
        obs: dict[str, np.ndarray] = {}
        if self.image:
            obs["image"] = self._camera()
        obs["state"] = np.clip(np.nan_to_num(state), -STATE_BOUND, STATE_BOUND).astype(np.float32)
        obs["instruction"] = self._inst[1].copy()
        obs["instruction_mask"] = self._inst[2].copy()
        return obs

    # -- gymnasium API ---------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        kin, _ = self._env.reset(seed=seed, options=options)
        self._inst = self._instructions[int(self.np_random.integers(len(self._instructions)))]
        self.instruction = self._inst[0]
        _, _, x = self._lane_geometry()
        self._x0 = self._x_prev = x
        self._speed_sum, self._steps = 0.0, 0
        speed = float(self._env.vehicle.speed)
        info = dict(
            collision=False,
            route_progress=0.0,
            route_completion=0.0,
            distance=0.0,
            mean_speed=speed,
            is_success=False,
            speed=speed,
            instruction=self.instruction,
        )
        return self._obs(kin), info

    def step(self, action: np.ndarray):
        a = np.clip(np.asarray(action, dtype=np.float32).reshape(2), -1.0, 1.0)
        kin, _, terminated, truncated, _ = self._env.step(a)
        vehicle = self._env.vehicle
        offset, heading_err, x = self._lane_geometry()
        collided = bool(vehicle.crashed)
        on_road = bool(vehicle.on_road)
        lane = max(0.0, 1.0 - abs(offset)) * max(0.0, float(np.cos(heading_err)))
        progress = float(np.clip((x - self._x_prev) / (self.target_speed * self._dt), 0.0, 1.0))
        self._x_prev = x
        w_lane, w_progress = self.weights
        reward = float(on_road) * (w_lane * lane + w_progress * progress)
        reward -= self.collision_penalty * float(collided)
        route_progress = float(np.clip((x - self._x0) / self.route_length, 0.0, 1.0))
        success = route_progress >= 1.0 and not collided
        self._speed_sum += float(vehicle.speed)
        self._steps += 1
        terminated = bool(terminated or collided or success)
        if self.offroad_terminal and not on_road:
            terminated = True
        info = dict(
            collision=collided,
            route_progress=route_progress,
            route_completion=route_progress,
            distance=float(x - self._x0),
            mean_speed=self._speed_sum / self._steps,
            is_success=bool(success),
            speed=float(vehicle.speed),
            lane_offset=float(offset),
            on_road=on_road,
            instruction=self.instruction,
        )
        return self._obs(kin), reward, terminated, bool(truncated) and not terminated, info

    def render(self) -> np.ndarray:
        """The camera frame (``rgb_array``), as in the ``image`` observation."""
        return self._camera()

    def close(self) -> None:
        self._env.close()
