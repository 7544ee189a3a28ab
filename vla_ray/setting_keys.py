"""Which keys each section of a run's settings takes: one check for ``--set`` and tune YAMLs.

The first key under a section is checked against what the run will pass it to:

- ``training.*``, ``env_runners.*``, ``learners.*``, ``fault_tolerance.*``: the keyword
  parameters of the algorithm config's method of that name (RLlib's ``PPOConfig.training`` ...);
- ``model.*``: the :class:`~vla_ray.config.VLAConfig` fields (less the ones derived from the
  env's spaces), the ``MODEL_KEYS`` the algorithm's RLModule class reads (``value``,
  ``q_hidden`` ...) and RLlib's ``DefaultModelConfig`` fields;
- ``env.*``: the env constructor's keyword arguments plus the env factory's wrapper keys
  (``expert_beta``, ``expert``, ``group_seeding``, ``safety``, ``action_chunk``);
- ``stop.*``: ``iters``, ``timesteps``, ``seconds``.

Deeper keys (``model.head_config.init_log_std``, ``model.llm_config.*``) are the open-ended
configs of a component and are checked when it is built. A section that cannot be checked in
this build (an algorithm whose package is missing, an env whose constructor takes ``**kwargs``)
is left unchecked.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any

from vla_ray.config import ConfigError
from vla_ray.env_factory import FACTORY_KEYS

# keys the env factory (vla_ray.env_factory) consumes itself: wrappers, not env arguments
ENV_FACTORY_KEYS = FACTORY_KEYS
# keys vla_ray.train takes out of a section before RLlib sees it
SECTION_EXTRA_KEYS = {"env_runners": ("inference",)}  # the shared inference actors
STOP_KEYS = ("iters", "timesteps", "seconds")
CONFIG_METHOD_SECTIONS = ("training", "env_runners", "learners", "fault_tolerance")


def _method_params(config: Any, name: str) -> set[str] | None:
    """Keyword parameters of ``config.<name>()`` over the config class's MRO.

    None when the root definition takes ``**kwargs`` (then any key could be valid).
    """
    defs = [vars(c)[name] for c in type(config).__mro__ if name in vars(c)]
    names: set[str] = set()
    for fn in defs:
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self":
                names.add(p.name)
    root = inspect.signature(defs[-1]).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in root):
        return None
    return names


def known_setting_keys(algorithm: str | None, env: str | None) -> dict[str, set[str] | None]:
    """Per section, the first-level keys a run takes (None: cannot be checked in this build)."""
    from vla_ray.algorithms import ALGORITHMS, get_algorithm
    from vla_ray.config import VLAConfig
    from vla_ray.envs import env_kwargs
    from vla_ray.rl_module import _RLLIB_MODEL_KEYS, SPACE_DERIVED_KEYS

    # sections of an algorithm this build lacks stay unchecked (its module may take more keys)
    out: dict[str, set[str] | None] = dict.fromkeys((*CONFIG_METHOD_SECTIONS, "model"))
    if algorithm in ALGORITHMS:
        cfg = get_algorithm(algorithm)()
        for section in CONFIG_METHOD_SECTIONS:
            params = _method_params(cfg, section)
            out[section] = (
                None if params is None else params | set(SECTION_EXTRA_KEYS.get(section, ()))
            )
        model = {f.name for f in dataclasses.fields(VLAConfig)} - set(SPACE_DERIVED_KEYS)
        # the module the run builds (as vla_ray.train does) and the model_config keys it reads
        module = cfg.get_default_rl_module_spec().module_class
        out["model"] = model | set(module.MODEL_KEYS) | set(_RLLIB_MODEL_KEYS)
    env_keys = env_kwargs(env)
    # worker_index/num_workers come from the EnvRunner, not from the settings
    out["env_config"] = (
        None
        if env_keys is None
        else (env_keys - {"worker_index", "num_workers"}) | set(ENV_FACTORY_KEYS)
    )
    out["stop"] = set(STOP_KEYS)
    return out


def setting_problem(key: list[str], known: dict[str, set[str] | None]) -> str | None:
    """What is wrong with the setting at path ``key`` (``["training", "lr"]``), or None."""
    if len(key) < 2:
        return None
    allowed = known.get(key[0])
    if allowed is None or key[1] in allowed:
        return None
    label = "env" if key[0] == "env_config" else key[0]
    close = difflib.get_close_matches(key[1], sorted(allowed), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{label} takes no key {key[1]!r}; {hint}valid keys are {', '.join(sorted(allowed))}"


def check_overrides(overrides: dict[str, Any], algorithm: str, env: str) -> None:
    """ConfigError naming every first-level key of ``overrides`` (nested, as ``--set`` builds
    them) that its section does not take, with the closest valid key."""
    known = known_setting_keys(algorithm, env)
    problems = []
    for section, value in overrides.items():
        if not isinstance(value, dict):
            continue
        for name in value:
            problem = setting_problem([section, name], known)
            if problem:
                label = "env" if section == "env_config" else section
                problems.append(f"--set {label}.{name}: {problem}")
    if problems:
        raise ConfigError("\n".join(problems))
