"""Hyperparameter searches: a YAML in ``tune_configs/`` -> ``tune.Tuner`` over RLlib algorithms.

A config names what to train (a preset, or an algorithm + env), a search space over the same
dotted keys as ``vla-ray train --set`` (``training.lr``, ``model.head_config.init_log_std``,
``env.num_targets`` ...) written with Tune's primitives, and how to search::

    preset: langreach-ppo
    metric: success_rate          # a reported name, or an RLlib result path (env_runners/...)
    mode: max
    num_samples: 8
    stop: {iters: 50}             # iters | timesteps | seconds | success_rate | episode_return_mean
    set: {env_runners.num_envs_per_env_runner: 8}          # fixed overrides
    search_space:
      training.lr: {loguniform: [1.0e-5, 1.0e-3]}
      training.gamma: {choice: [0.9, 0.95, 0.99]}
    scheduler: {type: asha, grace_period: 5, reduction_factor: 3}
    search_alg: {type: optuna, seed: 0}
    resources: {num_env_runners: 2, num_gpus_per_learner: 0}
    checkpoint: {frequency: 5, metric: success_rate, num_to_keep: 1}

:func:`load_tune_config` checks all of it (unknown keys, bad ranges, unknown primitives, keys the
algorithm/model/env do not take) and reports every problem at once, before anything starts. Each
trial is the algorithm's RLlib ``Algorithm`` class itself as the Tune trainable (with
:class:`VLATrialMixin` mixed in), built by :func:`vla_ray.train.build_algorithm_config` from
``resolve(preset, overrides)``; its resources are the algorithm's own placement group (learner +
EnvRunners). Every trial directory holds
``config.json`` (the resolved settings), ``metrics.jsonl`` (one summary row per iteration, as in
``vla-ray train``), Tune's ``result.json``/``progress.csv``, and its checkpoints (the best by the
checkpoint metric and the last are kept; each is an RLlib checkpoint plus a ``vla/``
``save_pretrained`` export), linked as ``checkpoints/best`` and ``checkpoints/last``.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray import tune
from ray.tune.logger import LoggerCallback

from vla_ray.checkpoint import META_NAME, restore_algorithm, run_checkpoints, write_checkpoint
from vla_ray.data.lerobot_format import is_hub_id
from vla_ray.data.validation import SCALAR_METRICS, iteration_metrics
from vla_ray.logs import LOG_NAME
from vla_ray.run_spec import TOP_LEVEL_KEYS, RunSpec, override_path, resolve, set_override
from vla_ray.setting_keys import known_setting_keys, setting_problem
from vla_ray.train import build_algorithm_config, summarize

PRIMITIVES = ("choice", "grid_search", "loguniform", "randint", "uniform")
SCHEDULERS = ("fifo", "asha", "pbt")
SEARCH_ALGS = ("random", "optuna")
OPTUNA_SAMPLERS = ("tpe", "random", "cmaes")
MODES = ("max", "min")
# Scalars every trial reports at the top level (besides the whole RLlib result, nested).
REPORTED = ("success_rate", "episode_return_mean", "episode_len_mean", "env_steps")
# ... plus, in trials with ``set: {val_fraction: F}`` (offline algorithms), the latest validation
# metrics on the held-out episodes (vla_ray.data.validation), computed as ``vla-ray train`` does
TRIAL_METRICS = REPORTED + SCALAR_METRICS
# ``stop:`` keys -> the result key Tune compares (stop when >= the value).
STOP_KEYS = {
    "iters": "training_iteration",
    "timesteps": "env_steps",
    "seconds": "time_total_s",
    "success_rate": "success_rate",
    "episode_return_mean": "episode_return_mean",
}
RESOURCE_KEYS = {
    "num_env_runners": ("env_runners", int, 0),
    "num_envs_per_env_runner": ("env_runners", int, 1),
    "num_cpus_per_env_runner": ("env_runners", float, 0),
    "num_gpus_per_env_runner": ("env_runners", float, 0),
    "num_learners": ("learners", int, 0),
    "num_cpus_per_learner": ("learners", float, 0),
    "num_gpus_per_learner": ("learners", float, 0),
}
# CPUs left free beside the trials of a search over a dataset: Ray Data's read tasks run outside
# each trial's placement group (a search that reserves every CPU hangs in its first read)
RAY_DATA_CPUS = 1
ASHA_KEYS = ("grace_period", "max_t", "reduction_factor", "brackets")
PBT_KEYS = (
    "perturbation_interval",
    "hyperparam_mutations",
    "quantile_fraction",
    "resample_probability",
    "burn_in_period",
)
CHECKPOINT_KEYS = ("frequency", "metric", "mode", "num_to_keep")
TOP_KEYS = (
    "description",
    "preset",
    "algorithm",
    "env",
    "data",
    "set",
    "search_space",
    "metric",
    "mode",
    "num_samples",
    "max_concurrent_trials",
    "stop",
    "scheduler",
    "search_alg",
    "resources",
    "checkpoint",
)


class TuneConfigError(ValueError):
    """A tune YAML is invalid; the message lists every problem with the key it concerns."""


@dataclass
class TuneSpec:
    """A checked tune config. ``set``/``search_space``/PBT mutations keep their dotted keys."""

    source: str
    preset: str | None = None
    algorithm: str | None = None
    env: str | None = None
    data: str | None = None
    description: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)
    search_space: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric: str = "success_rate"
    mode: str = "max"
    num_samples: int = 1
    max_concurrent_trials: int | None = None
    stop: dict[str, float] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "fifo"})
    search_alg: dict[str, Any] = field(default_factory=lambda: {"type": "random"})
    resources: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.preset or f"{self.algorithm}-{str(self.env).split('/')[-1]}"

    @property
    def checkpoint_metric(self) -> str:
        return self.checkpoint.get("metric", self.metric)

    @property
    def checkpoint_mode(self) -> str:
        return self.checkpoint.get("mode", self.mode)


# ---- schema check -------------------------------------------------------------------------------
def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_primitive(where: str, spec: Any) -> list[str]:
    """Problems with one search-space entry such as ``{loguniform: [1e-5, 1e-3]}``."""
    example = "e.g. {loguniform: [1.0e-5, 1.0e-3]} or {choice: [64, 128]}"
    if not isinstance(spec, dict) or len(spec) != 1:
        return [
            f"{where}: expected one Tune primitive ({', '.join(PRIMITIVES)}), {example}; got {spec!r}"
        ]
    ((kind, args),) = spec.items()
    if kind not in PRIMITIVES:
        return [
            f"{where}: unknown primitive {kind!r}; valid primitives are {', '.join(PRIMITIVES)}"
        ]
    if kind in ("choice", "grid_search"):
        if not isinstance(args, list) or not args:
            return [f"{where}: {kind} needs a non-empty list of values, got {args!r}"]
        return []
    if not isinstance(args, list) or len(args) != 2 or not all(_is_num(a) for a in args):
        return [f"{where}: {kind} needs [low, high] (two numbers), got {args!r}"]
    low, high = args
    if kind == "randint" and not (_is_int(low) and _is_int(high)):
        return [f"{where}: randint needs integer bounds [low, high), got {args!r}"]
    if not low < high:
        return [f"{where}: {kind} needs low < high, got [{low}, {high}]"]
    if kind == "loguniform" and low <= 0:
        return [f"{where}: loguniform needs 0 < low < high, got [{low}, {high}]"]
    return []


def _check_section_keys(where: str, given: dict[str, Any], allowed: tuple[str, ...]) -> list[str]:
    return [
        f"{where}.{k}: unknown key; valid keys are {', '.join(allowed)}"
        for k in given
        if k not in allowed
    ]


def _check_dotted_key(where: str, key: Any) -> list[str]:
    if not isinstance(key, str):
        return [f"{where}: keys must be dotted strings like training.lr, got {key!r}"]
    try:
        override_path(key)
    except ValueError as err:
        return [f"{where}.{key}: {err}"]
    return []


def _check_setting(where: str, key: str, known: dict[str, set[str] | None]) -> list[str]:
    parts = override_path(key)
    if parts[0] in TOP_LEVEL_KEYS:
        return []
    problem = setting_problem(parts, known)
    return [f"{where}.{key}: {problem}"] if problem else []


def validate_tune_config(raw: Any, source: str = "<tune config>") -> TuneSpec:
    """Check a parsed tune YAML; TuneConfigError listing every problem, else a TuneSpec."""
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise TuneConfigError(f"{source}: expected a mapping of settings, got {type(raw).__name__}")
    errors += [
        f"{k}: unknown key; valid keys are {', '.join(TOP_KEYS)}" for k in raw if k not in TOP_KEYS
    ]
    spec = TuneSpec(source=source)
    for k in ("preset", "algorithm", "env", "data", "description", "metric"):
        if k in raw and not isinstance(raw[k], str):
            errors.append(f"{k}: expected a string, got {raw[k]!r}")
    strings = {
        k: raw[k] for k in ("preset", "algorithm", "env", "data") if isinstance(raw.get(k), str)
    }
    spec.preset, spec.algorithm, spec.env = (strings.get(k) for k in ("preset", "algorithm", "env"))
    spec.data, spec.description = strings.get("data"), raw.get("description", "")
    if spec.preset and (spec.algorithm or spec.env):
        errors.append("preset: give either a preset or algorithm + env, not both")
    elif not spec.preset and not (spec.algorithm and spec.env):
        errors.append("preset: missing; name a preset, or both algorithm and env")

    spec.metric = raw.get("metric", "success_rate")
    if isinstance(spec.metric, str) and spec.metric not in TRIAL_METRICS and "/" not in spec.metric:
        errors.append(
            f"metric: unknown name {spec.metric!r}; use one of {', '.join(TRIAL_METRICS)} or an "
            "RLlib result path such as env_runners/episode_return_mean"
        )
    spec.mode = raw.get("mode", "max")
    if spec.mode not in MODES:
        errors.append(f"mode: expected max or min, got {spec.mode!r}")
    for k in ("num_samples", "max_concurrent_trials"):
        if k in raw and (not _is_int(raw[k]) or raw[k] < 1):
            errors.append(f"{k}: expected a positive integer, got {raw[k]!r}")
    spec.num_samples = raw.get("num_samples", 1)
    spec.max_concurrent_trials = raw.get("max_concurrent_trials")

    from vla_ray.presets import PRESETS

    if spec.preset:
        p = PRESETS.get(spec.preset)
        known = known_setting_keys(p.algorithm if p else None, p.env if p else None)
    else:
        known = known_setting_keys(spec.algorithm, spec.env)

    sections = {
        k: raw.get(k) or {}
        for k in (
            "set",
            "search_space",
            "stop",
            "scheduler",
            "search_alg",
            "resources",
            "checkpoint",
        )
    }
    for k, v in sections.items():
        if not isinstance(v, dict):
            errors.append(f"{k}: expected a mapping, got {v!r}")
            sections[k] = {}

    for key, value in sections["set"].items():
        problems = _check_dotted_key("set", key)
        errors += problems or _check_setting("set", key, known)
        if not problems:
            spec.fixed[key] = value
    for key, value in sections["search_space"].items():
        problems = _check_dotted_key("search_space", key)
        problems = problems or _check_setting("search_space", key, known)
        problems = problems or check_primitive(f"search_space.{key}", value)
        errors += problems
        if not problems:
            spec.search_space[key] = value
        if key in sections["set"]:
            errors.append(f"search_space.{key}: also fixed in set; keep one")

    for k, v in sections["stop"].items():
        if k not in STOP_KEYS:
            errors.append(f"stop.{k}: unknown key; valid keys are {', '.join(STOP_KEYS)}")
        elif not _is_num(v) or (k != "episode_return_mean" and v <= 0):
            errors.append(f"stop.{k}: expected a positive number, got {v!r}")
        else:
            spec.stop[k] = v

    for k, v in sections["resources"].items():
        if k not in RESOURCE_KEYS:
            errors.append(f"resources.{k}: unknown key; valid keys are {', '.join(RESOURCE_KEYS)}")
            continue
        _, kind, low = RESOURCE_KEYS[k]
        ok = _is_int(v) if kind is int else _is_num(v)
        if not ok or v < low:
            what = "an integer" if kind is int else "a number"
            errors.append(f"resources.{k}: expected {what} >= {low}, got {v!r}")
        else:
            spec.resources[k] = v

    errors += _check_scheduler(sections["scheduler"], spec, known)
    errors += _check_search_alg(sections["search_alg"], spec)

    ck = sections["checkpoint"]
    errors += _check_section_keys("checkpoint", ck, CHECKPOINT_KEYS)
    if "frequency" in ck and (not _is_int(ck["frequency"]) or ck["frequency"] < 0):
        errors.append(f"checkpoint.frequency: expected an integer >= 0, got {ck['frequency']!r}")
    if "num_to_keep" in ck and (not _is_int(ck["num_to_keep"]) or ck["num_to_keep"] < 1):
        errors.append(
            f"checkpoint.num_to_keep: expected an integer >= 1, got {ck['num_to_keep']!r}"
        )
    if "mode" in ck and ck["mode"] not in MODES:
        errors.append(f"checkpoint.mode: expected max or min, got {ck['mode']!r}")
    if "metric" in ck and (
        not isinstance(ck["metric"], str)
        or (ck["metric"] not in TRIAL_METRICS and "/" not in ck["metric"])
    ):
        errors.append(
            f"checkpoint.metric: use one of {', '.join(TRIAL_METRICS)} or an RLlib result path, got {ck['metric']!r}"
        )
    spec.checkpoint = {k: v for k, v in ck.items() if k in CHECKPOINT_KEYS}

    if errors:
        raise TuneConfigError(f"{source}: invalid tune config:\n  " + "\n  ".join(errors))
    return spec


def _check_scheduler(sched: dict[str, Any], spec: TuneSpec, known: dict) -> list[str]:
    errors: list[str] = []
    kind = sched.get("type", "fifo")
    if kind not in SCHEDULERS:
        return [f"scheduler.type: unknown name {kind!r}; valid names are {', '.join(SCHEDULERS)}"]
    params = {k: v for k, v in sched.items() if k != "type"}
    if kind == "fifo":
        errors += _check_section_keys("scheduler", params, ())
    elif kind == "asha":
        errors += _check_section_keys("scheduler", params, ASHA_KEYS)
        for k in ("grace_period", "max_t", "brackets"):
            if k in params and (not _is_int(params[k]) or params[k] < 1):
                errors.append(f"scheduler.{k}: expected a positive integer, got {params[k]!r}")
        rf = params.get("reduction_factor", 4)
        if not _is_num(rf) or rf <= 1:
            errors.append(f"scheduler.reduction_factor: expected a number > 1, got {rf!r}")
        gp, mt = params.get("grace_period", 1), params.get("max_t", 100)
        if _is_int(gp) and _is_int(mt) and gp > mt:
            errors.append(f"scheduler: grace_period ({gp}) must be <= max_t ({mt})")
    else:  # pbt
        errors += _check_section_keys("scheduler", params, PBT_KEYS)
        pi = params.get("perturbation_interval", 5)
        if not _is_int(pi) or pi < 1:
            errors.append(
                f"scheduler.perturbation_interval: expected a positive integer, got {pi!r}"
            )
        qf = params.get("quantile_fraction", 0.25)
        if not _is_num(qf) or not 0 <= qf <= 0.5:
            errors.append(f"scheduler.quantile_fraction: expected a number in [0, 0.5], got {qf!r}")
        rp = params.get("resample_probability", 0.25)
        if not _is_num(rp) or not 0 <= rp <= 1:
            errors.append(
                f"scheduler.resample_probability: expected a number in [0, 1], got {rp!r}"
            )
        muts = params.get("hyperparam_mutations")
        if not isinstance(muts, dict) or not muts:
            errors.append(
                "scheduler.hyperparam_mutations: PBT needs a mapping of dotted keys to primitives or lists"
            )
            muts = {}
        for key, value in muts.items():
            where = "scheduler.hyperparam_mutations"
            problems = _check_dotted_key(where, key) or _check_setting(where, key, known)
            if not problems and not isinstance(value, list):
                problems = check_primitive(f"{where}.{key}", value)
                if not problems and "grid_search" in value:
                    problems = [f"{where}.{key}: grid_search cannot be a mutation; use choice"]
            errors += problems
    spec.scheduler = dict(sched, type=kind)
    return errors


def _check_search_alg(alg: dict[str, Any], spec: TuneSpec) -> list[str]:
    errors: list[str] = []
    kind = alg.get("type", "random")
    if kind not in SEARCH_ALGS:
        return [f"search_alg.type: unknown name {kind!r}; valid names are {', '.join(SEARCH_ALGS)}"]
    params = {k: v for k, v in alg.items() if k != "type"}
    if kind == "random":
        errors += _check_section_keys("search_alg", params, ())
    else:
        errors += _check_section_keys("search_alg", params, ("sampler", "seed"))
        if params.get("sampler", "tpe") not in OPTUNA_SAMPLERS:
            errors.append(
                f"search_alg.sampler: unknown name {params['sampler']!r}; valid names are "
                f"{', '.join(OPTUNA_SAMPLERS)}"
            )
        if "seed" in params and not _is_int(params["seed"]):
            errors.append(f"search_alg.seed: expected an integer, got {params['seed']!r}")
        grids = [k for k, v in spec.search_space.items() if "grid_search" in v]
        if grids:
            errors.append(
                f"search_alg: optuna cannot search grid_search keys ({', '.join(grids)}); use choice"
            )
        if spec.scheduler.get("type") == "pbt":
            errors.append("search_alg: optuna cannot be combined with the pbt scheduler")
    spec.search_alg = dict(alg, type=kind)
    return errors


def load_tune_config(path: str | os.PathLike) -> TuneSpec:
    """Read and check a tune YAML (see the module docstring for its keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tune config {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TuneConfigError(f"{path}: not valid YAML: {err}") from None
    return validate_tune_config(raw, str(path))


def check_available(spec: TuneSpec) -> None:
    """ValueError naming every preset / algorithm / env / feature a config needs but is missing."""
    import gymnasium as gym

    import vla_ray.envs  # noqa: F401
    from vla_ray.algorithms import ALGORITHMS
    from vla_ray.presets import PRESETS

    missing: list[str] = []
    if spec.preset and spec.preset not in PRESETS:
        missing.append(f"preset {spec.preset!r} (available presets: {', '.join(PRESETS)})")
    if spec.algorithm and spec.algorithm not in ALGORITHMS:
        missing.append(
            f"algorithm {spec.algorithm!r} (available algorithms: {', '.join(ALGORITHMS)})"
        )
    if spec.env and spec.env not in gym.registry:
        missing.append(f"env {spec.env!r} (not a registered gymnasium id; see `vla-ray list`)")
    if spec.data and not is_hub_id(spec.data) and not Path(spec.data).exists():
        missing.append(f"offline data (`data:`): {spec.data} does not exist (`vla-ray collect`)")
    if missing:
        raise ValueError(f"{spec.source} cannot run in this build; missing: " + "; ".join(missing))


# ---- param space and trials ---------------------------------------------------------------------
def to_domain(spec: dict[str, Any]) -> Any:
    """``{loguniform: [1e-5, 1e-3]}`` -> ``tune.loguniform(1e-5, 1e-3)`` (lists -> tune.choice)."""
    if isinstance(spec, list):
        return tune.choice(spec)
    ((kind, args),) = spec.items()
    if kind in ("choice", "grid_search"):
        return getattr(tune, kind)(list(args))
    return getattr(tune, kind)(*args)


def base_of(spec: TuneSpec) -> dict[str, str]:
    """What every trial starts from: ``{"preset": ...}`` or ``{"algorithm": ..., "env": ...}``."""
    return (
        {"preset": spec.preset} if spec.preset else {"algorithm": spec.algorithm, "env": spec.env}
    )


def param_space_fixed(spec: TuneSpec) -> dict[str, Any]:
    """The overrides every trial shares (``resources``, ``set``, ``data``), without the search
    space."""
    overrides: dict[str, Any] = {}
    for k, v in spec.resources.items():
        set_override(overrides, f"{RESOURCE_KEYS[k][0]}.{k}", v)
    for k, v in spec.fixed.items():
        set_override(overrides, k, v)
    if spec.data:  # offline algorithms: every trial reads the same dataset
        overrides["data"] = spec.data if is_hub_id(spec.data) else str(Path(spec.data).resolve())
    return overrides


def param_space(spec: TuneSpec) -> dict[str, Any]:
    """The Tuner's param space: ``{"base": preset or algorithm+env, "overrides": nested}``."""
    overrides = param_space_fixed(spec)
    for k, v in spec.search_space.items():
        set_override(overrides, k, to_domain(v))
    return {"base": base_of(spec), "overrides": overrides}


def apply_resource_flags(
    spec: TuneSpec,
    *,
    num_env_runners: int | None = None,
    cpus_per_trial: float | None = None,
    num_gpus_per_learner: float | None = None,
) -> TuneSpec:
    """Put ``vla-ray tune``'s resource flags into ``spec.resources`` (they replace the YAML's).

    ``cpus_per_trial``: as many EnvRunners as fit beside the driver/learner in that many CPUs.
    """
    if num_env_runners is not None and cpus_per_trial is not None:
        raise ValueError("--num-env-runners/--cpus-per-trial: give one of them")
    if num_env_runners is not None:
        if num_env_runners < 0:
            raise ValueError(f"--num-env-runners: expected an integer >= 0, got {num_env_runners}")
        spec.resources["num_env_runners"] = num_env_runners
    if num_gpus_per_learner is not None:
        if num_gpus_per_learner < 0:
            raise ValueError(f"--num-gpus-per-learner: expected >= 0, got {num_gpus_per_learner}")
        spec.resources["num_gpus_per_learner"] = num_gpus_per_learner
    if cpus_per_trial is not None:
        main_cpus = trial_resources(spec, num_env_runners=0).get("CPU", 0.0)
        per_runner = float(spec.resources.get("num_cpus_per_env_runner") or 1)
        fit = math.floor((cpus_per_trial - main_cpus) / per_runner + 1e-9)
        if fit < 0:
            raise ValueError(
                f"--cpus-per-trial: expected at least {main_cpus:g} (the driver/learner's CPUs), "
                f"got {cpus_per_trial:g}"
            )
        spec.resources["num_env_runners"] = fit
    return spec


def trial_resources(spec: TuneSpec, *, num_env_runners: int | None = None) -> dict[str, float]:
    """What one trial reserves (its RLlib placement group: driver/learners + EnvRunners), from
    the preset, ``set`` and ``resources`` (search-space values are not counted)."""
    overrides = param_space_fixed(spec)
    if num_env_runners is not None:
        set_override(overrides, "env_runners.num_env_runners", num_env_runners)
    trial = {"base": base_of(spec), "overrides": overrides}
    pgf = trainable_class(spec).default_resource_request(trial)
    return {k: float(v) for k, v in pgf.required_resources.items() if v}


def check_trial_fits(spec: TuneSpec, cluster: dict[str, float]) -> int | None:
    """ValueError when one trial needs more CPUs or GPUs than ``cluster`` has (it would wait in
    PENDING for ever): what a trial needs, what the cluster has and which setting to lower.

    Trials that read a dataset (offline algorithms) also need :data:`RAY_DATA_CPUS` left free
    for Ray Data's read tasks, which run outside the trial's reservation; for them the number of
    trials that fit at once is returned (None: no limit from here).
    """
    need = trial_resources(spec)
    base = spec_from_trial_config({"base": base_of(spec), "overrides": param_space_fixed(spec)})
    spare = RAY_DATA_CPUS if base.settings.get("data") else 0
    cpus = cluster.get("CPU", 0.0) - spare
    short = [
        k
        for k, have in (("CPU", cpus), ("GPU", cluster.get("GPU", 0.0)))
        if need.get(k, 0.0) > have + 1e-9
    ]
    if not short:
        return max(1, math.floor(cpus / need["CPU"] + 1e-9)) if spare and need.get("CPU") else None
    runners = base.settings["env_runners"]
    n = int(runners.get("num_env_runners", 0) or 0)
    per_runner = float(runners.get("num_cpus_per_env_runner") or 1)
    main_cpus = trial_resources(spec, num_env_runners=0).get("CPU", 0.0)
    fix = []
    if "CPU" in short:
        fit = math.floor((cpus - main_cpus) / per_runner + 1e-9)
        if fit >= 0:
            fix.append(
                f"lower the EnvRunners per trial: --num-env-runners {fit} or --cpus-per-trial "
                f"{main_cpus + fit * per_runner:g} (resources.num_env_runners in the YAML)"
            )
        else:
            fix.append("run on a machine or cluster with more CPUs")
    if "GPU" in short:
        fix.append("lower --num-gpus-per-learner (resources.num_gpus_per_learner), e.g. 0")
    have = ", ".join(f"{cluster.get(k, 0.0):g} {k}s" for k in ("CPU", "GPU"))
    data = f", and {spare} CPU must stay free for Ray Data to read the dataset" if spare else ""
    raise ValueError(
        f"{spec.source}: one trial needs {need.get('CPU', 0.0):g} CPUs and "
        f"{need.get('GPU', 0.0):g} GPUs ({main_cpus:g} CPU for the driver/learner + {n} "
        f"EnvRunner(s) x {per_runner:g} CPU){data}, but this Ray cluster has {have}: no trial "
        f"could start. To fit: {'; '.join(fix)}."
    )


def cluster_resources() -> dict[str, float]:
    """CPUs/GPUs of the running Ray cluster."""
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


def spec_from_trial_config(config: dict[str, Any]) -> RunSpec:
    """The RunSpec of one trial (its config is a resolved :func:`param_space`)."""
    from vla_ray.presets import Preset, get_preset

    base = config["base"]
    if base.get("preset"):
        preset = get_preset(base["preset"])
    else:
        name = f"{base['algorithm']}-{base['env'].split('/')[-1]}"
        preset = Preset(name=name, algorithm=base["algorithm"], env=base["env"], description="tune")
    return resolve(preset, config.get("overrides") or {})


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config.get("overrides", {})
    for p in override_path(dotted):
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


class VLATrialMixin:
    """Mixin that makes an algorithm's RLlib ``Algorithm`` class the trial's Tune trainable
    (RLlib's ``Algorithm`` is a ``tune.Trainable``; :func:`trainable_class` builds the
    subclass). What it adds to the Algorithm: it is built from a trial's sample of
    :func:`param_space` (``resolve(preset, overrides)`` -> ``build_algorithm_config``, so
    ``--data`` hooks and resources are those of ``vla-ray train``); results carry the summary
    scalars (:data:`REPORTED`, the names ``metric:`` may use) at the top level; checkpoints have
    ``vla-ray train``'s layout (``vla_ray.checkpoint.write_checkpoint``: the RLlib checkpoint,
    ``vla_ray_meta.json`` and the ``vla/`` export) and restore as ``vla-ray train --resume``
    does; its resources are the algorithm's placement group (learner + EnvRunners).
    """

    run_spec: RunSpec
    trial_config: dict[str, Any]

    def __init__(self, config: Any = None, env: Any = None, **kwargs: Any) -> None:
        self._validation: dict[str, float] = {}  # the latest validation metrics
        if isinstance(config, dict) and "base" in config:  # a trial's param_space sample
            self.trial_config = copy.deepcopy(config)
            self.run_spec = spec_from_trial_config(config)
            config = build_algorithm_config(self.run_spec)
        super().__init__(config=config, env=env, **kwargs)

    def get_auto_filled_metrics(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # results name the trial's sample of the search space (what Tune searched), not the
        # AlgorithmConfig it resolves to
        auto = super().get_auto_filled_metrics(*args, **kwargs)
        auto["config"] = copy.deepcopy(self.trial_config)
        return auto

    def step(self) -> dict[str, Any]:
        result = super().step()
        row = summarize(result)
        for k in REPORTED:
            value = row.get(k)
            result[k] = float("nan") if value is None else value
        # at iteration 1 and every eval_every, as ``vla-ray train``; the latest in every result
        scores = iteration_metrics(self, self.run_spec.settings, self.iteration + 1)
        self._validation.update((k, scores[k]) for k in SCALAR_METRICS if k in scores)
        result.update(self._validation)
        return result

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        env_steps = int((self._last_result or {}).get("env_steps", 0) or 0)
        info = dict(iteration=self.iteration, env_steps=env_steps, trial=self.trial_name)
        write_checkpoint(self, self.run_spec, Path(checkpoint_dir), info)

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        # as ``vla-ray train --resume`` does (offline algorithms have no env_runner_group)
        restore_algorithm(self, checkpoint_dir)

    def cleanup(self) -> None:
        from vla_ray.data.stream import close_offline_data

        close_offline_data(self.offline_data)  # as ``vla-ray train`` does at its end
        super().cleanup()

    @classmethod
    def default_resource_request(cls, config: Any):
        """The RLlib algorithm's placement group: main process/learners + EnvRunners."""
        if isinstance(config, dict) and "base" in config:
            config = build_algorithm_config(spec_from_trial_config(config))
        return super().default_resource_request(config)


def trainable_class(spec: TuneSpec) -> type:
    """The Tune trainable of ``spec``'s trials: its algorithm's RLlib ``Algorithm`` class with
    :class:`VLATrialMixin` mixed in."""
    from vla_ray.algorithms import get_algorithm
    from vla_ray.presets import get_preset

    base = base_of(spec)
    name = base.get("algorithm") or get_preset(base["preset"]).algorithm
    return _trainable_for(get_algorithm(name)().algo_class)


@functools.cache
def _trainable_for(algo_class: type) -> type:
    # named VLATrainable (Tune names trials and their directories after it)
    return type(
        "VLATrainable",
        (VLATrialMixin, algo_class),
        {"__module__": __name__, "__doc__": f"{algo_class.__name__} as a vla-ray Tune trial."},
    )


class RunFilesCallback(LoggerCallback):
    """Writes ``config.json`` (the resolved settings) and ``metrics.jsonl`` in each trial dir."""

    def __init__(self) -> None:
        self._files: dict[Any, Any] = {}

    def log_trial_start(self, trial: Any) -> None:
        trial.init_local_path()
        run = spec_from_trial_config(trial.config)
        Path(trial.local_path, "config.json").write_text(
            json.dumps(run.to_dict(), indent=2, default=str)
        )
        if trial not in self._files:
            self._files[trial] = Path(trial.local_path, "metrics.jsonl").open("a")  # noqa: SIM115

    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        if trial not in self._files:
            self.log_trial_start(trial)
        row = {k: _finite(result.get(k)) for k in REPORTED}
        row.update((k, _finite(result[k])) for k in SCALAR_METRICS if k in result)
        row.update(
            iteration=result.get("training_iteration"),
            time_s=round(float(result.get("time_total_s", 0.0)), 2),
        )
        self._files[trial].write(json.dumps(row) + "\n")
        self._files[trial].flush()

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        f = self._files.pop(trial, None)
        if f is not None:
            f.close()


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _trial_dirname(trial: Any) -> str:
    return str(trial)


# ---- running ------------------------------------------------------------------------------------
def make_scheduler(spec: TuneSpec) -> Any:
    """The Tune scheduler named by ``scheduler.type`` (FIFO, ASHA or PBT over ``overrides``)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    kind = spec.scheduler["type"]
    params = {k: v for k, v in spec.scheduler.items() if k != "type"}
    if kind == "asha":
        return ASHAScheduler(time_attr="training_iteration", **params)
    if kind == "pbt":
        mutations: dict[str, Any] = {}
        for key, value in params.pop("hyperparam_mutations").items():
            set_override(mutations, key, to_domain(value))
        return PopulationBasedTraining(
            time_attr="training_iteration",
            hyperparam_mutations={"overrides": mutations},
            **params,
        )
    return FIFOScheduler()


def make_search_alg(spec: TuneSpec) -> Any:
    """OptunaSearch for ``search_alg.type: optuna``; None for Tune's random/grid generator."""
    if spec.search_alg["type"] != "optuna":
        return None
    try:
        import optuna
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ValueError(
            'search_alg optuna needs the optuna package: pip install "vla-ray[tune]"'
        ) from None
    seed = spec.search_alg.get("seed")
    sampler = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
    }[spec.search_alg.get("sampler", "tpe")]()
    return OptunaSearch(sampler=sampler)


def _stop(spec: TuneSpec, stop_iters: int | None) -> dict[str, float]:
    if stop_iters is not None:
        return {"training_iteration": stop_iters}
    stop = dict(spec.stop)
    if not stop:
        # no stop in the YAML: the preset's, as `vla-ray train` does
        base = spec_from_trial_config({"base": base_of(spec), "overrides": {}})
        stop = {k: v for k, v in base.settings.get("stop", {}).items() if k in STOP_KEYS}
    if not stop:
        raise ValueError(f"{spec.source}: stop: give --stop-iters or a `stop:` section")
    return {STOP_KEYS[k]: v for k, v in stop.items()}


def build_tuner(
    spec: TuneSpec,
    output: str | os.PathLike,
    *,
    num_samples: int | None = None,
    stop_iters: int | None = None,
    callbacks: list[Any] | None = None,
    verbose: int = 1,
) -> tune.Tuner:
    """A ``tune.Tuner`` for ``spec`` whose experiment directory is ``output``."""
    from ray.tune import CheckpointConfig, RunConfig, TuneConfig

    out = Path(output).resolve()
    ck = spec.checkpoint
    frequency = ck.get("frequency")
    if frequency is None:
        frequency = int(
            spec_from_trial_config({"base": base_of(spec), "overrides": {}}).settings[
                "checkpoint_every"
            ]
        )
    if spec.scheduler["type"] == "pbt":
        frequency = int(spec.scheduler.get("perturbation_interval", 5))
    run_config = RunConfig(
        name=out.name,
        storage_path=str(out.parent),
        stop=_stop(spec, stop_iters),
        callbacks=[RunFilesCallback(), *(callbacks or [])],
        checkpoint_config=CheckpointConfig(
            num_to_keep=int(ck.get("num_to_keep", 1)),
            checkpoint_score_attribute=spec.checkpoint_metric,
            checkpoint_score_order=spec.checkpoint_mode,
            checkpoint_frequency=frequency,
            checkpoint_at_end=True,
        ),
        verbose=verbose,
    )
    tune_config = TuneConfig(
        metric=spec.metric,
        mode=spec.mode,
        num_samples=num_samples or spec.num_samples,
        max_concurrent_trials=spec.max_concurrent_trials,
        scheduler=make_scheduler(spec),
        search_alg=make_search_alg(spec),
        trial_dirname_creator=_trial_dirname,
        trial_name_creator=_trial_dirname,
    )
    return tune.Tuner(
        trainable_class(spec),
        param_space=param_space(spec),
        tune_config=tune_config,
        run_config=run_config,
    )


def run_tune(
    spec: TuneSpec,
    output: str | os.PathLike,
    *,
    num_samples: int | None = None,
    stop_iters: int | None = None,
    resume: bool = False,
    callbacks: list[Any] | None = None,
    verbose: int = 1,
    num_cpus: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the search; writes ``summary.json`` in ``output`` and returns it."""
    from vla_ray.train import init_ray

    check_available(spec)
    for flag, value in (("--num-samples", num_samples), ("--stop-iters", stop_iters)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}: expected a positive integer, got {value}")
    out = Path(output).resolve()
    if resume and not tune.Tuner.can_restore(str(out)):
        raise FileNotFoundError(f"--resume: {str(out)!r} holds no Tune experiment to resume")
    if not resume and out.exists() and any(p.name != LOG_NAME for p in out.iterdir()):
        raise ValueError(f"--output {str(out)!r} is not empty; use --resume or a new directory")
    init_ray(num_cpus)
    if os.environ.get("RAY_ADDRESS"):
        # a cluster joined by address may autoscale: a trial too big for it now may fit later
        try:
            check_trial_fits(spec, cluster_resources())
        except ValueError as err:
            print(f"warning: {err} (an autoscaling cluster may still add the nodes)")
    else:
        at_once = check_trial_fits(spec, cluster_resources())
        if at_once is not None and (spec.max_concurrent_trials or at_once + 1) > at_once:
            # more concurrent trials would take every CPU, and Ray Data's reads would wait
            print(f"tune: {at_once} trial(s) at a time (CPUs left free for Ray Data's reads)")
            spec.max_concurrent_trials = at_once
    if resume:
        tuner = tune.Tuner.restore(str(out), trainable=trainable_class(spec), resume_errored=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "tune_config.json").write_text(
            json.dumps({k: v for k, v in vars(spec).items()}, indent=2, default=str)
        )
        tuner = build_tuner(
            spec,
            out,
            num_samples=num_samples,
            stop_iters=stop_iters,
            callbacks=callbacks,
            verbose=verbose,
        )
    t0 = time.time()
    grid = tuner.fit()
    summary = summarize_results(grid, spec, out, wall_s=time.time() - t0)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _link(link: Path, target: str | None) -> None:
    """Point ``link`` at ``target`` (relative), replacing it atomically; remove it for None."""
    tmp = link.parent / f".{link.name}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    if target is None:
        if link.is_symlink():
            link.unlink()
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


def summarize_results(
    grid: Any, spec: TuneSpec, output: Path, wall_s: float = 0.0
) -> dict[str, Any]:
    """Per trial: searched values, metric (last and best), best/last checkpoints; the best trial."""
    metric, mode = spec.metric, spec.mode
    ck_metric, ck_mode = spec.checkpoint_metric, spec.checkpoint_mode
    keys = list(spec.search_space)
    if spec.scheduler["type"] == "pbt":
        keys += [k for k in spec.scheduler.get("hyperparam_mutations", {}) if k not in keys]
    trials = []
    best_value, best_trial = None, None
    # in trial-name order, so ties go to the same trial on every run (and after --resume)
    for result in sorted(grid, key=lambda r: Path(r.path).name):
        path = Path(result.path)
        df = result.metrics_dataframe
        series = df[metric] if df is not None and metric in df else None
        values = [] if series is None else [v for v in series.tolist() if _finite(v) is not None]
        best = (max if mode == "max" else min)(values) if values else None
        best_ckpt = None
        if result.best_checkpoints:
            try:
                best_ckpt = result.get_best_checkpoint(ck_metric, ck_mode).path
            except (ValueError, KeyError, RuntimeError):
                best_ckpt = None
        last_ckpt = result.checkpoint.path if result.checkpoint else None
        best_link, last_link = run_checkpoints(path)
        _link(best_link, best_ckpt or last_ckpt)
        _link(last_link, last_ckpt)
        m = result.metrics or {}
        best_iter = None
        meta = Path(best_ckpt or last_ckpt or "", META_NAME)
        if (best_ckpt or last_ckpt) and meta.is_file():
            best_iter = json.loads(meta.read_text()).get("iteration")
        row = dict(
            trial=path.name,
            status="ERROR" if result.error else "TERMINATED",
            params={k: _get(result.config or {}, k) for k in keys},
            iterations=m.get("training_iteration"),
            env_steps=m.get("env_steps"),
            last=_finite(m.get(metric)),
            best=best,
            best_checkpoint=best_ckpt or last_ckpt,
            best_checkpoint_iteration=best_iter,
            last_checkpoint=last_ckpt,
            path=str(path),
            error=str(result.error) if result.error else None,
        )
        trials.append(row)
        if best is not None and (
            best_value is None or (best > best_value if mode == "max" else best < best_value)
        ):
            best_value, best_trial = best, row
    summary = dict(
        config=spec.source,
        output=str(output),
        metric=metric,
        mode=mode,
        wall_s=round(wall_s, 1),
        trials=trials,
        best_trial=best_trial["trial"] if best_trial else None,
        best_value=best_value,
        best_params=best_trial["params"] if best_trial else None,
        best_checkpoint=best_trial["best_checkpoint"] if best_trial else None,
    )
    if best_trial and spec.preset:
        # the best trial's settings as one `vla-ray train` run (e.g. to debug it with --local)
        settings = {f"{RESOURCE_KEYS[k][0]}.{k}": v for k, v in spec.resources.items()}
        settings.update(spec.fixed)
        settings.update(best_trial["params"])
        summary["reproduce"] = " ".join(
            ["vla-ray train --preset", spec.preset]
            + [f"--set {shlex.quote(f'{k}={json.dumps(v)}')}" for k, v in settings.items()]
        )
    return summary


def _cell(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def format_table(summary: dict[str, Any]) -> str:
    """The results table printed at the end of a search (best trial marked with *)."""
    trials = summary["trials"]
    keys = list(trials[0]["params"]) if trials else []
    metric = summary["metric"]
    header = [
        "trial",
        "status",
        *keys,
        "iter",
        "env_steps",
        f"{metric} (last)",
        f"{metric} (best)",
        "best ckpt iter",
    ]
    rows = []
    for t in trials:
        mark = "*" if t["trial"] == summary["best_trial"] else " "
        rows.append(
            [
                f"{mark}{t['trial']}",
                t["status"],
                *(_cell(t["params"][k]) for k in keys),
                _cell(t["iterations"]),
                _cell(t["env_steps"]),
                _cell(t["last"]),
                _cell(t["best"]),
                _cell(t.get("best_checkpoint_iteration")),
            ]
        )
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if summary["best_trial"]:
        lines.append("")
        lines.append(
            f"best trial: {summary['best_trial']}  {metric}={_cell(summary['best_value'])} "
            f"({summary['mode']})  params: "
            + ", ".join(f"{k}={_cell(v)}" for k, v in (summary["best_params"] or {}).items())
        )
        lines.append(f"best checkpoint: {summary['best_checkpoint']}")
        if summary.get("reproduce"):
            lines.append(f"reproduce: {summary['reproduce']}")
    else:
        lines.append("")
        lines.append(f"no trial reported {metric}")
    return "\n".join(lines)
