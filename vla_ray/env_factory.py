"""The env factory run inside EnvRunners: a vla-ray env id + env config -> the wrapped env.

It knows the wrappers every run may ask for (the safety shield, ``SafetyWrapper``, innermost;
action chunks, ``ExecuteChunk``, outermost) and applies the wrappers an algorithm declares
(``VLAAlgorithmConfig.ENV_WRAPPERS``: DAgger's expert mixing, GRPO's group seeding) when their
env config key is set; it holds no algorithm's code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EnvWrapper:
    """An env wrapper an algorithm needs, applied by the env factory.

    ``keys`` are env config keys (not env arguments) that the wrapper takes; it is applied when
    the first is set (not None), as ``wrap(env, **{key: value of each set key})``. ``wrap`` is
    ``"module:callable"``, imported in the EnvRunner only when applied.
    """

    keys: tuple[str, ...]
    wrap: str

    def apply(self, env: Any, options: dict[str, Any]) -> Any:
        module, _, name = self.wrap.partition(":")
        return getattr(importlib.import_module(module), name)(env, **options)


# The wrappers of the algorithms that need one (each algorithm's config lists its own in
# ``ENV_WRAPPERS``), declared here so that their keys are known without importing the algorithms.
EXPERT_MIXING_WRAPPER = EnvWrapper(("expert_beta", "expert"), "vla_ray.envs.experts:ExpertMixing")
GROUP_SEEDING_WRAPPER = EnvWrapper(("group_seeding",), "vla_ray.algorithms.grpo:group_seeding")
ALGORITHM_WRAPPERS = (EXPERT_MIXING_WRAPPER, GROUP_SEEDING_WRAPPER)
# training-time keys (DAgger's expert mixing, GRPO's group seeding): evaluation, export and data
# conversion of a policy drop them
ALGORITHM_WRAPPER_KEYS = tuple(k for w in ALGORITHM_WRAPPERS for k in w.keys)
SAFETY_KEY = "safety"  # a safety rules file: the shield (SafetyWrapper), innermost
CHUNK_CONFIG_KEY = "action_chunk"  # the model's action chunks: ExecuteChunk, outermost
# every env config key the factory takes itself (none is an env argument)
FACTORY_KEYS = (*ALGORITHM_WRAPPER_KEYS, SAFETY_KEY, CHUNK_CONFIG_KEY)

# the algorithm wrappers registered in this process (by ``register_envs``), in order
_WRAPPERS: dict[EnvWrapper, None] = {}


def register_envs(wrappers: tuple[EnvWrapper, ...] = ()) -> None:
    """Register every vla-ray env id with Tune so EnvRunner processes can build them, with
    ``wrappers`` added to those registered before (a wrapper acts only when its key is set, so
    runs of other algorithms in the same process are unaffected)."""
    from ray.tune.registry import register_env

    from vla_ray.envs import ENV_IDS

    _WRAPPERS.update(dict.fromkeys(wrappers))
    for env_id in ENV_IDS:
        register_env(env_id, EnvFactory(env_id, tuple(_WRAPPERS)))


class EnvFactory:
    """Picklable env factory run inside EnvRunners."""

    def __init__(self, env_id: str, wrappers: tuple[EnvWrapper, ...] = ()):
        self.env_id = env_id
        self.wrappers = tuple(wrappers)

    def __call__(self, env_config: dict[str, Any]):
        from ray.rllib.env.env_context import EnvContext

        import vla_ray.envs  # noqa: F401  (registers the gymnasium ids in this process)
        from vla_ray.envs import env_kwargs
        from vla_ray.envs.chunking import CHUNK_CONFIG_KEY, wrap_action_chunks
        from vla_ray.safety import make_env

        kwargs = dict(env_config or {})
        # envs that place themselves by their EnvRunner (CARLA: one server per sub-env) get its
        # index and the number of runners
        if isinstance(env_config, EnvContext) and "worker_index" in (env_kwargs(self.env_id) or ()):
            kwargs.update(worker_index=env_config.worker_index, num_workers=env_config.num_workers)
        # an algorithm's wrapper keys are not env arguments
        taken = [
            (w, {k: v for k in w.keys if (v := kwargs.pop(k, None)) is not None})
            for w in self.wrappers
        ]
        # ``action_chunk`` (model.chunk_size > 1) wraps it in ExecuteChunk, outermost
        chunks = kwargs.pop(CHUNK_CONFIG_KEY, None)
        # ``safety`` (a rules file) wraps the env in SafetyWrapper, innermost: the shield sees
        # the action the env will execute (after any expert mixing)
        env = make_env(self.env_id, kwargs)
        for wrapper, options in taken:
            if wrapper.keys[0] in options:
                env = wrapper.apply(env, options)
        return wrap_action_chunks(env, chunks)
