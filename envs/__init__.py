"""Gymnasium environments of vla-ray (imported as ``vla_ray.envs``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gymnasium as gym

from . import locomotion
from .experts import EXPERTS, ScriptedExpert, get_expert, rollout_expert

if TYPE_CHECKING:
    from .langreach import LangReachEnv

LANGREACH_ID = "vla_ray/LangReach-v0"
ENV_IDS: tuple[str, ...] = (LANGREACH_ID, *locomotion.env_ids())

if LANGREACH_ID not in gym.registry:
    gym.register(
        id=LANGREACH_ID,
        entry_point="vla_ray.envs.langreach:LangReachEnv",
        max_episode_steps=50,
    )


locomotion.register()


def __getattr__(name: str) -> Any:
    """Import ``LangReachEnv`` (and thus mujoco) only when it is first used."""
    if name == "LangReachEnv":
        from vla_ray.envs.langreach import LangReachEnv

        return LangReachEnv
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ENV_IDS",
    "EXPERTS",
    "LANGREACH_ID",
    "LangReachEnv",
    "ScriptedExpert",
    "get_expert",
    "rollout_expert",
]
