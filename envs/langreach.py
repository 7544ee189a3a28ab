"""LangReach: a language-conditioned MuJoCo reaching task observed from pixels.

A white point mass moves on a dark ``[-1, 1]^2`` arena containing ``num_targets`` flat discs of
distinct colours. Each episode names one colour in a templated instruction ("go to the red ball");
the agent must drive to that disc. Observations are a top-down RGB image, the agent's own
position/velocity (target positions are *not* in the state, so the policy has to see them) and
the tokenised instruction. ``instruction_mode="blind"`` replaces the instruction with a constant
colour-free sentence: the language-blind control, whose best success rate is ~``1/num_targets``.

``observation="state"`` (registered as ``vla_ray/LangReachState-v0``) is the same task without
pixels: no ``image``, and the state holds every target's position after the agent's position and
velocity, ``[x, y, vx, vy, tx_0, ty_0, ..., tx_{n-1}, ty_{n-1}]``, so the instruction still has
to pick the target (its colour is the target's index). Nothing is rendered per step: a small,
fast task for state-only VLAs (e.g. the SAC learning test).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import weakref
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402

# name -> rgb; the first ``num_targets`` entries are used.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "purple": (0.6, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
TEMPLATES: tuple[str, ...] = (
    "reach the {c} target",
    "go to the {c} ball",
    "move to the {c} goal",
    "touch the {c} one",
    "navigate to the {c} marker",
    "head for the {c} dot",
)
BLIND_INSTRUCTION = "reach the target"
# "first_step": the instruction at an episode's first step, the blind sentence afterwards (a
# policy must remember the colour: the memory check of ``model.temporal``)
INSTRUCTION_MODES = ("text", "blind", "first_step")
OBSERVATION_MODES = ("pixels", "state")
# the scene's cameras, in the order of the ``images`` observation (``num_cameras`` > 1): the
# top-down view, and a view from the arena's -y side looking down at 37 degrees
CAMERAS = ("top", "side")

ARENA_HALF = 1.0
SPAWN_HALF = 0.8
MIN_TARGET_SEPARATION = 0.4
MIN_AGENT_CLEARANCE = 0.35
AGENT_RADIUS = 0.06
TARGET_RADIUS = 0.09
TIMESTEP = 0.02
FRAME_SKIP = 5
MAX_SPEED = 1.0
SHAPING_SCALE = 10.0
SUCCESS_BONUS = 5.0
RENDER_SIZE = 256
EXPERT_GAIN = 6.0


def _scene_xml(num_targets: int, offscreen: int) -> str:
    """MJCF of the arena with ``num_targets`` mocap target discs and the point-mass agent."""
    targets = "\n".join(
        f'    <body name="target{i}" mocap="true" pos="0 0 0.002">\n'
        f'      <geom name="target{i}" type="cylinder" size="{TARGET_RADIUS} 0.001" '
        f'contype="0" conaffinity="0" material="target{i}"/>\n'
        f"    </body>"
        for i in range(num_targets)
    )
    materials = "\n".join(
        f'    <material name="target{i}" rgba="{r} {g} {b} 1" specular="0" shininess="0" '
        f'reflectance="0"/>'
        for i, (r, g, b) in enumerate(list(COLORS.values())[:num_targets])
    )
    lim = ARENA_HALF - AGENT_RADIUS
    return f"""
<mujoco model="langreach">
  <compiler angle="radian"/>
  <option timestep="{TIMESTEP}" gravity="0 0 0" integrator="implicitfast"/>
  <visual>
    <global offwidth="{offscreen}" offheight="{offscreen}"/>
    <quality shadowsize="0" offsamples="0"/>
    <headlight ambient="0.4 0.4 0.4" diffuse="0 0 0" specular="0 0 0"/>
  </visual>
  <asset>
    <material name="floor" rgba=".15 .15 .15 1" specular="0" shininess="0" reflectance="0"/>
    <material name="agent" rgba="1 1 1 1" specular="0" shininess="0" reflectance="0"/>
{materials}
  </asset>
  <worldbody>
    <light name="top" directional="true" pos="0 0 3" dir="0 0 -1" castshadow="false"
           diffuse="0.6 0.6 0.6" specular="0 0 0"/>
    <camera name="top" pos="0 0 2.5" xyaxes="1 0 0 0 1 0" fovy="45"/>
    <camera name="side" pos="0 -1.5 1.3" xyaxes="1 0 0 0 0.6 0.8" fovy="75"/>
    <geom name="floor" type="plane" size="{ARENA_HALF} {ARENA_HALF} 0.1" material="floor"
          contype="0" conaffinity="0"/>
{targets}
    <body name="agent" pos="0 0 {AGENT_RADIUS}">
      <joint name="x" type="slide" axis="1 0 0" range="{-lim} {lim}" limited="true" damping="0"/>
      <joint name="y" type="slide" axis="0 1 0" range="{-lim} {lim}" limited="true" damping="0"/>
      <geom name="agent" type="sphere" size="{AGENT_RADIUS}" mass="1" material="agent"
            contype="0" conaffinity="0"/>
    </body>
  </worldbody>
  <actuator>
    <velocity name="vx" joint="x" kv="100" ctrlrange="-1 1" ctrllimited="true"/>
    <velocity name="vy" joint="y" kv="100" ctrlrange="-1 1" ctrllimited="true"/>
  </actuator>
