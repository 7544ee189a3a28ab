"""A run's settings, resolved once: preset + algorithm defaults + ``--set`` overrides + CLI
flags -> :class:`RunSpec` (what ``config.json`` records and every later step reads).

``--set`` keys are dotted paths into the sections below (``training.lr``, ``env.max_steps``) or
one of the top-level keys; each key is checked against what its section takes
(:mod:`vla_ray.setting_keys`).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any

from vla_ray.presets import Preset, get_preset

SECTIONS = (
    "env_config",
    "model",
    "training",
    "env_runners",
    "learners",
    "stop",
    "fault_tolerance",
)
TOP_LEVEL_KEYS = (
    "seed",
    "checkpoint_every",
    "checkpoint_metric",
    "keep_checkpoints",
    "data",
    "val_fraction",
    "eval_every",
    "eval_episodes",
)


def parse_value(text: str) -> Any:
    """``--set`` values: JSON where it parses (numbers, true/false/null, lists, dicts), else text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def override_path(key: str) -> list[str]:
    """``"training.lr"`` -> ``["training", "lr"]`` (``env.`` means ``env_config.``).

    ValueError naming the key and the valid forms when it is not a setting of a run.
    """
    parts = key.strip().split(".")
    if parts == ["vlm_path"]:  # shorthand: start the policy's trunk from a pretrained VLM
        parts = ["model", "vlm_path"]
    if parts[0] == "env":
        parts[0] = "env_config"
    if (parts[0] in SECTIONS and len(parts) >= 2 and all(parts)) or (
        len(parts) == 1 and parts[0] in TOP_LEVEL_KEYS
    ):
        return parts
    raise ValueError(
        f"unknown key {key!r}; use one of "
        f"{', '.join(s + '.KEY' for s in ('env', *SECTIONS[1:]))} or {', '.join(TOP_LEVEL_KEYS)}"
    )


