"""Training: a :class:`~vla_ray.run_spec.RunSpec` -> the algorithm's RLlib AlgorithmConfig ->
the training loop (metrics rows, progress, trackers, checkpoints).

Settings are resolved in :mod:`vla_ray.run_spec`; the run directory and checkpoint layout is
:mod:`vla_ray.checkpoint`'s. Both are re-exported here (``from vla_ray.train import resolve``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from vla_ray.checkpoint import (  # noqa: F401  (re-exported)
    BEST,
    CHECKPOINTS_DIR,
    DEFAULT_MODULE_ID,
    LAST,
    META_NAME,
    MODULE_SUBDIR,
    ResumeError,
    copy_checkpoint,
    export_vla,
    kept_name,
    prepare_run_dir,
    recover_checkpoints,
    restore_algorithm,
    run_checkpoints,
    save_checkpoint,
    write_checkpoint,
)
from vla_ray.env_factory import EnvFactory, register_envs  # noqa: F401  (re-exported)
from vla_ray.fsutil import temp_path
from vla_ray.run_spec import (  # noqa: F401  (re-exported)
    SECTIONS,
    TOP_LEVEL_KEYS,
    RunSpec,
    _merge,
    chunk_env_config,
    override_path,
    parse_overrides,
    parse_value,
    resolve,
    set_override,
)

_export_vla = export_vla  # the former private name (tests, benchmarks)
_EnvCreator = EnvFactory  # the former name of the env factory (tests)


def float_settings(cfg: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with each int made a float where the config's value is a float: ``--set
    training.kl_coeff=0`` parses as the int 0, and RLlib keeps the dtype (PPO's KL coefficient
    became an int tensor that its adaptive update cannot scale by 1.5)."""
    out = dict(settings)
    for key, value in settings.items():
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and isinstance(getattr(cfg, key, None), float)
        ):
            out[key] = float(value)
    return out


def build_algorithm_config(spec: RunSpec):
    """The RLlib AlgorithmConfig for ``spec`` (VLAModule, runners, fault tolerance, metrics)."""
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from vla_ray.algorithms import get_algorithm
    from vla_ray.callbacks import SuccessRateCallback
    from vla_ray.envs import CARLA_ID
    from vla_ray.models.lerobot_vla import check_algorithm as check_lerobot_algorithm
    from vla_ray.scale import fault_tolerance_settings, resolve_gpus

    s = dict(spec.settings)
    s["env_config"] = chunk_env_config(spec.algorithm, s["model"], s["env_config"])
    check_lerobot_algorithm(spec.algorithm, s["model"])  # smolvla / pi0: bc, dagger, ppo, grpo, sac
    register_envs(get_algorithm(spec.algorithm).ENV_WRAPPERS)
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
    cfg = get_algorithm(spec.algorithm)()
    cfg = (
        cfg.environment(spec.env, env_config=s["env_config"])
        .framework("torch")
        .env_runners(**runners)
        .learners(**learners)
        .rl_module(
            rl_module_spec=RLModuleSpec(
                # the algorithm's module (VLAModule, or a subclass with critics, a target
                # network or a sequence model) with the run's model settings
                module_class=cfg.get_default_rl_module_spec().module_class,
                model_config=s["model"],
            )
        )
        .training(**float_settings(cfg, s["training"]))
        .callbacks(SuccessRateCallback)
        .fault_tolerance(**fault_tolerance_settings(s))
        .debugging(seed=s["seed"])
        .reporting(metrics_num_episodes_for_smoothing=100)
    )
    if inference is not None:
        from vla_ray.inference import use_inference_service

        use_inference_service(cfg, inference)
    # offline algorithms' dataset, GAIL's / DAgger's expert demos
    cfg.use_data(s.get("data"), float(s.get("val_fraction") or 0.0))
    if cfg.EVALUATES:  # offline algorithms and DAgger: deterministic evaluation episodes
        eval_env = cfg.evaluation_env_config(dict(s["env_config"]))
        cfg.evaluation(
            evaluation_interval=int(s["eval_every"]),
            evaluation_duration=int(s["eval_episodes"]),
            evaluation_duration_unit="episodes",
            # the driver's EnvRunner evaluates: remote runners are busy sampling (or absent)
            evaluation_num_env_runners=0,
            evaluation_config={"env_config": eval_env, "explore": False},
        )
    return cfg


# the number of actors that read a parquet dataset's file footers (Ray Data's default: 32)
PARQUET_FOOTER_ACTORS_VAR = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
PARQUET_FOOTER_ACTORS = 1


def init_ray(num_cpus: int | None = None) -> None:
    """Start (or join, with RAY_ADDRESS) Ray once, with single-threaded torch in workers."""
    import ray

    if ray.is_initialized():
        return
    env_vars = {"OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    # Ray Data reads a parquet dataset's file footers on a pool of actors, 32 by default, each a
    # new worker process, for every read: one dataset file gets 32 processes, the first read took
    # ~2x as long. One actor (128 I/O threads) for ours; a user's setting wins.
    footer = os.environ.setdefault(PARQUET_FOOTER_ACTORS_VAR, str(PARQUET_FOOTER_ACTORS))
    env_vars[PARQUET_FOOTER_ACTORS_VAR] = footer
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
        # driving envs: route completion, driving score, collision, mean speed (episode means)
        driving={str(k): _num(v) for k, v in (runners.get("driving") or {}).items()},
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
    "cost_vf_loss",  # ... with training.cost_critic: the cost value function's loss
    "cost_vf_explained_var",
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
    # world model (dreamer): KL balancing terms, reconstruction / latent and reward errors
    "kl",
    "dyn_loss",
    "rep_loss",
    "image_mse",
    "image_fg_mse",
    "image_bg_mse",
    "keypoint_recon",
    "state_mse",
    "latent_loss",
    "reward_mae",
    "continue_bce",
    "imagined_return",
    "return_scale",
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
    from vla_ray.data.stream import close_offline_data
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
    evaluates = get_algorithm(spec.algorithm).EVALUATES
    ckpt_dir = out / CHECKPOINTS_DIR
    metric = spec.settings["checkpoint_metric"]
    best_value = -math.inf
    start_iter, t_offset = 0, 0.0
    if resume:
        restore_algorithm(algo, ckpt_dir / LAST)
        meta = json.loads((ckpt_dir / LAST / META_NAME).read_text())
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
            improved = value is not None and value > best_value
            best_value = value if improved else best_value
            info = dict(
                iteration=it,
                env_steps=steps,
                time_s=row["time_s"],
                metric=metric,
                best_value=best_value,
            )
            # this iteration's checkpoint is serialised once; the others are copies of it
            saved = save_checkpoint(algo, spec, ckpt_dir / BEST, info) if improved else None
            if done or it % int(spec.settings["checkpoint_every"]) == 0:
                if saved is None:
                    saved = save_checkpoint(algo, spec, ckpt_dir / LAST, info)
                else:
                    copy_checkpoint(saved, ckpt_dir / LAST)
                if spec.settings["keep_checkpoints"]:
                    copy_checkpoint(saved, ckpt_dir / kept_name(it))
            if done:
                break
        summary = dict(row, output=str(out), last_checkpoint=str(ckpt_dir / LAST))
        if (ckpt_dir / BEST).exists():
            summary["best_checkpoint"] = str(ckpt_dir / BEST)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    finally:
        bar.close()
        metrics_file.close()
        close_offline_data(algo.offline_data)
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
