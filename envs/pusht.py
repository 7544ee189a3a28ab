"""PushT (``gym-pusht``) under the VLA observation contract.

The agent (a blue disc) pushes a grey T-shaped block onto a fixed green target pose. The
underlying env is ``gym_pusht.envs.PushTEnv`` (the one LeRobot's diffusion-policy benchmarks use),
with ``obs_type="pixels_agent_pos"``. This wrapper gives it the Dict contract of vla-ray:

- ``image``: uint8 (H, W, 3) top-down render, 96x96 by default (``image_size``);
- ``state``: float32 (2,) agent position, scaled from the 512x512 workspace to ``[-1, 1]``
  (``normalize=False`` keeps pixels, ``[0, 512]``);
- ``instruction`` + ``instruction_mask``: "push the t onto the target" (project tokenizer).

Actions are the target position of the agent's PD controller. With ``normalize=True`` (default)
the action space is ``[-1, 1]^2``, mapped linearly to the ``[0, 512]^2`` workspace, so a Gaussian
head starts centred; ``normalize=False`` exposes the raw ``[0, 512]^2`` space.

Reward, termination and success are gym-pusht's (as in LeRobot): reward = clip(coverage / 0.95,
0, 1) where coverage is the fraction of the target area the block covers; the episode terminates
with ``info["is_success"] = True`` once coverage exceeds 95%; ``info["coverage"]`` is reported on
every step. Registered as ``vla_ray/PushT-v0`` with a 300-step limit (LeRobot's).
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # no display needed: drawing is off-screen
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

INSTRUCTION = "push the t onto the target"
WORKSPACE = 512.0
SUCCESS_COVERAGE = 0.95
MAX_EPISODE_STEPS = 300


def encode_instruction(
    instruction: str, max_length: int, tokenizer: str | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(ids, mask, vocab_size)`` of one instruction with the project tokenizer.

    ValueError naming the instruction when it encodes to no tokens.
    """
    from vla_ray.tokenizer import encode_instructions, load_tokenizer

    tok = load_tokenizer(tokenizer)
    ids, mask = encode_instructions([instruction], int(max_length), tok)
    if int(mask.sum()) == 0:
        raise ValueError(f"instruction: {instruction!r} encodes to no tokens")
    return ids[0].astype(np.int64), mask[0].astype(np.int64), len(tok)


class PushTEnv(gym.Env):
    """gym-pusht's PushT with ``image``/``state``/``instruction`` observations (module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        image_size: int | tuple[int, int] | list[int] = 96,
        normalize: bool = True,
        instruction: str = INSTRUCTION,
        instruction_max_length: int = 16,
        tokenizer: str | None = None,
        render_mode: str | None = "rgb_array",
        **kwargs: Any,
    ):
        try:
            from gym_pusht.envs import PushTEnv as _PushT
        except ImportError as err:  # pragma: no cover - depends on the install
            raise ImportError(
                "vla_ray/PushT-v0 needs the gym-pusht package: pip install 'vla-ray[envs]'"
            ) from err
        if isinstance(image_size, (int, np.integer)):
            h = w = int(image_size)
        else:
            h, w = (int(v) for v in image_size)
        if h < 8 or w < 8:
            raise ValueError(f"image_size: expected at least 8x8 pixels, got {h}x{w}")
        self._env = _PushT(
            obs_type="pixels_agent_pos",
            render_mode="rgb_array",
            observation_width=w,
            observation_height=h,
            **kwargs,
        )
        self.render_mode = render_mode
        self.normalize = bool(normalize)
        self.instruction = instruction
        self._ids, self._mask, vocab = encode_instruction(
            instruction, instruction_max_length, tokenizer
        )
        L = int(instruction_max_length)
        if self.normalize:
            state_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
            self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        else:
            state_space = gym.spaces.Box(0.0, WORKSPACE, (2,), np.float32)
            self.action_space = gym.spaces.Box(0.0, WORKSPACE, (2,), np.float32)
        self.observation_space = gym.spaces.Dict(
            {
                "image": gym.spaces.Box(0, 255, (h, w, 3), np.uint8),
                "state": state_space,
                "instruction": gym.spaces.Box(0, vocab - 1, (L,), np.int64),
                "instruction_mask": gym.spaces.Box(0, 1, (L,), np.int64),
            }
        )

    def _obs(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pos = np.asarray(raw["agent_pos"], dtype=np.float32)
        if self.normalize:
            pos = pos / (WORKSPACE / 2.0) - 1.0
        low, high = self.observation_space["state"].low, self.observation_space["state"].high
        return {
            "image": np.ascontiguousarray(raw["pixels"], dtype=np.uint8),
            "state": np.clip(pos, low, high).astype(np.float32),
            "instruction": self._ids.copy(),
            "instruction_mask": self._mask.copy(),
        }

    def to_workspace(self, action: np.ndarray) -> np.ndarray:
        """An action of ``action_space`` -> the PD target in workspace pixels, ``[0, 512]^2``."""
        a = np.asarray(action, dtype=np.float64).reshape(2)
        if self.normalize:
            a = (np.clip(a, -1.0, 1.0) + 1.0) * (WORKSPACE / 2.0)
        return np.clip(a, 0.0, WORKSPACE)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        raw, info = self._env.reset(seed=seed, options=options)
        info = dict(info, is_success=False, coverage=float(self._env._get_coverage()))
        return self._obs(raw), info

    def step(self, action: np.ndarray):
        raw, reward, terminated, truncated, info = self._env.step(self.to_workspace(action))
        info = dict(info)
        info["is_success"] = bool(info.get("is_success", False))
        info["coverage"] = float(info.get("coverage", 0.0))
        return self._obs(raw), float(reward), bool(terminated), bool(truncated), info

    def render(self) -> np.ndarray:
        """The 680x680 visualisation frame (``rgb_array``)."""
        return self._env._render(visualize=True)

    def close(self) -> None:
        self._env.close()
