"""Training glue: preset + overrides -> RLlib AlgorithmConfig -> training loop with checkpoints.

Each run's output directory holds ``config.json`` (the resolved settings), ``metrics.jsonl``
(one JSON line per iteration), and ``checkpoints/last`` + ``checkpoints/best`` (RLlib checkpoints,
each with a ``vla_ray_meta.json`` naming the env, and a ``vla/`` ``save_pretrained`` export).
With ``keep_checkpoints=true``, every periodic checkpoint is also kept as
``checkpoints/iter_NNNNNN`` (e.g. to pick a start policy from the middle of a run).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vla_ray.fsutil import OutputExistsError, recover_dir, replace_dir, temp_path
from vla_ray.logs import LOG_NAME
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
META_NAME = "vla_ray_meta.json"
DEFAULT_MODULE_ID = "default_policy"
MODULE_SUBDIR = Path("learner_group") / "learner" / "rl_module" / "default_policy"


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
    settings["training"] = copy.deepcopy({**algo.TRAINING_DEFAULTS, **settings["training"]})
    settings["model"] = copy.deepcopy({**algo.MODEL_DEFAULTS, **settings["model"]})
    settings.update(
        seed=0, checkpoint_every=10, checkpoint_metric="success_rate", keep_checkpoints=False
    )
    offline = bool(getattr(algo, "OFFLINE", False))
    if offline:  # val_fraction: held-out episodes (vla_ray.data.validation)
        settings.update(data=None, val_fraction=0.0)
    if _evaluates(algo):
        settings.update(eval_every=25 if offline else 1, eval_episodes=p.eval_episodes)
    _merge(settings, copy.deepcopy(overrides or {}))
    safety = (settings.get("env_config") or {}).get("safety")
    if isinstance(safety, str):  # the rules themselves go into config.json and checkpoints
        from vla_ray.safety import load_rules_file

        settings["env_config"]["safety"] = load_rules_file(safety)
    if data is not None:
        settings["data"] = str(data)
    # online algorithms that learn from demonstrations too (GAIL) set NEEDS_DATA
    needs_data = offline or bool(getattr(algo, "NEEDS_DATA", False))
    if needs_data and "data" not in settings:
        settings["data"] = None
    if needs_data and not settings.get("data"):
        raise ValueError(
            f"--data: {p.algorithm} trains from a dataset; give --data PATH "
            "(e.g. one written by `vla-ray collect`)"
        )
    # online algorithms that may start from demonstrations (DAgger) set ACCEPTS_DATA
    accepts_data = needs_data or bool(getattr(algo, "ACCEPTS_DATA", False))
    if not accepts_data and settings.get("data"):
        raise ValueError(f"--data: {p.algorithm} is an online algorithm and reads no dataset")
    if settings.get("val_fraction") and not offline:
        raise ValueError(f"--val-fraction: {p.algorithm} is not an offline algorithm")
    settings["env_config"] = chunk_env_config(
        p.algorithm, settings["model"], settings["env_config"]
    )
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
    if not getattr(get_algorithm(algorithm), "ACTION_CHUNKS", False):
        takes = [a for a in ALGORITHMS if getattr(get_algorithm(a), "ACTION_CHUNKS", False)]
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


def register_envs() -> None:
    """Register every vla-ray env id with Tune so EnvRunner processes can build them."""
    from ray.tune.registry import register_env

    from vla_ray.envs import ENV_IDS

    for env_id in ENV_IDS:
        register_env(env_id, _EnvCreator(env_id))


class _EnvCreator:
    """Picklable env factory run inside EnvRunners."""

    def __init__(self, env_id: str):
        self.env_id = env_id

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
        # ``expert_beta`` (DAgger) is not an env argument: it wraps the env in ExpertMixing
        beta = kwargs.pop("expert_beta", None)
        expert = kwargs.pop("expert", None)  # and names its expert (the env's by default)
        # ``group_seeding`` (GRPO) wraps the env in GroupSeeding (resets from a seed schedule)
        group_seeding = kwargs.pop("group_seeding", False)
        # ``action_chunk`` (model.chunk_size > 1) wraps it in ExecuteChunk, outermost
        chunks = kwargs.pop(CHUNK_CONFIG_KEY, None)
        # ``safety`` (a rules file) wraps the env in SafetyWrapper, innermost: the shield sees
        # the action the env will execute (after any expert mixing)
        env = make_env(self.env_id, kwargs)
        if beta is not None:
            from vla_ray.envs.experts import ExpertMixing

            env = ExpertMixing(env, expert_beta=beta, **({"expert": expert} if expert else {}))
        if group_seeding:
            from vla_ray.algorithms.grpo import GroupSeeding

            env = GroupSeeding(env)
        return wrap_action_chunks(env, chunks)


def build_algorithm_config(spec: RunSpec):
    """The RLlib AlgorithmConfig for ``spec`` (VLAModule, runners, fault tolerance, metrics)."""
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from vla_ray.algorithms import get_algorithm
    from vla_ray.callbacks import SuccessRateCallback
    from vla_ray.envs import CARLA_ID
    from vla_ray.models.lerobot_vla import check_algorithm as check_lerobot_algorithm
    from vla_ray.rl_module import VLAModule
    from vla_ray.scale import fault_tolerance_settings, resolve_gpus

    s = dict(spec.settings)
    s["env_config"] = chunk_env_config(spec.algorithm, s["model"], s["env_config"])
    algo_mod = get_algorithm(spec.algorithm)
    check_lerobot_algorithm(spec.algorithm, s["model"])  # smolvla / pi0: bc, dagger, ppo, grpo, sac
    register_envs()
    runners = dict(s["env_runners"])
    inference = runners.pop("inference", None)  # the shared inference actors (vla_ray.inference)
    runners.setdefault("rollout_fragment_length", "auto")
    runners.setdefault("num_cpus_per_env_runner", 1)
    learners, runners = resolve_gpus(s["learners"], runners)  # "auto": 1 GPU when there is one
    if spec.env == CARLA_ID:  # one server per sub-env: say so before any EnvRunner starts
        from vla_ray.envs.carla_env import check_server_count

        check_server_count(
            s["env_config"],
            runners.get("num_env_runners", 0),
            runners.get("num_envs_per_env_runner", 1),
        )
    cfg = (
        get_algorithm(spec.algorithm)
        .make_config()
        .environment(spec.env, env_config=s["env_config"])
        .framework("torch")
        .env_runners(**runners)
        .learners(**learners)
        .rl_module(
            rl_module_spec=RLModuleSpec(
                # algorithms needing more than the policy (critics, a sequence model) give
                # their VLAModule subclass as ``module_class()``
                module_class=getattr(algo_mod, "module_class", lambda: VLAModule)(),
                model_config=s["model"],
            )
        )
        .training(**s["training"])
        .callbacks(SuccessRateCallback)
        .fault_tolerance(**fault_tolerance_settings(s))
        .debugging(seed=s["seed"])
        .reporting(metrics_num_episodes_for_smoothing=100)
    )
    if inference is not None:
        from vla_ray.inference import use_inference_service

        use_inference_service(cfg, inference)
    if getattr(algo_mod, "OFFLINE", False):
        from vla_ray.data.convert import offline_input  # any format -> RLlib episodes
        from vla_ray.data.stream import VLAPreLearner, offline_data_settings

        files = offline_input(s["data"], spec.env, s["env_config"])
        if s.get("val_fraction"):  # held-out episodes, scored in train(): data.validation
            from vla_ray.data.validation import split_files

            files = split_files(files, s["val_fraction"], s["seed"])[0]
        # fresh uniform batches over the whole dataset, one episode read per iteration
        cfg.offline_data(**offline_data_settings(files))
        if cfg.prelearner_class is None:
            cfg.offline_data(prelearner_class=VLAPreLearner)
    if getattr(algo_mod, "use_data", None) is not None:  # e.g. GAIL's / DAgger's expert demos
        algo_mod.use_data(cfg, s.get("data"))
    if _evaluates(algo_mod):  # offline algorithms and DAgger: deterministic evaluation episodes
        eval_env = getattr(algo_mod, "evaluation_env_config", dict)(dict(s["env_config"]))
        cfg.evaluation(
            evaluation_interval=int(s["eval_every"]),
            evaluation_duration=int(s["eval_episodes"]),
            evaluation_duration_unit="episodes",
            # the driver's EnvRunner evaluates: remote runners are busy sampling (or absent)
            evaluation_num_env_runners=0,
            evaluation_config={"env_config": eval_env, "explore": False},
        )
    return cfg


def _evaluates(algo_mod) -> bool:
    """Algorithms whose training episodes do not measure the policy (offline data, or DAgger's
    expert mixing) report deterministic evaluation episodes instead."""
    return bool(getattr(algo_mod, "OFFLINE", False) or getattr(algo_mod, "EVALUATE", False))


def init_ray(num_cpus: int | None = None) -> None:
    """Start (or join, with RAY_ADDRESS) Ray once, with single-threaded torch in workers."""
    import ray

    if ray.is_initialized():
        return
    env_vars = {"OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    # where EnvRunners find a CARLA server (vla_ray/Carla-v0)
    env_vars.update({k: os.environ[k] for k in ("CARLA_HOST", "CARLA_PORT") if k in os.environ})
    kwargs: dict[str, Any] = dict(include_dashboard=False, runtime_env={"env_vars": env_vars})
    if not os.environ.get("RAY_ADDRESS") and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)


def summarize(result: dict[str, Any], evaluated: bool = False) -> dict[str, Any]:
    """The numbers a person watches, from an RLlib result dict.

    With ``evaluated`` (an iteration that ran evaluation episodes), the episode numbers are the
    evaluation's (offline algorithms sample no training episodes; DAgger's mix in the expert).
    """
    runners = result.get("env_runners", {}) or {}
    evaluation = (result.get("evaluation") or {}).get("env_runners") or {}
    if evaluated and evaluation.get("episode_return_mean") is not None:
        runners = {**evaluation, **{k: v for k, v in runners.items() if "lifetime" in k}}
    return dict(
        iteration=int(result.get("training_iteration", 0)),
        env_steps=int(
            result.get("num_env_steps_sampled_lifetime")
            or runners.get("num_env_steps_sampled_lifetime", 0)
        ),
        episode_return_mean=_num(runners.get("episode_return_mean")),
        episode_len_mean=_num(runners.get("episode_len_mean")),
        success_rate=_num(runners.get("success_rate")),
        success_by_target={
            str(k): _num(v) for k, v in (runners.get("success_by_target") or {}).items()
        },
        # interventions per episode by safety rule id, and the episode's safety cost
        safety={str(k): _num(v) for k, v in (runners.get("safety") or {}).items()},
        episode_cost=_num(runners.get("episode_cost")),
        learner=_learner_stats(result),
    )


# Learner statistics worth watching (when the algorithm reports them), per module.
LEARNER_KEYS = (
    "total_loss",
    "policy_loss",
    "vf_loss",
    "vf_explained_var",
    "entropy",
    "mean_kl_loss",
    "aux_loss",  # the module's auxiliary loss (keypoint reconstruction), when it has one
    # PPO-Lagrangian (ppo_lag): the multiplier and the batch's mean episode cost
    "lagrange_multiplier",
    "batch_episode_cost",
    # SAC family (sac, cql, iql)
    "qf_loss",
    "qf_mean",
    "alpha_loss",
    "alpha_value",
    # offline RL / imitation (td3bc, dt, gail)
    "critic_loss",
    "actor_loss",
    "action_mse",
    "disc_loss",
    "disc_accuracy",
)


def _learner_stats(result: dict[str, Any]) -> dict[str, float]:
    """The ``LEARNER_KEYS`` of the default module's learner results (empty when absent)."""
    stats = (result.get("learners") or {}).get("default_policy") or {}
    out = {k: _num(stats[k]) for k in LEARNER_KEYS if k in stats}
    return {k: round(v, 5) for k, v in out.items() if v is not None}