</mujoco>
"""


@functools.lru_cache(maxsize=32)
def _encode_table(
    tokenizer: str | None, max_length: int, texts: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], int]:
    """Token ids, masks, untruncated token counts and vocab size of ``texts`` (cached)."""
    from vla_ray.tokenizer import encode_instructions, load_tokenizer

    tok = load_tokenizer(tokenizer)
    ids, mask = encode_instructions(list(texts), max_length, tok)
    lengths = tuple(len(x) for x in tok(list(texts), add_special_tokens=False)["input_ids"])
    ids.setflags(write=False)
    mask.setflags(write=False)
    return ids, mask, lengths, len(tok)


_LIVE_ENVS: weakref.WeakSet[LangReachEnv] = weakref.WeakSet()


@atexit.register
def _close_live_envs() -> None:
    """Free renderers before interpreter teardown (PyOpenGL fails if freed during it)."""
    for env in list(_LIVE_ENVS):
        env.close()


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """Validate an integer constructor argument in ``[low, high]``."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if ok:
        ok = value >= low and (high is None or value <= high)
    if not ok:
        allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"LangReachEnv: `{name}` must be {allowed}, got {value!r}")
    return int(value)


class LangReachEnv(gym.Env):
    """Language-conditioned point-mass reaching in MuJoCo, observed from pixels (or state)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        image_size: int = 64,
        num_targets: int = 3,
        max_episode_steps: int = 50,
        instruction_max_length: int = 16,
        instruction_mode: str = "text",
        success_radius: float = 0.1,
        render_mode: str | None = None,
        tokenizer: str | os.PathLike | None = None,
        observation: str = "pixels",
        num_cameras: int = 1,
    ) -> None:
        self.image_size = _check_int("image_size", image_size, 8, 1024)
        self.num_targets = _check_int("num_targets", num_targets, 1, len(COLORS))
        self.max_episode_steps = _check_int("max_episode_steps", max_episode_steps, 1)
        self.instruction_max_length = _check_int(
            "instruction_max_length", instruction_max_length, 1
        )
        if instruction_mode not in INSTRUCTION_MODES:
            raise ValueError(
                f"LangReachEnv: `instruction_mode` must be one of {INSTRUCTION_MODES}, "
                f"got {instruction_mode!r}"
            )
        self.instruction_mode = instruction_mode
        if observation not in OBSERVATION_MODES:
            raise ValueError(
                f"LangReachEnv: `observation` must be one of {OBSERVATION_MODES}, "
                f"got {observation!r}"
            )
        self.observation = observation
        self.num_cameras = _check_int("num_cameras", num_cameras, 1, len(CAMERAS))
        if self.num_cameras > 1 and observation != "pixels":
            raise ValueError(
                f"LangReachEnv: `num_cameras` > 1 needs observation='pixels', got {observation!r}"
            )
        if (
            isinstance(success_radius, bool)
            or not isinstance(success_radius, (int, float, np.floating, np.integer))
            or not 0.0 < float(success_radius) < 1.0
        ):
            raise ValueError(
                f"LangReachEnv: `success_radius` must be a float in (0, 1), got {success_radius!r}"
            )
        self.success_radius = float(success_radius)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"LangReachEnv: `render_mode` must be None or one of "
                f"{self.metadata['render_modes']}, got {render_mode!r}"
            )
        self.render_mode = render_mode
        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
            raise ValueError(
                f"LangReachEnv: `tokenizer` must be None or a path/model id string, "
                f"got {tokenizer!r}"
            )

        self.color_names: tuple[str, ...] = tuple(COLORS)[: self.num_targets]
        # Instruction table: texts[t * num_targets + c] for template t and colour c; blind last.
        self._texts: tuple[str, ...] = tuple(
            tpl.format(c=c) for tpl in TEMPLATES for c in self.color_names
        ) + (BLIND_INSTRUCTION,)
        tok_key = None if tokenizer is None else os.fspath(tokenizer)
        self._ids, self._mask, lengths, vocab_size = _encode_table(
            tok_key, self.instruction_max_length, self._texts
        )
        if max(lengths) > self.instruction_max_length:
            raise ValueError(
                f"LangReachEnv: `instruction_max_length` must be >= {max(lengths)} (the longest "
                f"instruction in tokens) so the colour is not truncated, got "
                f"{instruction_max_length!r}"
            )
        self.vocab_size = int(vocab_size)

        self.model = mujoco.MjModel.from_xml_string(
            _scene_xml(self.num_targets, max(RENDER_SIZE, self.image_size))
        )
        # Kept in the XML too; set here so a renderer never gets MSAA/shadows (50x slower on CPU).
        self.model.vis.quality.offsamples = 0
        self.model.vis.quality.shadowsize = 0
        self.data = mujoco.MjData(self.model)
        self._camera = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, "top")
        self._cameras = [
            mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, name)
            for name in CAMERAS[: self.num_cameras]
        ]
        self._renderer: mujoco.Renderer | None = None
        self._video_renderer: mujoco.Renderer | None = None
        _LIVE_ENVS.add(self)

        s = self.image_size
        L = self.instruction_max_length
        obs_spaces: dict[str, spaces.Space] = {}
        if self.observation == "pixels":
            obs_spaces["image"] = spaces.Box(0, 255, (s, s, 3), np.uint8)
            if self.num_cameras > 1:  # every camera; ``image`` is the first (top) one
                n = self.num_cameras
                obs_spaces["images"] = spaces.Box(0, 255, (n, s, s, 3), np.uint8)
            state_dim = 4
        else:  # agent position + velocity, then every target's position
            state_dim = 4 + 2 * self.num_targets
        obs_spaces["state"] = spaces.Box(-np.inf, np.inf, (state_dim,), np.float32)
        obs_spaces["instruction"] = spaces.Box(0, self.vocab_size - 1, (L,), np.int64)
        obs_spaces["instruction_mask"] = spaces.Box(0, 1, (L,), np.int64)
        self.observation_space = spaces.Dict(obs_spaces)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)

        self._target_pos = np.zeros((self.num_targets, 2))
        self._goal = 0
        self._text_index = len(self._texts) - 1
        self._steps = 0
        self._prev_dist = 0.0
        self._success = False

    # ------------------------------------------------------------------ helpers
    @property
    def agent_position(self) -> np.ndarray:
        """Agent (x, y) position."""
        return self.data.qpos[:2].copy()

    @property
    def target_positions(self) -> np.ndarray:
        """Target disc centres, ``(num_targets, 2)``."""
        return self._target_pos.copy()

    @property
    def instruction(self) -> str:
        """The current episode's instruction text."""
        return self._texts[self._text_index]

    def _distance(self) -> float:
        return float(np.linalg.norm(self.data.qpos[:2] - self._target_pos[self._goal]))

    def _sample_layout(self) -> tuple[np.ndarray, np.ndarray]:
        """Agent start and target positions by rejection sampling with ``self.np_random``."""
        rng = self.np_random
        while True:
            agent = rng.uniform(-SPAWN_HALF, SPAWN_HALF, size=2)
            targets: list[np.ndarray] = []
            for _ in range(1000):
                p = rng.uniform(-SPAWN_HALF, SPAWN_HALF, size=2)
                if np.linalg.norm(p - agent) < MIN_AGENT_CLEARANCE:
                    continue
                if any(np.linalg.norm(p - q) < MIN_TARGET_SEPARATION for q in targets):
                    continue
                targets.append(p)
                if len(targets) == self.num_targets:
                    return agent, np.stack(targets)

    def _render_image(self, camera: int | None = None) -> np.ndarray:
        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, self.image_size, self.image_size)
        self._renderer.update_scene(self.data, camera=self._camera if camera is None else camera)
        return self._renderer.render()

    def _obs(self) -> dict[str, np.ndarray]:
        parts = [self.data.qpos[:2], self.data.qvel[:2]]
        obs: dict[str, np.ndarray] = {}
        if self.observation == "pixels" and self.num_cameras > 1:
            obs["images"] = np.stack([self._render_image(c) for c in self._cameras])
            obs["image"] = obs["images"][0].copy()
        elif self.observation == "pixels":
            obs["image"] = self._render_image()
        else:
            parts.append(self._target_pos.reshape(-1))
        obs["state"] = np.concatenate(parts).astype(np.float32)
        shown = self._text_index
        if self.instruction_mode == "first_step" and self._steps > 0:
            shown = len(self._texts) - 1
        obs["instruction"] = self._ids[shown].copy()
        obs["instruction_mask"] = self._mask[shown].copy()
        return obs

    def _info(self, distance: float) -> dict[str, Any]:
        return {
            "is_success": bool(self._success),
            "instruction": self.instruction,
            "target_color": self.color_names[self._goal],
            "target_index": int(self._goal),
            "distance": float(distance),
            "target_positions": self._target_pos.copy(),
            "agent_position": self.data.qpos[:2].copy(),
            # the privileged expert's action in this state: the label for DAgger relabelling
            "expert_action": self.expert_action(),
        }

    # ---------------------------------------------------------------- gym API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Randomise layout, goal colour and instruction template; return ``(obs, info)``."""
        super().reset(seed=seed)
        agent, targets = self._sample_layout()
        self._goal = int(self.np_random.integers(self.num_targets))
        template = int(self.np_random.integers(len(TEMPLATES)))
        if self.instruction_mode == "blind":
            self._text_index = len(self._texts) - 1
        else:
            self._text_index = template * self.num_targets + self._goal

        mujoco.mj_resetData(self.model, self.data)
        self.data.qpos[:2] = agent
        self._target_pos = targets
        self.data.mocap_pos[:, :2] = targets
        mujoco.mj_forward(self.model, self.data)

        self._steps = 0
        self._success = False
        self._prev_dist = self._distance()
        return self._obs(), self._info(self._prev_dist)

    def step(
        self, action: np.ndarray
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Apply a planar velocity command in ``[-1, 1]^2`` for ``FRAME_SKIP`` physics steps."""
        a = np.nan_to_num(np.asarray(action, dtype=np.float64).reshape(2), nan=0.0)
        self.data.ctrl[:] = np.clip(a, -1.0, 1.0) * MAX_SPEED
        mujoco.mj_step(self.model, self.data, nstep=FRAME_SKIP)
        mujoco.mj_forward(self.model, self.data)  # refresh positions for rendering
        self._steps += 1

        dist = self._distance()
        reward = SHAPING_SCALE * (self._prev_dist - dist)
        self._prev_dist = dist
        if not self._success and dist <= self.success_radius:
            self._success = True
            reward += SUCCESS_BONUS
        terminated = self._success
        truncated = self._steps >= self.max_episode_steps
        return self._obs(), float(reward), terminated, truncated, self._info(dist)

    def render(self) -> np.ndarray | None:
        """A 256x256 top-down RGB frame when ``render_mode="rgb_array"``, else None."""
        if self.render_mode != "rgb_array":
            return None
        if self._video_renderer is None:
            self._video_renderer = mujoco.Renderer(self.model, RENDER_SIZE, RENDER_SIZE)
        self._video_renderer.update_scene(self.data, camera=self._camera)
        return self._video_renderer.render()

    def expert_action(self) -> np.ndarray:
        """Privileged P-controller toward the named target: ``clip(k * (goal - pos), -1, 1)``."""
        err = self._target_pos[self._goal] - self.data.qpos[:2]
        return np.clip(EXPERT_GAIN * err, -1.0, 1.0).astype(np.float32)

    def close(self) -> None:
        """Free the renderers (idempotent; safe at interpreter shutdown)."""
        for attr in ("_renderer", "_video_renderer"):
            renderer = getattr(self, attr, None)
            if renderer is not None:
                setattr(self, attr, None)
                # The GL context may already be torn down at interpreter exit.
                with contextlib.suppress(Exception):
                    renderer.close()

    def __del__(self) -> None:
        self.close()
