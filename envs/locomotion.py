"""Gymnasium control tasks (MuJoCo locomotion, Pendulum) under the VLA observation contract.

``InstructedObservation`` turns any env with a flat Box observation into the Dict contract of
vla-ray: ``state`` (the env's observation as float32), ``instruction`` + ``instruction_mask`` (a
fixed task sentence encoded with the project tokenizer) and, for the pixel variants, ``image``
(the env's ``rgb_array`` render, uint8 HxWx3). The state-only variants have no ``image`` key; a
``VLAModule`` on them is built with ``vision="none"``.

Registered ids (``import vla_ray.envs``)::

    vla_ray/HalfCheetah-v5  vla_ray/Hopper-v5  vla_ray/Walker2d-v5  vla_ray/Humanoid-v5
    vla_ray/HalfCheetahPixels-v5 ... vla_ray/HumanoidPixels-v5   (image + state)
    vla_ray/Pendulum-v1                                          (state only; small SAC tests)

Env options (``env_config`` / ``gym.make`` kwargs): ``instruction`` (override the sentence),
``image_size`` (pixel variants, default 64x64), ``include_state`` (pixel variants: keep the
proprioceptive ``state`` beside the image, default True), ``instruction_max_length`` (16) and
any keyword of the underlying gymnasium env (``forward_reward_weight``, ``reset_noise_scale``, ...).
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")

# id -> (gymnasium id, instruction)
TASKS: dict[str, tuple[str, str]] = {
    "HalfCheetah-v5": ("HalfCheetah-v5", "run forward as fast as you can"),
    "Hopper-v5": ("Hopper-v5", "hop forward"),
    "Walker2d-v5": ("Walker2d-v5", "walk forward without falling"),
    "Humanoid-v5": ("Humanoid-v5", "walk forward without falling"),
    "Pendulum-v1": ("Pendulum-v1", "stand up"),
}
PIXEL_TASKS = ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Humanoid-v5")


def env_ids() -> tuple[str, ...]:
    """Every gymnasium id this module registers."""
    ids = [f"vla_ray/{t}" for t in TASKS]
    ids += [f"vla_ray/{t.replace('-v', 'Pixels-v')}" for t in PIXEL_TASKS]
    return tuple(ids)


class InstructedObservation(gym.ObservationWrapper):
    """Flat Box observation -> ``{"state", "instruction", "instruction_mask"[, "image"]}``."""

    def __init__(
        self,
        env: gym.Env,
        instruction: str,
        pixels: bool = False,
        include_state: bool = True,
        instruction_max_length: int = 16,
        tokenizer: str | None = None,
        image_size: tuple[int, int] | list[int] = (64, 64),
    ):
        super().__init__(env)
        from vla_ray.tokenizer import encode_instructions, load_tokenizer

        base = env.observation_space
        if not isinstance(base, gym.spaces.Box) or len(base.shape) != 1:
            raise ValueError(
                f"InstructedObservation: expected a flat Box observation space, got {base}"
            )
        if not pixels and not include_state:
            raise ValueError("include_state: a state-only env (pixels=False) needs the state")
        tok = load_tokenizer(tokenizer)
        ids, mask = encode_instructions([instruction], instruction_max_length, tok)
        if int(mask.sum()) == 0:
            raise ValueError(f"instruction: {instruction!r} encodes to no tokens")
        self.instruction = instruction
        self._ids = ids[0].astype(np.int64)
        self._mask = mask[0].astype(np.int64)
        self.pixels = bool(pixels)
        self.include_state = bool(include_state)
        L = int(instruction_max_length)
        spaces: dict[str, gym.Space] = {}
        if self.pixels:
            if env.render_mode != "rgb_array":
                raise ValueError(
                    f"pixels: the wrapped env must render 'rgb_array', got {env.render_mode!r}"
                )
            h, w = (int(v) for v in image_size)
            spaces["image"] = gym.spaces.Box(0, 255, (h, w, 3), np.uint8)
        if self.include_state:
            spaces["state"] = gym.spaces.Box(
                base.low.astype(np.float32), base.high.astype(np.float32), dtype=np.float32
            )
        spaces["instruction"] = gym.spaces.Box(0, len(tok) - 1, (L,), np.int64)
        spaces["instruction_mask"] = gym.spaces.Box(0, 1, (L,), np.int64)
        self.observation_space = gym.spaces.Dict(spaces)

    def _render(self) -> np.ndarray:
        return np.ascontiguousarray(self.env.render(), dtype=np.uint8)

    def observation(self, observation: np.ndarray) -> dict[str, np.ndarray]:
        """The Dict observation for one flat env observation."""
        obs: dict[str, np.ndarray] = {}
        if self.pixels:
            obs["image"] = self._render()
        if self.include_state:
            obs["state"] = np.asarray(observation, dtype=np.float32)
        obs["instruction"] = self._ids.copy()
        obs["instruction_mask"] = self._mask.copy()
        return obs


def make(
    task: str,
    pixels: bool = False,
    instruction: str | None = None,
    image_size: tuple[int, int] | list[int] = (64, 64),
    include_state: bool = True,
    instruction_max_length: int = 16,
    **kwargs: Any,
) -> gym.Env:
    """The instructed env for ``task`` (a key of ``TASKS``); extra kwargs go to gymnasium."""
    if task not in TASKS:
        raise ValueError(f"task: unknown name {task!r}; valid names are {', '.join(TASKS)}")
    gym_id, default_instruction = TASKS[task]
    if pixels:
        h, w = (int(s) for s in image_size)
        kwargs.update(render_mode="rgb_array", width=w, height=h)
    env = gym.make(gym_id, **kwargs)
    return InstructedObservation(
        env,
        instruction or default_instruction,
        pixels=pixels,
        include_state=include_state,
        instruction_max_length=instruction_max_length,
        image_size=image_size,
    )


def register() -> None:
    """Register every id of ``env_ids()`` with gymnasium (idempotent)."""
    for task in TASKS:
        ids = [(f"vla_ray/{task}", False)]
        if task in PIXEL_TASKS:
            ids.append((f"vla_ray/{task.replace('-v', 'Pixels-v')}", True))
        for env_id, pixels in ids:
            if env_id not in gym.registry:
                gym.register(
                    id=env_id,
                    entry_point="vla_ray.envs.locomotion:make",
                    kwargs={"task": task, "pixels": pixels},
                    # the gymnasium env inside carries its own TimeLimit
                    disable_env_checker=True,
                )
