"""Gymnasium environments of vla-ray (imported as ``vla_ray.envs``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gymnasium as gym

from . import locomotion
from .experts import EXPERTS, ScriptedExpert, get_expert, rollout_expert

if TYPE_CHECKING:
    from .langreach import LangReachEnv

LANGREACH_ID = "vla_ray/LangReach-v0"
# LangReach without pixels: target positions in the state (small state-only tests, e.g. SAC)
LANGREACH_STATE_ID = "vla_ray/LangReachState-v0"
ENV_IDS: tuple[str, ...] = (LANGREACH_ID, LANGREACH_STATE_ID, *locomotion.env_ids())

for _id, _kwargs in ((LANGREACH_ID, {}), (LANGREACH_STATE_ID, {"observation": "state"})):
    if _id not in gym.registry:
        gym.register(
            id=_id,
            entry_point="vla_ray.envs.langreach:LangReachEnv",
            max_episode_steps=50,
            kwargs=_kwargs,
        )


locomotion.register()

# PushT (gym-pusht), highway-env driving and CARLA: their packages (the `envs` / `carla` extras)
# are imported only when one of these is made. id -> (entry point, max_episode_steps)
PUSHT_ID = "vla_ray/PushT-v0"
HIGHWAY_ID = "vla_ray/Highway-v0"
HIGHWAY_STATE_ID = "vla_ray/HighwayState-v0"
CARLA_ID = "vla_ray/Carla-v0"
# language-routed intersection driving (camera + LiDAR + IMU + ego); State: no camera
LANGDRIVE_ID = "vla_ray/LangDrive-v0"
LANGDRIVE_STATE_ID = "vla_ray/LangDriveState-v0"
_EXTRA_ENVS: dict[str, tuple[str, int | None, dict[str, Any]]] = {
    PUSHT_ID: ("vla_ray.envs.pusht:PushTEnv", 300, {}),
    # highway-env truncates after `duration` seconds itself, CARLA after `max_steps`
    HIGHWAY_ID: ("vla_ray.envs.driving:HighwayDrivingEnv", None, {"image": True}),
    HIGHWAY_STATE_ID: ("vla_ray.envs.driving:HighwayDrivingEnv", None, {"image": False}),
    CARLA_ID: ("vla_ray.envs.carla_env:CarlaDrivingEnv", None, {}),
    # LangDrive truncates after `duration` seconds itself
    LANGDRIVE_ID: ("vla_ray.envs.langdrive:LangDriveEnv", None, {"image": True}),
    LANGDRIVE_STATE_ID: ("vla_ray.envs.langdrive:LangDriveEnv", None, {"image": False}),
}
for _id, (_entry, _steps, _kwargs) in _EXTRA_ENVS.items():
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_entry, max_episode_steps=_steps, kwargs=_kwargs)
ENV_IDS = (*ENV_IDS, *_EXTRA_ENVS)


def env_kwargs(env_id: str | None) -> set[str] | None:
    """Keyword arguments the constructor of a registered env id takes (None: unknown id, or
    the constructor takes ``**kwargs``)."""
    import importlib
    import inspect

    if not env_id or env_id not in gym.registry:
        return None
    entry = gym.spec(env_id).entry_point
    if not isinstance(entry, str):
        return None
    module, _, name = entry.partition(":")
    params = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return {p for p in params if p != "self"}


def __getattr__(name: str) -> Any:
    """Import ``LangReachEnv`` (and thus mujoco) only when it is first used."""
    if name == "LangReachEnv":
        from vla_ray.envs.langreach import LangReachEnv

        return LangReachEnv
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CARLA_ID",
    "ENV_IDS",
    "EXPERTS",
    "HIGHWAY_ID",
    "HIGHWAY_STATE_ID",
    "LANGDRIVE_ID",
    "LANGDRIVE_STATE_ID",
    "LANGREACH_ID",
    "LANGREACH_STATE_ID",
    "LangReachEnv",
    "PUSHT_ID",
    "ScriptedExpert",
    "env_kwargs",
    "get_expert",
    "rollout_expert",
]