def set_override(out: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Put ``value`` at the dotted ``key`` (see :func:`override_path`) of the nested ``out``."""
    parts = override_path(key)
    node = out
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["training.lr=1e-4", "seed=3"]`` -> nested dict; ValueError naming a malformed item."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. training.lr=1e-4")
        key, value = item.split("=", 1)
        try:
            set_override(out, key, parse_value(value))
        except ValueError as err:
            raise ValueError(f"--set {item!r}: {err}") from None
    return out


def _merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


@dataclass
class RunSpec:
    """Everything a run needs, fully resolved and JSON-serialisable."""

    preset: str
    algorithm: str
    env: str
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(preset=self.preset, algorithm=self.algorithm, env=self.env, **self.settings)


def resolve(
    preset: str | Preset,
    overrides: dict[str, Any] | None = None,
    *,
    num_env_runners: int | None = None,
    num_envs_per_env_runner: int | None = None,
    local: bool = False,
    data: str | os.PathLike | None = None,
    vectorize: str | None = None,
    num_gpus_per_learner: float | str | None = None,
    num_gpus_per_env_runner: float | None = None,
) -> RunSpec:
    """Preset + algorithm defaults + overrides + CLI flags -> RunSpec.

    ``data`` is the offline dataset of offline algorithms (BC ...); required for them, refused
    for online ones.
    """
    from vla_ray.algorithms import get_algorithm
    from vla_ray.setting_keys import check_overrides

    p = preset if isinstance(preset, Preset) else get_preset(preset)
    algo = get_algorithm(p.algorithm)
    check_overrides(overrides or {}, p.algorithm, p.env)  # did-you-mean for every section
    settings = p.sections()
    # deep copies: overrides merge into nested defaults (replay_buffer_config ...), which must
    # not change the algorithm's module-level defaults for later runs in the process
    settings["training"] = copy.deepcopy({**algo.training_defaults(), **settings["training"]})
    settings["model"] = copy.deepcopy({**algo.MODEL_DEFAULTS, **settings["model"]})
    settings.update(
        seed=0, checkpoint_every=10, checkpoint_metric="success_rate", keep_checkpoints=False
    )
    if algo.OFFLINE:  # val_fraction: held-out episodes (vla_ray.data.validation)
        settings.update(data=None, val_fraction=0.0)
    if algo.EVALUATES:
        settings.update(eval_every=25 if algo.OFFLINE else 1, eval_episodes=p.eval_episodes)
    _merge(settings, copy.deepcopy(overrides or {}))
    safety = (settings.get("env_config") or {}).get("safety")
    if isinstance(safety, str):  # the rules themselves go into config.json and checkpoints
        from vla_ray.safety import load_rules_file

        settings["env_config"]["safety"] = load_rules_file(safety)
    if data is not None:
        settings["data"] = str(data)
    # offline algorithms and online ones that learn from demonstrations too (GAIL)
    if algo.NEEDS_DATA and "data" not in settings:
        settings["data"] = None
    if algo.NEEDS_DATA and not settings.get("data"):
        raise ValueError(
            f"--data: {p.algorithm} trains from a dataset; give --data PATH "
            "(e.g. one written by `vla-ray collect`)"
        )
    # online algorithms that may start from demonstrations (DAgger) accept it too
    if not algo.ACCEPTS_DATA and settings.get("data"):
        raise ValueError(f"--data: {p.algorithm} is an online algorithm and reads no dataset")
    if settings.get("val_fraction") and not algo.OFFLINE:
        raise ValueError(f"--val-fraction: {p.algorithm} is not an offline algorithm")
    settings["env_config"] = chunk_env_config(
        p.algorithm, settings["model"], settings["env_config"]
    )
    check_temporal_support(p.algorithm, settings["model"])
    runners = settings["env_runners"]
    if num_env_runners is not None:
        runners["num_env_runners"] = num_env_runners
    if num_envs_per_env_runner is not None:
        runners["num_envs_per_env_runner"] = num_envs_per_env_runner
    if local:
        runners["num_env_runners"] = 0
        settings["learners"]["num_learners"] = 0
    from vla_ray.scale import apply_scale_flags

    apply_scale_flags(
        settings,
        vectorize=vectorize,
        num_gpus_per_learner=num_gpus_per_learner,
        num_gpus_per_env_runner=num_gpus_per_env_runner,
    )
    return RunSpec(p.name, p.algorithm, p.env, settings)


def chunk_env_config(
    algorithm: str, model: dict[str, Any], env_config: dict[str, Any]
) -> dict[str, Any]:
    """``env_config`` with ``action_chunk.size`` set to ``model.chunk_size`` when that is > 1
    (the env then takes chunks: ``vla_ray.envs.chunking``). ConfigError naming the field when
    the algorithm learns single-step actions only (it does not set ``ACTION_CHUNKS``) or the
    env's chunk size disagrees with the model's."""
    from vla_ray.algorithms import ALGORITHMS, get_algorithm
    from vla_ray.config import ConfigError
    from vla_ray.envs.chunking import CHUNK_CONFIG_KEY, chunk_settings

    size = model.get("chunk_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"model.chunk_size: expected an integer >= 1, got {size!r}")
    given = dict(env_config.get(CHUNK_CONFIG_KEY) or {})
    if size == 1 and int(given.get("size", 1)) == 1:
        return env_config
    if not get_algorithm(algorithm).ACTION_CHUNKS:
        takes = [a for a in ALGORITHMS if get_algorithm(a).ACTION_CHUNKS]
        raise ConfigError(
            f"model.chunk_size: {algorithm} learns single-step actions (chunk_size=1); "
            f"got {size}. Algorithms that take chunks: {', '.join(takes)}"
        )
    if given.get("size", size) != size:
        raise ConfigError(
            f"env.{CHUNK_CONFIG_KEY}.size: must equal model.chunk_size={size}, "
            f"got {given['size']!r}"
        )
    chunk_settings({**given, "size": size})  # checks execute / gamma
    return {**env_config, CHUNK_CONFIG_KEY: {**given, "size": size}}


def check_temporal_support(algorithm: str, model: dict[str, Any]) -> None:
    """ConfigError naming ``model.temporal`` when it is set and ``algorithm`` does not train a
    memory (its config class does not set ``TEMPORAL``), listing the algorithms that do."""
    from vla_ray.algorithms import ALGORITHMS, get_algorithm
    from vla_ray.config import ConfigError

    temporal = model.get("temporal", "none")
    if temporal == "none" or get_algorithm(algorithm).TEMPORAL:
        return
    takes = [a for a in ALGORITHMS if get_algorithm(a).TEMPORAL]
    raise ConfigError(
        f"model.temporal: {algorithm} trains on single steps and cannot carry a memory; got "
        f"temporal={temporal!r}. Algorithms that support temporal: {', '.join(takes)} "
        "(or set model.temporal='none')"
    )