def _num(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _export_vla(algo, directory: Path) -> None:
    """``save_pretrained`` of the policy's VLA, from an EnvRunner or (offline) the learner."""
    if algo.env_runner_group is not None:
        algo.get_module().vla.save_pretrained(directory)
        return
    target = str(directory.resolve())
    algo.learner_group.foreach_learner(
        lambda learner: learner.module[DEFAULT_MODULE_ID].vla.save_pretrained(target)
    )


def write_checkpoint(algo, spec: RunSpec, directory: Path, info: dict[str, Any]) -> Path:
    """Write an RLlib checkpoint + ``vla_ray_meta.json`` + ``vla/`` export into ``directory``."""
    directory = Path(directory)
    algo.save_to_path(str(directory.resolve()))
    meta = dict(
        env=spec.env,
        env_config=spec.settings["env_config"],
        preset=spec.preset,
        # what a sequence policy needs to be run again (the Decision Transformer's window)
        training=spec.settings["training"],
        **info,
    )
    (directory / META_NAME).write_text(json.dumps(meta, indent=2, default=str))
    from vla_ray.algorithms import get_algorithm

    # algorithms whose policy is more than a VLA (e.g. the Decision Transformer) set
    # EXPORTS_VLA = False: their RLlib checkpoint is the policy
    if getattr(get_algorithm(spec.algorithm), "EXPORTS_VLA", True):
        _export_vla(algo, directory / "vla")
        (directory / "vla" / META_NAME).write_text(json.dumps(meta, indent=2, default=str))
        from vla_ray.model_card import write_model_card

        write_model_card(directory / "vla", meta=json.loads(json.dumps(meta, default=str)))
    return directory


def save_checkpoint(algo, spec: RunSpec, target: Path, info: dict[str, Any]) -> Path:
    """Write an RLlib checkpoint + meta + ``vla/`` export to ``target``, replacing it atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    try:
        write_checkpoint(algo, spec, tmp, info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, target)


class ResumeError(FileNotFoundError):
    """``--resume`` was asked for but the run directory has no checkpoint to resume from."""


# entries created in the run directory before training starts: a tracker's (``--wandb``) and
# the log file of ``vla_ray.logs.quiet_logs``
_TRACKER_ENTRIES = frozenset({"wandb", LOG_NAME})
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)(?:-.*)?$")


def recover_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Recover or clean up after an interrupted checkpoint save in ``ckpt_dir``: a checkpoint
    moved aside but not yet replaced is put back, unfinished temporary ones are removed.
    Returns the removed paths."""
    if not ckpt_dir.is_dir():
        return []
    names = {m["name"] for p in ckpt_dir.iterdir() if (m := _LEFTOVER.match(p.name))}
    return [p for name in sorted(names) for p in recover_dir(ckpt_dir / name)]


def restore_algorithm(algo: Any, path: str | os.PathLike) -> None:
    """``algo.restore_from_path(path)``, also for offline algorithms (BC, CQL, ...): RLlib
    2.60's override then pushes the restored weights to ``env_runner_group``, which an offline
    algorithm does not have (``None``: AttributeError). For them the checkpoint is restored by
    the base ``Checkpointable`` and the weights go to the evaluation EnvRunners, if any."""
    path = str(Path(path).resolve())
    if algo.env_runner_group is not None:
        algo.restore_from_path(path)
        return
    from ray.rllib.utils.checkpoints import Checkpointable

    Checkpointable.restore_from_path(algo, path)
    if algo.eval_env_runner_group is not None:
        algo.eval_env_runner_group.sync_weights(
            from_worker_or_learner_group=algo.learner_group, inference_only=True
        )


def prepare_run_dir(
    output: str | os.PathLike, resume: bool, resume_if_exists: bool = False
) -> bool:
    """Check ``output`` before a run and say whether the run resumes.

    ``resume``: ``OUTPUT/checkpoints/last`` must exist (``ResumeError`` otherwise);
    ``resume_if_exists``: resume when it exists, else start fresh; neither: ``output`` must be
    new or empty (``OutputExistsError``; a tracker's ``wandb/`` folder does not count).
    Interrupted checkpoint saves are recovered or cleaned up first.
    """
    out = Path(output)
    ckpt_dir = out / "checkpoints"
    recover_checkpoints(ckpt_dir)
    has_last = (ckpt_dir / "last" / META_NAME).is_file()
    if resume and not has_last:
        raise ResumeError(
            f"--resume: no checkpoint to resume from at {ckpt_dir / 'last'}; expected the run "
            "directory of an earlier `vla-ray train` (--resume-if-exists starts fresh when "
            "there is none)"
        )
    if resume or (resume_if_exists and has_last):
        return True
    leftover = (
        sorted(p.name for p in out.iterdir() if p.name not in _TRACKER_ENTRIES)
        if out.is_dir()
        else []
    )
    if leftover and not resume_if_exists:
        raise OutputExistsError(
            f"--output: {out} is not empty (holds {', '.join(leftover[:5])}); pass --resume to "
            "continue that run, or choose another --output"
        )
    return False


def _trim_metrics(path: Path, upto: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to iteration ``upto`` (a resumed run writes the
    later ones again; an unreadable trailing line from a crash is dropped)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and int(row.get("iteration", 0)) <= upto:
            kept.append(line)
    tmp = temp_path(path)
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


def train(
    spec: RunSpec,
    output: str | os.PathLike,
    *,
    stop_iters: int | None = None,
    stop_timesteps: int | None = None,
    stop_seconds: float | None = None,
    resume: bool = False,
    resume_if_exists: bool = False,
    progress: bool = True,
    num_cpus: int | None = None,
    trackers: list[Any] | None = None,
) -> dict[str, Any]:
    """Train until a stop criterion; returns the final summary with the checkpoint paths.

    ``output`` must be new or empty unless ``resume`` (continue from its last checkpoint, which
    must exist) or ``resume_if_exists`` (continue when there is one); see ``prepare_run_dir``.

    ``trackers`` (see :mod:`vla_ray.tracking`) get each iteration's row and the final summary.
    """
    from tqdm import tqdm

    from vla_ray.algorithms import get_algorithm
    from vla_ray.data.validation import iteration_metrics

    out = Path(output)
    resume = prepare_run_dir(out, resume, resume_if_exists)
    out.mkdir(parents=True, exist_ok=True)
    if stop_iters is None and stop_timesteps is None and stop_seconds is None:
        # no explicit criterion: the preset's (explicit ones replace it entirely)
        stop = dict(spec.settings.get("stop", {}))
        stop_iters, stop_timesteps, stop_seconds = (
            stop.get("iters"),
            stop.get("timesteps"),
            stop.get("seconds"),
        )
    if stop_iters is None and stop_timesteps is None and stop_seconds is None:
        raise ValueError("stop: give --stop-iters, --stop-timesteps or a preset stop criterion")
    (out / "config.json").write_text(json.dumps(spec.to_dict(), indent=2, default=str))

    init_ray(num_cpus)
    algo = build_algorithm_config(spec).build_algo()
    evaluates = _evaluates(get_algorithm(spec.algorithm))
    ckpt_dir = out / "checkpoints"
    metric = spec.settings["checkpoint_metric"]
    best_value = -math.inf
    start_iter, t_offset = 0, 0.0
    if resume:
        restore_algorithm(algo, ckpt_dir / "last")
        meta = json.loads((ckpt_dir / "last" / META_NAME).read_text())
        start_iter, t_offset = meta["iteration"], meta.get("time_s", 0.0)
        best_value = meta.get("best_value", -math.inf)
    # rows past the checkpoint we continue from (written before a crash) would repeat
    _trim_metrics(out / "metrics.jsonl", start_iter)
    metrics_file = (out / "metrics.jsonl").open("a")
    # the bar follows one criterion: env steps, else iterations, else seconds
    unit = "steps" if stop_timesteps else ("it" if stop_iters else "s")
    total = stop_timesteps or stop_iters or stop_seconds
    bar = tqdm(total=total, disable=not progress, unit=unit)
    t0 = time.time() - t_offset
    last_steps, last_t = None, time.time()
    row: dict[str, Any] = {}
    summary: dict[str, Any] | None = None
    try:
        it = start_iter
        while True:
            result = algo.train()
            it += 1
            row = summarize(
                result, evaluated=evaluates and it % int(spec.settings["eval_every"]) == 0
            )
            row.update(  # --val-fraction
                iteration_metrics(algo, spec.settings, it, final=it == stop_iters)
            )
            now = time.time()
            steps = row["env_steps"]
            row["time_s"] = round(now - t0, 2)
            row["steps_per_s"] = (
                round((steps - last_steps) / max(now - last_t, 1e-9), 1)
                if last_steps is not None
                else None
            )
            last_steps, last_t = steps, now
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            for tracker in trackers or ():
                tracker.log(row, step=it)
            if progress:
                bar.n = min({"steps": steps, "it": it, "s": round(now - t0)}[unit], total)
                bar.set_postfix(
                    ret=_fmt(row["episode_return_mean"]),
                    success=_fmt(row["success_rate"]),
                    sps=row["steps_per_s"],
                    refresh=False,
                )
                bar.refresh()
                tqdm.write(_format_row(row))
            value = row.get(metric)
            if value is None and metric == "success_rate":
                value = row.get("episode_return_mean")
            done = (
                (stop_iters is not None and it >= stop_iters)
                or (stop_timesteps is not None and steps >= stop_timesteps)
                or (stop_seconds is not None and now - t0 >= stop_seconds)
            )
            info = dict(iteration=it, env_steps=steps, time_s=row["time_s"], metric=metric)
            if value is not None and value > best_value:
                best_value = value
                save_checkpoint(algo, spec, ckpt_dir / "best", {**info, "best_value": best_value})
            if done or it % int(spec.settings["checkpoint_every"]) == 0:
                save_checkpoint(algo, spec, ckpt_dir / "last", {**info, "best_value": best_value})
                if spec.settings["keep_checkpoints"]:
                    kept = ckpt_dir / f"iter_{it:06d}"
                    save_checkpoint(algo, spec, kept, {**info, "best_value": best_value})
            if done:
                break
        summary = dict(row, output=str(out), last_checkpoint=str(ckpt_dir / "last"))
        if (ckpt_dir / "best").exists():
            summary["best_checkpoint"] = str(ckpt_dir / "best")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    finally:
        bar.close()
        metrics_file.close()
        algo.stop()
        for tracker in trackers or ():
            tracker.finish(summary)
    return summary


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _format_row(row: dict[str, Any]) -> str:
    by_target = row.get("success_by_target") or {}
    per_target = (
        " (" + " ".join(f"{k} {_fmt(v)}" for k, v in sorted(by_target.items())) + ")"
        if by_target
        else ""
    )
    return (
        f"iter {row['iteration']:>4}  steps {row['env_steps']:>8}  "
        f"return {_fmt(row['episode_return_mean']):>7}  success {_fmt(row['success_rate']):>5}"
        f"{per_target}  len {_fmt(row['episode_len_mean']):>5}  "
        f"steps/s {_fmt(row['steps_per_s']):>6}  t {row['time_s']:.0f}s"
    )
