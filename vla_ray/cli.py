"""The ``vla-ray`` command line: list, collect, train, tune, eval, export, serve,
quickstart, make-vlm-data, pretrain."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")


def _default_output(preset: str) -> str:
    return str(Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}")


def cmd_list(args: argparse.Namespace) -> int:
    from vla_ray.algorithms import ALGORITHMS
    from vla_ray.envs import ENV_IDS
    from vla_ray.presets import PRESETS

    print("presets:")
    for p in PRESETS.values():
        print(f"  {p.name:<20} {p.algorithm:<6} {p.env:<24} {p.description}")
    print("envs:")
    for e in ENV_IDS:
        print(f"  {e}")
    print("algorithms:")
    for a in ALGORITHMS:
        print(f"  {a}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vla_ray.train import parse_overrides, prepare_run_dir, resolve, set_override, train

    overrides = parse_overrides(args.set)
    if args.expert is not None:
        from vla_ray.algorithms import get_algorithm
        from vla_ray.presets import get_preset

        algorithm = get_preset(args.preset).algorithm
        if "expert" not in get_algorithm(algorithm).training_defaults():
            raise ValueError(
                f"--expert: {algorithm} (preset {args.preset}) takes no expert; DAgger does, "
                "e.g. --preset langreach-dagger"
            )
        set_override(overrides, "training.expert", args.expert)
    if args.val_fraction is not None:
        set_override(overrides, "val_fraction", args.val_fraction)
    spec = resolve(
        args.preset,
        overrides,
        num_env_runners=args.num_env_runners,
        num_envs_per_env_runner=args.num_envs_per_env_runner,
        local=args.local,
        data=args.data,
        vectorize=args.vectorize,
        num_gpus_per_learner=args.num_gpus_per_learner,
        num_gpus_per_env_runner=args.num_gpus_per_env_runner,
    )
    output = args.output or _default_output(args.preset)
    # before the trackers write into it: a reused run directory is an error unless resumed
    resume = prepare_run_dir(output, args.resume, args.resume_if_exists)
    print(f"training {spec.preset} ({spec.algorithm} on {spec.env}) -> {output}")
    from vla_ray.logs import quiet_logs
    from vla_ray.tracking import open_trackers

    with quiet_logs(output, verbose=args.verbose) as log:
        if log:
            print(f"Ray's and RLlib's log: {log} (--verbose shows it here)")
        trackers = open_trackers(
            output, spec.to_dict(), wandb_project=args.wandb, mlflow_uri=args.mlflow
        )
        summary = train(
            spec,
            output,
            stop_iters=args.stop_iters,
            stop_timesteps=args.stop_timesteps,
            stop_seconds=args.stop_seconds,
            resume=resume,
            resume_if_exists=args.resume_if_exists,
            progress=not args.quiet,
            trackers=trackers,
        )
    print(json.dumps(summary, indent=2))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from vla_ray.tracking import tune_callbacks
    from vla_ray.tuning import (
        apply_resource_flags,
        check_available,
        format_table,
        load_tune_config,
        run_tune,
    )

    spec = load_tune_config(args.config)
    check_available(spec)
    apply_resource_flags(
        spec,
        num_env_runners=args.num_env_runners,
        cpus_per_trial=args.cpus_per_trial,
        num_gpus_per_learner=args.num_gpus_per_learner,
    )
    output = args.output or _default_output(f"tune-{spec.name}")
    if args.resume and not args.output:
        raise ValueError("--resume needs --output DIR, the directory of the search to continue")
    print(f"tune {args.config}: {spec.name} -> {output}")
    from vla_ray.logs import quiet_logs

    with quiet_logs(output, verbose=args.verbose) as log:
        if log:
            print(f"Ray's, RLlib's and the trials' log: {log} (--verbose shows it here)")
        summary = run_tune(
            spec,
            output,
            num_samples=args.num_samples,
            stop_iters=args.stop_iters,
            resume=args.resume,
            callbacks=tune_callbacks(
                wandb_project=args.wandb, mlflow_uri=args.mlflow, experiment=spec.name
            ),
            verbose=0 if args.quiet else 1,
        )
    print()
    print(format_table(summary))
    print(f"summary: {Path(summary['output']) / 'summary.json'}")
    try:
        from vla_ray.report import write_tune_comparison

        print(f"comparison: {write_tune_comparison(summary)['md']}")
    except ImportError as err:  # plotting is an optional extra
        print(f"no comparison written: {err}", file=sys.stderr)
    return 0 if summary["best_trial"] else 1


def _print_eval(result: dict[str, Any]) -> None:
    print(
        f"{result['env']}: success_rate {result['success_rate']:.3f}  "
        f"mean_return {result['mean_return']:.3f}  mean_length {result['mean_length']:.1f}  "
        f"({result['episodes']} episodes)"
    )
    by_target = result.get("success_by_target")
    if by_target:
        counts = result.get("episodes_by_target", {})
        print(
            "  per target: "
            + "  ".join(f"{t} {v:.3f} ({counts.get(t, '?')} eps)" for t, v in by_target.items())
        )
    driving = result.get("driving")
    if driving:
        print(
            f"  driving: route completion {driving['route_completion']:.3f}  driving score "
            f"{driving['driving_score']:.3f}  collision rate {driving['collision_rate']:.3f}"
            + (f"  mean speed {driving['mean_speed']:.2f} m/s" if "mean_speed" in driving else "")
        )
    totals = result.get("safety_interventions")
    if totals is not None:
        per_ep = result.get("safety_per_episode", {})
        print(
            "  safety interventions: "
            + ("  ".join(f"{r} {n} ({per_ep.get(r, 0):.2f}/ep)" for r, n in totals.items()) or "-")
            + f"  mean episode cost {result.get('mean_episode_cost', 0):.2f}"
        )


def cmd_eval(args: argparse.Namespace) -> int:
    from vla_ray.evaluate import evaluate, load_policy

    policy = load_policy(args.checkpoint, target_return=args.target_return, planner=args.planner)
    env_config = json.loads(args.env_config) if args.env_config else None
    if args.data:  # the dataset's actions, no env
        from vla_ray.data.validation import evaluate_on_data

        result = evaluate_on_data(policy, args.data, env_id=args.env, env_config=env_config)
        print(
            f"{result['episodes']} episodes, {result['val_steps']} steps of {args.data}: action "
            f"MSE {result['val_action_mse']:.4g}  L1 {result['val_action_l1']:.4g}"
        )
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    if args.safety:  # the safety layer's rules, on top of the training env config
        env_config = dict(policy.meta.get("env_config", {}) if env_config is None else env_config)
        env_config["safety"] = str(Path(args.safety).resolve())
    if args.imagine is not None:  # the world model's open-loop prediction video, no eval
        from vla_ray.world_model.diagnostics import imagine_video

        result = imagine_video(
            policy,
            args.video or "imagine.mp4",
            horizon=args.imagine,
            context=args.imagine_context,
            env_id=args.env,
            env_config=env_config,
            episodes=args.imagine_episodes,
            seed=args.seed,
        )
        mse = ", ".join(f"{v:.4f}" for v in result["image_mse_by_step"])
        rew = ", ".join(f"{v:.3f}" for v in result["reward_abs_error_by_step"])
        print(
            f"open-loop video: {result['video']} ({result['frames']} frames, "
            f"{result['context']} observed + up to {result['horizon']} imagined per episode)"
        )
        print(f"  image MSE by step ahead: {mse}\n  reward |error| by step ahead: {rew}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    result = evaluate(
        policy,
        env_id=args.env,
        env_config=env_config,
        episodes=args.episodes,
        seed=args.seed,
        video=args.video,
        chunk_execute=args.chunk_execute,
        temporal_ensemble=args.temporal_ensemble,
    )
    _print_eval(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.video:
        print(f"video: {args.video}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from vla_ray.report import write_report

    try:
        paths = write_report(args.run_dir, eval_video=args.eval_video, video_episodes=args.episodes)
    except ImportError as err:  # matplotlib is an optional extra
        print(err, file=sys.stderr)
        return 2
    print(f"report: {paths['html']}")
    print(f"report (markdown): {paths['md']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vla_ray.export import export

    summary = export(
        args.checkpoint,
        args.format,
        args.output,
        triton_max_batch_size=args.triton_max_batch_size,
        triton_instance_group=args.triton_instance_group,
        opset=args.opset,
        target_return=args.target_return,
    )
    print(f"model version {summary['model_version']} -> {summary['output']}")
    for fmt, row in summary["formats"].items():
        print(
            f"  {fmt:<12} {row['model_file']:<28} max |diff| {row['max_abs_diff']:.2e} "
            f"(tolerance {row['tolerance']:.0e})"
        )
    backend = " --backend torch" if "context" in summary else ""  # a sequence policy
    print(f"serve it: vla-ray serve --model {summary['output']}{backend}")
    return 0


def cmd_ros2_bridge(args: argparse.Namespace) -> int:
    from vla_ray.ros2_bridge import BridgeConfig, BridgeConfigError, ExportedPolicy, ServePolicy

    config = BridgeConfig.load(args.config)
    if (args.model is None) == (config.serve is None):
        raise BridgeConfigError(
            "--model / serve",
            "exactly one policy: --model DIR or serve.url in the topics file",
            {"model": args.model, "serve": config.serve},
        )
    if importlib.util.find_spec("rclpy") is None:
        print(
            "vla-ray ros2-bridge: rclpy does not import; run it where ROS 2 is installed and "
            "sourced (README: ROS 2 bridge)",
            file=sys.stderr,
        )
        return 2
    from vla_ray.ros2_node import spin

    if args.model is not None:
        policy = ExportedPolicy(args.model, args.backend, args.threads)
    else:
        policy = ServePolicy(**config.serve)
    stats = spin(config, policy, args.max_seconds)
    print(json.dumps(stats))
    return 0


def _parse_autoscale(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    lo, sep, hi = text.partition(":")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise ValueError(f"--autoscale {text!r}: expected MIN:MAX, e.g. 1:4")
    return int(lo), int(hi)


API_KEY_ENV = "VLA_RAY_API_KEY"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _api_key(args: argparse.Namespace) -> str | None:
    """The serve API key: ``--api-key-file``, else $VLA_RAY_API_KEY, else the deprecated
    ``--api-key VALUE`` (visible to every user in ``ps``)."""
    if args.api_key_file:
        path = Path(args.api_key_file)
        if not path.is_file():
            raise FileNotFoundError(f"--api-key-file: {path} does not exist")
        key = path.read_text().strip()
        if not key:
            raise ValueError(f"--api-key-file: {path} is empty; expected the key on one line")
        return key
    if args.api_key:
        print(
            "vla-ray serve: warning: --api-key VALUE is deprecated (other users see it in `ps`); "
            f"use --api-key-file PATH or ${API_KEY_ENV}",
            file=sys.stderr,
        )
        return args.api_key
    return os.environ.get(API_KEY_ENV) or None


def _catch_stop_signals() -> Any:
    """Handle SIGTERM and SIGINT alike from now on: each sets the returned event (with the
    signal's name as ``event.name``). Installed after Ray starts, whose own handler would abort
    the process."""
    import signal
    import threading

    event = threading.Event()
    event.name = ""

    def stop(signum, frame):
        event.name = event.name or signal.Signals(signum).name
        event.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    return event


def _drain_and_shutdown() -> None:
    """Stop Serve without dropping requests in flight: the application is deleted first (its
    replicas finish their ongoing requests, within Serve's graceful_shutdown_timeout_s, while
    the HTTP proxy still carries their answers back), then Serve and its proxy stop.
    ``serve.shutdown()`` alone stops the proxy at once, cutting off every open request."""
    from ray import serve

    from vla_ray.serve.app import APP_NAME
    from vla_ray.serve.sessions import delete_session_stores

    try:
        serve.delete(APP_NAME)
    except Exception as err:  # Serve never started or already gone: nothing to drain
        print(f"vla-ray serve: no application to drain ({type(err).__name__})", file=sys.stderr)
    serve.shutdown()
    delete_session_stores()  # the e-stop stores outlive replicas, not the server


def cmd_serve(args: argparse.Namespace) -> int:
    from vla_ray.serve.app import ServeSettings, start

    shield: dict[str, Any] = json.loads(args.shield) if args.shield else {}
    if args.max_delta is not None:
        shield["max_delta"] = args.max_delta
    if args.workspace:
        shield["workspace"] = json.loads(args.workspace)
    if args.safety:  # read here: the replicas get the rules, not a path on this machine
        from vla_ray.safety import load_rules_file

        shield["rules"] = load_rules_file(args.safety)
    watchdog: dict[str, Any] = {}
    if args.stale_after is not None:
        watchdog["max_age_s"] = args.stale_after
    if args.stop_on_model_error:
        watchdog["stop_on_model_error"] = True
    settings = ServeSettings(
        model=args.model,
        backend=args.backend,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_ms / 1000.0,
        threads=args.threads,
        shield=shield or None,
        api_key=_api_key(args),
        max_body_bytes=args.max_body_bytes,
        max_instruction_chars=args.max_instruction_chars,
        body_timeout_s=args.body_timeout,
        watchdog=watchdog or None,
        max_batch_rows=args.max_batch_rows,
        max_batch_body_bytes=args.max_batch_body_bytes,
        target_return=args.target_return,
    )
    options = dict(
        num_replicas=args.replicas,
        autoscaling=_parse_autoscale(args.autoscale),
        replica_cpus=args.replica_cpus,
        max_queued_requests=args.max_queued,
        access_log=not args.no_access_log,
    )
    import ray

    if args.host not in _LOOPBACK and not settings.api_key:
        print(
            f"vla-ray serve: warning: --host {args.host} accepts requests from other machines "
            f"and no API key is set; anyone who can reach port {args.port} can drive the "
            f"policy (set --api-key-file PATH or ${API_KEY_ENV})",
            file=sys.stderr,
        )
    from vla_ray.serve.app import build_app
    from vla_ray.train import init_ray

    build_app(settings, **options)  # the model and the settings, before Ray starts
    # a server's replicas run at normal priority (Ray's default worker niceness is 15)
    os.environ.setdefault("RAY_worker_niceness", "0")
    init_ray()
    stop = _catch_stop_signals()
    try:
        url = start(
            settings,
            host=args.host,
            port=args.port,
            request_timeout_s=args.request_timeout,
            **options,
        )
        print(f"serving {args.model} ({args.backend}) at {url}")
        print(f"  POST {url}/v1/act   GET {url}/v1/health   GET {url}/v1/spec   docs {url}/docs")
        if settings.api_key:
            print("  requests need the X-API-Key header")
        print("Ctrl-C or SIGTERM stops it", flush=True)
        while not stop.wait(1.0):
            pass
        print(f"{stop.name}: draining in-flight requests and stopping Serve", flush=True)
    finally:
        _drain_and_shutdown()
        ray.shutdown()
    print("stopped", flush=True)
    return 0


# Quickstart seeds: expert episode i resets with QUICKSTART_DEMO_SEED * seed + i, far below the
# held-out evaluation seeds (100_000 + i, as `vla-ray eval`).
QUICKSTART_DEMO_SEED = 10_000
# The quickstart's stage after cloning: none (the cloned policy is the result), DAgger (the
# scripted expert labels the states the policy visits) or RL, each from the cloned policy.
QUICKSTART_METHODS = ("none", "dagger", "ppo", "grpo")
# The default recipe (docs/benchmarks.md, "The quickstart"): cloning on many distinct layouts is
# what binds the colour words; RLlib's offline BC (Ray Data) is too slow per update for it
QUICKSTART_DEMOS = 2000
QUICKSTART_NOISE = 0.3
QUICKSTART_CLONE_MINUTES = 7.0
QUICKSTART_CLONE_BATCH = 256
QUICKSTART_CLONE_LR = 1e-3
# the clone's vision encoder: langreach-ppo's keypoints without the reconstruction decoder, whose
# second CNN pass made each update ~2.5x slower; the dense labels bind every colour without it
QUICKSTART_CLONE_VISION: dict[str, Any] = {"tokens": "keypoints"}
# torch's intra-op threads for the quickstart's in-process stages (cloning, evaluation): beside
# other work on a 2-core CPU, a second OpenMP thread waits at every barrier for a preempted one
# (measured: ~5 s per cloning update with 2 threads against ~0.3 s with 1, at load average 11)
QUICKSTART_TORCH_THREADS = 1
QUICKSTART_RL = "none"
QUICKSTART_RL_MINUTES = 4.0
# DAgger's settings in the quickstart: langreach-ppo's keypoint-reconstruction loss, which keeps
# every target colour decodable from the CNN's keypoints; from a cloned policy it acts from the
# first rollout (beta 0); 8 envs per EnvRunner (batched inference); an evaluation every 5
# iterations
QUICKSTART_DAGGER: dict[str, Any] = {
    "model": {"vision_config": {"tokens": "keypoints", "recon_coeff": 0.05}},
    "training": {"beta": 0.0},
    "env_runners": {"num_envs_per_env_runner": 8},
    "eval_every": 5,
}


def cmd_quickstart(args: argparse.Namespace) -> int:
    from vla_ray.fsutil import check_output
    from vla_ray.logs import quiet_logs

    output = Path(args.output or _default_output("quickstart"))
    check_output(output, False, "choose another --output")  # each stage writes a new folder
    t0 = time.time()
    with quiet_logs(output, verbose=args.verbose) as log:
        if log:
            print(f"quickstart -> {output} (Ray's and RLlib's log: {log}; --verbose shows it)")
        ckpt = _quickstart_stages(args, output)
        if not args.no_serve:
            quickstart_serve_stage(ckpt, output / "export", progress=not args.quiet)
        quickstart_report(output)
    print(f"quickstart done in {(time.time() - t0) / 60:.1f} min; run directory: {output}")
    return 0


def quickstart_report(output: Path) -> Path | None:
    """The quickstart's last step: ``vla-ray report`` of its run directory; returns the HTML
    report's path (None, with the reason printed, when it cannot be written)."""
    from vla_ray.report import ReportError, write_report

    try:
        paths = write_report(output)
    except (ImportError, ReportError) as err:  # matplotlib is the optional `plot` extra
        print(f"report: not written ({err})")
        return None
    print(f"report: {paths['html']} (markdown: {paths['md']})")
    return paths["html"]


def _quickstart_stages(args: argparse.Namespace, output: Path) -> str:
    """Cloning, the optional training stage and the held-out evaluation, with torch's threads
    at ``QUICKSTART_TORCH_THREADS`` in this process; returns the checkpoint (or save_pretrained
    folder) to serve."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(QUICKSTART_TORCH_THREADS)
    try:
        return _quickstart_run(args, output)
    finally:
        torch.set_num_threads(threads)


def _quickstart_run(args: argparse.Namespace, output: Path) -> str:
    from vla_ray.clone import clone_run
    from vla_ray.config import ConfigError
    from vla_ray.evaluate import evaluate, load_policy
    from vla_ray.presets import get_preset

    method = args.rl
    progress = not args.quiet
    if method == "none" and args.demos <= 0:
        raise ConfigError("--rl none: the cloned policy is the result; give --demos > 0")
    stage = 1
    overrides: dict[str, Any] = {"seed": args.seed}
    ckpt = ""
    if args.demos > 0:
        print(
            f"quickstart {stage}: cloning the scripted expert on LangReach: {args.demos} episodes "
            f"(action noise {args.noise:g}, noise-free labels), Adam for {args.bc_minutes:g} min "
            f"-> {output}/bc"
        )
        # the VLA of langreach-ppo (keypoints, Gaussian head), so that a later RL stage continues
        # from it with its own preset's architecture
        model = dict(get_preset("langreach-ppo").model, vision_config=QUICKSTART_CLONE_VISION)
        vla_dir = clone_run(
            output / "bc",
            model,
            "vla_ray/LangReach-v0",
            episodes=args.demos,
            seconds=args.bc_minutes * 60.0,
            noise=args.noise,
            seed=args.seed,
            frames_seed=QUICKSTART_DEMO_SEED * args.seed,
            batch_size=QUICKSTART_CLONE_BATCH,
            lr=QUICKSTART_CLONE_LR,
            progress=progress,
        )
        ckpt = str(vla_dir)
        overrides["model"] = {"pretrained_path": ckpt}
        stage += 1
    if method != "none":
        ckpt = _quickstart_training(args, output, stage, overrides)
        stage += 1
    print(f"quickstart {stage}: evaluating {ckpt} on {args.episodes} held-out episodes")
    result = evaluate(load_policy(ckpt), episodes=args.episodes, progress=progress)
    _print_eval(result)
    Path(output, "eval.json").write_text(json.dumps(result, indent=2))
    if method == "none":
        print(f"policy (save_pretrained): {ckpt}")
    else:
        print(f"checkpoint (RLlib): {ckpt}")
        print(f"policy (save_pretrained): {Path(ckpt) / 'vla'}")
    print(f"evaluate again: vla-ray eval --checkpoint {ckpt} --episodes 100 --video eval.mp4")
    return ckpt


def _quickstart_training(
    args: argparse.Namespace, output: Path, stage: int, overrides: dict[str, Any]
) -> str:
    """The quickstart's DAgger/PPO/GRPO stage (from the cloned policy when ``overrides`` name
    one); returns the checkpoint to evaluate."""
    from vla_ray.train import resolve, train

    method = args.rl
    what = {
        "dagger": "DAgger (the scripted expert labels every state the policy visits)",
        "ppo": "PPO",
        "grpo": "GRPO",
    }[method]
    start = " from the cloned policy" if "model" in overrides else ""
    print(
        f"quickstart {stage}: {what}{start} on an embedded local Ray for {args.minutes:g} min "
        f"(CPU) -> {output}/{method}"
    )
    if method == "dagger":
        dagger = copy.deepcopy(QUICKSTART_DAGGER)
        dagger["model"].update(overrides.get("model", {}))
        if "model" not in overrides:  # no cloned start: the expert's share decays from 1
            dagger.pop("training")
        overrides = {**overrides, **dagger}
    spec = resolve(f"langreach-{method}", overrides)
    summary = train(
        spec, output / method, stop_seconds=args.minutes * 60.0, progress=not args.quiet
    )
    # DAgger's rows mix 20-episode evaluations with its own stochastic rollouts: a lucky early
    # row can win "best" (it did: iteration 1), so its policy is the last one
    if method == "dagger":
        return summary["last_checkpoint"]
    return summary.get("best_checkpoint", summary["last_checkpoint"])


def cmd_collect(args: argparse.Namespace) -> int:
    from vla_ray.data import collect

    env_config = json.loads(args.env_config) if args.env_config else None
    if args.safety:  # the safety layer's rules on every action, as in train, eval and serve
        rules = Path(args.safety)  # a relative path not found here: the bundled examples
        env_config = {
            **(env_config or {}),
            "safety": str(rules.resolve() if rules.exists() else rules),
        }
    summary = collect(
        args.env,
        args.policy,
        args.episodes,
        args.output,
        fmt=args.format,
        noise=args.noise,
        random_prob=args.random_prob,
        seed=args.seed,
        env_config=env_config,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _add_tracking_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wandb",
        metavar="PROJECT",
        help="log to Weights & Biases (WANDB_MODE=offline writes run files only)",
    )
    p.add_argument(
        "--mlflow",
        metavar="URI",
        help="log to MLflow at this tracking URI (e.g. sqlite:///mlflow.db)",
    )


def quickstart_serve_stage(
    checkpoint: str | Path, export_dir: str | Path, progress: bool = True
) -> dict[str, Any]:
    """Quickstart's last stage: export to ONNX, start the endpoint, send one real request."""
    import ray.serve  # noqa: F401  (adds Serve's console logger: quiet, it goes to the run's log)

    from vla_ray.logs import route_ray_loggers
    from vla_ray.serve.client import serve_demo

    route_ray_loggers()
    print(f"quickstart: exporting {checkpoint} and serving it for one request")
    result = serve_demo(checkpoint, export_dir, progress=progress)
    answer = result["answer"]
    print(
        f"endpoint answered: action {[round(a, 4) for a in answer['action']]} for "
        f"{result['instruction']!r} (model {answer['model_version']}, "
        f"{answer['latency_ms']:.1f} ms server-side)"
    )
    print(f"export: {export_dir}")
    print(f"serve it yourself: vla-ray serve --model {export_dir} --port 8000")
    return result


def cmd_make_vlm_data(args: argparse.Namespace) -> int:
    from vla_ray.pretrain.data import make_vlm_data

    paths = make_vlm_data(
        args.output,
        args.n,
        seed=args.seed,
        image_size=args.image_size,
        max_targets=args.max_targets,
    )
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    import dataclasses

    from vla_ray.pretrain.trainer import PretrainConfig, PretrainError, pretrain

    try:
        model_config = json.loads(args.model_config) if args.model_config else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"--model-config: not valid JSON ({err})") from None
    if not isinstance(model_config, dict):
        raise ValueError(f"--model-config: expected a JSON object, got {args.model_config!r}")
    cfg = PretrainConfig(
        stage=args.stage,
        data=args.data,
        output=args.output,
        image_folder=args.image_folder,
        init=args.init,
        vision=args.vision,
        llm=args.llm,
        tokenizer=args.tokenizer,
        projector=args.projector,
        projector_tokens=args.projector_tokens,
        image_size=args.image_size,
        extra_model_config=model_config,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        lora=args.lora,
        lora_r=args.lora_r,
        train_vision=args.train_vision,
        strategy=args.strategy,
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        max_length=args.max_length,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        max_bad_fraction=args.max_bad_fraction,
        resume=args.resume,
        progress=not args.quiet,
    )
    from vla_ray.tracking import open_trackers

    trackers = open_trackers(
        args.output, dataclasses.asdict(cfg), wandb_project=args.wandb, mlflow_uri=args.mlflow
    )
    try:
        summary = pretrain(cfg, trackers=trackers)
    except PretrainError as err:
        print(f"vla-ray pretrain: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    print(
        f"start RL from it: vla-ray train --preset langreach-ppo --set model.vlm_path={summary['vlm']}"
    )
    print(f"learning curves: vla-ray report {args.output}")
    return 0


# examples shown at the end of each subcommand's --help
EXAMPLES = {
    "list": "vla-ray list",
    "train": """\
vla-ray train --preset langreach-ppo --output runs/lr
vla-ray train --preset langreach-ppo --num-env-runners 4 --set training.lr=1e-4 --stop-iters 50
vla-ray train --preset langreach-bc --data data/langreach-expert --local
vla-ray train --preset langreach-ppo --output runs/lr --resume""",
    "tune": """\
vla-ray tune tune_configs/ppo_langreach.yaml --output runs/tune-ppo
vla-ray tune tune_configs/ppo_langreach.yaml --num-samples 2 --stop-iters 1 --cpus-per-trial 2
vla-ray tune tune_configs/ppo_langreach.yaml --output runs/tune-ppo --resume""",
    "eval": """\
vla-ray eval --checkpoint runs/lr/checkpoints/best --episodes 100 --video eval.mp4
vla-ray eval --checkpoint runs/lr/checkpoints/best/vla --json eval.json
vla-ray eval --checkpoint runs/dreamer/checkpoints/last --imagine 15 --video open_loop.mp4""",
    "collect": """\
vla-ray collect --env vla_ray/LangReach-v0 --policy expert --episodes 500 --output data/lr-expert
vla-ray collect --env vla_ray/Hopper-v5 --policy random --episodes 100 --format d4rl \\
    --output data/hopper-random""",
    "export": """\
vla-ray export --checkpoint runs/lr/checkpoints/best --output runs/lr/export
vla-ray export --checkpoint runs/lr/checkpoints/best --format onnx,onnx-int8,triton \\
    --output runs/lr/export
vla-ray export --checkpoint runs/lr/checkpoints/best --format torch-export,triton \\
    --triton-instance-group kind=KIND_GPU,count=2 --output runs/lr/export-gpu""",
    "ros2-bridge": """\
vla-ray ros2-bridge --model runs/lr/export --config topics.yaml
vla-ray ros2-bridge --model runs/lr/export --config topics.yaml --backend openvino --threads 2""",
    "serve": """\
vla-ray serve --model runs/lr/export --backend onnx --port 8000
vla-ray serve --model runs/lr/export --autoscale 1:4 --api-key-file key.txt""",
    "quickstart": """\
vla-ray quickstart
vla-ray quickstart --rl grpo --output runs/quickstart-grpo""",
    "make-vlm-data": "vla-ray make-vlm-data --output data/vlm --n 2000",
    "pretrain": """\
vla-ray pretrain --stage align --data data/vlm/llava_pretrain.json --output runs/vlm-align
vla-ray pretrain --stage instruct --data data/vlm/llava_instruct.json --output runs/vlm-inst \\
    --init runs/vlm-align/vlm --lora --wandb my-project
vla-ray report runs/vlm-align                 # the loss and throughput curves""",
    "report": """\
vla-ray report runs/lr
vla-ray report runs/lr --eval-video --episodes 3""",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default in its help (unless it has none), the examples as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _export_formats(text: str) -> str:
    """``--format``: a comma-separated list of known export formats."""
    from vla_ray.runtime import EXPORT_FORMATS

    unknown = [f for f in text.split(",") if f.strip() not in EXPORT_FORMATS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown format(s) {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(EXPORT_FORMATS)}"
        )
    return text


def _triton_instance_group(text: str) -> Any:
    """``--triton-instance-group``: ``kind=KIND_GPU,count=2``."""
    from vla_ray.export import ExportError, TritonInstanceGroup

    try:
        return TritonInstanceGroup.parse(text)
    except ExportError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _finish_help(sub: argparse._SubParsersAction) -> None:
    """Every subcommand: defaults shown, examples at the end, a help line for every flag."""
    summaries = {a.dest: a.help for a in sub._choices_actions}
    for name, command in sub.choices.items():
        command.formatter_class = _HelpFormatter
        command.description = command.description or summaries.get(name)
        if name in EXAMPLES:
            command.epilog = "examples:\n" + "\n".join(
                "  " + line for line in EXAMPLES[name].splitlines()
            )
        for action in command._actions:
            if action.help is None and action.default not in (None, False):
                action.help = "(default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from vla_ray import __version__
    from vla_ray.data.collect import FORMATS
    from vla_ray.presets import PRESETS
    from vla_ray.runtime import EXPORT_FORMATS

    parser = argparse.ArgumentParser(
        prog="vla-ray",
        description="Train, evaluate and serve VLA policies on Ray.",
        epilog="`vla-ray COMMAND --help` shows each command's flags, defaults and examples.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="presets, envs and algorithms").set_defaults(fn=cmd_list)

    t = sub.add_parser("train", help="train a preset with RLlib")
    t.add_argument(
        "--preset",
        required=True,
        choices=list(PRESETS),
        metavar="NAME",
        help=f"what to train ({', '.join(PRESETS)}; `vla-ray list` describes them)",
    )
    t.add_argument("--num-env-runners", type=int, help="EnvRunners (default: the preset's)")
    t.add_argument(
        "--num-envs-per-env-runner", type=int, help="envs per EnvRunner (default: the preset's)"
    )
    t.add_argument(
        "--vectorize",
        choices=("sync", "async"),
        help="how each EnvRunner steps its envs: sync (one process) or async (one subprocess "
        "per env, for heavy simulators)",
    )
    t.add_argument(
        "--num-gpus-per-learner",
        metavar="N|auto",
        help="GPUs per learner (default auto: 1 when the cluster has a GPU, else 0)",
    )
    t.add_argument(
        "--num-gpus-per-env-runner",
        type=float,
        metavar="F",
        help="GPUs per EnvRunner for policy inference (fractions share one; default 0)",
    )
    stop = t.add_mutually_exclusive_group()
    stop.add_argument(
        "--stop-iters", type=int, help="training iterations (default: the preset's stop)"
    )
    stop.add_argument("--stop-timesteps", type=int, help="env steps (default: the preset's stop)")
    stop.add_argument("--stop-seconds", type=float, help="wall-clock seconds")
    t.add_argument("--output", help="run directory (default runs/PRESET-TIME)")
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a setting, e.g. training.lr=1e-4, model.head=gaussian, env.num_targets=4",
    )
    t.add_argument(
        "--local", action="store_true", help="one process: no remote EnvRunners (for a debugger)"
    )
    t.add_argument(
        "--data",
        help="offline dataset for offline algorithms (and GAIL's / DAgger's expert demos): RLlib "
        "episodes, a Minari dataset or id, a D4RL .hdf5 file, a LeRobotDataset folder or "
        "hf://ORG/NAME, an RLDS/TFDS folder or RLDS spec .json (format detected from the path)",
    )
    t.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help="offline algorithms: hold out this fraction of the episodes; action MSE/L1 on them "
        "in metrics.jsonl every eval_every iterations",
    )
    t.add_argument(
        "--expert",
        metavar="env|CKPT|MODULE:FUNCTION",
        help="DAgger's expert (training.expert): the env's built-in one (env, the default), a "
        "checkpoint directory, or a Python function taking an observation, returning an action",
    )
    resume = t.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUTPUT/checkpoints/last (an error when there is none)",
    )
    resume.add_argument(
        "--resume-if-exists",
        action="store_true",
        help="continue from OUTPUT/checkpoints/last when it exists, else start fresh",
    )
    t.add_argument("--quiet", action="store_true", help="no progress display")
    t.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's, RLlib's and Ray Data's log lines and warnings here (default: OUTPUT/"
        "ray.log)",
    )
    _add_tracking_flags(t)
    t.set_defaults(fn=cmd_train)

    u = sub.add_parser("tune", help="hyperparameter search from a tune_configs/ YAML")
    u.add_argument("config", help="tune YAML, e.g. tune_configs/ppo_langreach.yaml")
    u.add_argument("--num-samples", type=int, help="trials to sample (replaces num_samples)")
    u.add_argument("--stop-iters", type=int, help="iterations per trial (replaces stop)")
    u.add_argument("--output", help="experiment directory (default runs/tune-NAME-TIME)")
    u.add_argument("--resume", action="store_true", help="continue the search in --output")
    trial = u.add_mutually_exclusive_group()
    trial.add_argument(
        "--num-env-runners", type=int, help="EnvRunners per trial (replaces resources.*)"
    )
    trial.add_argument(
        "--cpus-per-trial",
        type=float,
        help="CPUs per trial: as many EnvRunners as fit beside the driver/learner",
    )
    u.add_argument("--num-gpus-per-learner", type=float, help="GPUs per trial's learner")
    u.add_argument("--quiet", action="store_true", help="no progress display")
    u.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's, RLlib's and the trials' log lines and warnings here (default: OUTPUT/"
        "ray.log)",
    )
    _add_tracking_flags(u)
    u.set_defaults(fn=cmd_tune)

    e = sub.add_parser("eval", help="evaluate a checkpoint on its env")
    e.add_argument("--checkpoint", required=True, help="RLlib checkpoint or save_pretrained dir")
    e.add_argument("--episodes", type=int, default=50)
    e.add_argument("--env", help="env id (default: the one the checkpoint was trained on)")
    e.add_argument("--env-config", help="JSON env kwargs (default: the training ones)")
    e.add_argument("--seed", type=int, default=100_000, help="seed of the first episode")
    e.add_argument(
        "--data",
        help="score the policy's actions against a dataset (any --data format) instead of "
        "running env episodes: action MSE/L1 per dimension",
    )
    e.add_argument("--video", help="write an mp4 of the episodes")
    e.add_argument("--json", help="write the results as JSON")
    e.add_argument("--safety", help="safety rules file (YAML) applied to every action")
    e.add_argument(
        "--chunk-execute",
        type=int,
        help="action chunks: execute the first M actions of each chunk, then re-plan",
    )
    e.add_argument(
        "--temporal-ensemble",
        type=float,
        metavar="M",
        help="action chunks: predict every step, execute ACT's exp(-M*i)-weighted mean",
    )
    e.add_argument(
        "--target-return",
        type=float,
        help="Decision Transformer: the return it conditions on (default: the one it was "
        "trained with, training.target_return)",
    )
    e.add_argument(
        "--planner",
        choices=("none", "cem", "mppi"),
        default="none",
        help="world-model checkpoints (dreamer): plan over the latent dynamics, warm-started "
        "from the actor",
    )
    e.add_argument(
        "--imagine",
        type=int,
        metavar="N",
        help="world-model checkpoints with an image decoder: instead of evaluating, write an "
        "open-loop prediction video (--video, default imagine.mp4): real vs decoded frames, "
        "--imagine-context observed steps then N imagined from the real actions",
    )
    e.add_argument(
        "--imagine-context",
        type=int,
        default=5,
        help="--imagine: steps the world model observes before imagining",
    )
    e.add_argument("--imagine-episodes", type=int, default=1, help="--imagine: episodes")
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser(
        "report",
        help="write report.html and report.md (curves, eval table, config, commands) in a run dir",
        description="Example: vla-ray report runs/quickstart-20261206-120000 --eval-video",
    )
    r.add_argument("run_dir", help="the --output of vla-ray train or vla-ray quickstart")
    r.add_argument(
        "--eval-video",
        action="store_true",
        help="evaluate the best checkpoint for a few episodes and embed the video",
    )
    r.add_argument("--episodes", type=int, default=3, help="episodes in the eval video")
    r.set_defaults(fn=cmd_report)

    c = sub.add_parser("collect", help="roll out a policy and write an offline dataset")
    c.add_argument("--env", required=True, help="env id, e.g. vla_ray/LangReach-v0")
    c.add_argument("--policy", default="expert", help="expert | random | CHECKPOINT path")
    c.add_argument("--episodes", type=int, required=True)
    c.add_argument("--format", default="rllib", choices=FORMATS, help="dataset format")
    c.add_argument("--output", required=True)
    c.add_argument("--noise", type=float, default=0.0, help="std of Gaussian action noise")
    c.add_argument(
        "--random-prob",
        type=float,
        default=0.0,
        help="per-step probability of a uniformly random action instead of the policy's",
    )
    c.add_argument("--seed", type=int, default=0, help="seed of the first episode")
    c.add_argument("--env-config", help="JSON env kwargs")
    c.add_argument(
        "--safety",
        help="safety rules file (YAML) applied to every action (also env_config's 'safety')",
    )
    c.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty --output"
    )
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(fn=cmd_collect)

    x = sub.add_parser(
        "export", help="export a policy (ONNX, TorchScript, torch.export, OpenVINO, Triton)"
    )
    x.add_argument("--checkpoint", required=True, help="RLlib checkpoint or save_pretrained dir")
    x.add_argument(
        "--format",
        default="onnx",
        type=_export_formats,
        help=f"comma-separated, from: {', '.join(EXPORT_FORMATS)}",
    )
    x.add_argument("--output", required=True, help="export folder (replaced atomically)")
    x.add_argument("--triton-max-batch-size", type=int, default=64)
    x.add_argument(
        "--triton-instance-group",
        type=_triton_instance_group,
        default="kind=KIND_CPU,count=1",
        metavar="kind=KIND,count=N",
        help="Triton model instances: kind=KIND_CPU or KIND_GPU, count=N (gpus=0:1 pins devices)",
    )
    x.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    x.add_argument(
        "--target-return",
        type=float,
        help="Decision Transformer: the return it conditions on (default: the one it was "
        "trained with, training.target_return)",
    )
    x.set_defaults(fn=cmd_export)

    b = sub.add_parser(
        "ros2-bridge", help="run an exported policy as a ROS 2 node (topics in, actions out)"
    )
    b.add_argument("--model", help="export folder (or serve.url in the topics file)")
    b.add_argument("--config", required=True, help="topics file (YAML/JSON): README, ROS 2")
    b.add_argument("--backend", choices=("onnx", "openvino"), default="onnx")
    b.add_argument("--threads", type=int, default=1, help="intra-op threads of the runtime")
    b.add_argument("--max-seconds", type=float, help="stop after this long (default: Ctrl-C)")
    b.set_defaults(fn=cmd_ros2_bridge)

    v = sub.add_parser("serve", help="serve an exported policy over HTTP with Ray Serve")
    v.add_argument("--model", required=True, help="export folder (or one format folder)")
    v.add_argument("--backend", choices=("onnx", "openvino", "torch"), default="onnx")
    scale = v.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1)
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale between MIN and MAX")
    v.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica")
    v.add_argument("--threads", type=int, default=1, help="intra-op threads per replica")
    v.add_argument(
        "--target-return",
        type=float,
        help="Decision Transformer: the return it conditions on (default: the one it was "
        "trained with, training.target_return)",
    )
    v.add_argument("--max-batch-size", type=int, default=32)
    v.add_argument("--batch-wait-ms", type=float, default=2.0, help="batching window")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-delta", type=float, help="shield: max change per action dim per step")
    v.add_argument(
        "--workspace",
        help='shield: JSON {"state_indices": [0, 1], "low": [-0.95, -0.95], "high": [0.95, 0.95]}',
    )
    v.add_argument("--shield", help='shield: JSON settings, e.g. {"low": -0.5, "high": 0.5}')
    v.add_argument("--safety", help="safety rules file (YAML), applied after --max-delta")
    v.add_argument(
        "--stale-after",
        type=float,
        metavar="S",
        help="watchdog: answer the stop action to observations whose X-Obs-Timestamp header "
        "is older than S seconds (the header is then required)",
    )
    v.add_argument(
        "--stop-on-model-error",
        action="store_true",
        help="watchdog: answer the stop action (200) when the model fails, instead of a 500",
    )
    v.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="require the X-API-Key header to equal the key in this file (default: "
        "$VLA_RAY_API_KEY)",
    )
    v.add_argument(
        "--api-key",
        help="deprecated: the key on the command line (visible in ps); use "
        "--api-key-file or $VLA_RAY_API_KEY",
    )
    v.add_argument("--max-body-bytes", type=int, default=1 << 20)
    v.add_argument("--max-instruction-chars", type=int, default=512)
    v.add_argument(
        "--max-batch-rows",
        type=int,
        default=128,
        metavar="N",
        help="POST /v1/act_batch: at most N observations per request",
    )
    v.add_argument(
        "--max-batch-body-bytes",
        type=int,
        default=8 << 20,
        help="POST /v1/act_batch: the body limit (413 beyond)",
    )
    v.add_argument(
        "--body-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="408 when a request's body has not all arrived within S seconds",
    )
    v.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="408 when a request is not answered within S seconds (Serve's proxy)",
    )
    v.add_argument(
        "--max-queued",
        type=int,
        default=256,
        metavar="N",
        help="503 with Retry-After beyond N requests waiting for a replica (-1: no bound)",
    )
    v.add_argument("--no-access-log", action="store_true", help="no log line per request")
    v.set_defaults(fn=cmd_serve)

    q = sub.add_parser(
        "quickstart",
        help="clone the scripted expert on LangReach (then optionally DAgger/PPO/GRPO), "
        "evaluate, export and serve",
    )
    q.add_argument(
        "--demos",
        type=int,
        default=QUICKSTART_DEMOS,
        help="expert episodes whose frames are cloned (0: no cloning; needs --rl other than none)",
    )
    q.add_argument(
        "--noise",
        type=float,
        default=QUICKSTART_NOISE,
        help="std of the Gaussian noise added to the expert's executed actions while its "
        "episodes are recorded (the labels stay noise-free: DART)",
    )
    q.add_argument(
        "--bc-minutes",
        type=float,
        default=QUICKSTART_CLONE_MINUTES,
        help="wall-clock minutes of cloning (Adam, batch 256, in this process)",
    )
    q.add_argument(
        "--rl",
        choices=QUICKSTART_METHODS,
        default=QUICKSTART_RL,
        help="the stage after cloning: none (the cloned policy is the result), DAgger with the "
        "scripted expert, or PPO/GRPO, each from the cloned policy",
    )
    q.add_argument(
        "--minutes",
        type=float,
        default=QUICKSTART_RL_MINUTES,
        help="wall-clock minutes of the --rl stage",
    )
    q.add_argument("--seed", type=int, default=0, help="seeds the demos and the training")
    q.add_argument("--episodes", type=int, default=100, help="held-out evaluation episodes")
    q.add_argument("--output")
    q.add_argument("--quiet", action="store_true", help="no progress display")
    q.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's, RLlib's and Ray Data's log lines and warnings here (default: "
        "OUTPUT/ray.log)",
    )
    q.add_argument(
        "--no-serve", action="store_true", help="skip the last stage (export + one HTTP request)"
    )
    q.set_defaults(fn=cmd_quickstart)

    m = sub.add_parser(
        "make-vlm-data", help="write a synthetic LLaVA-layout dataset of rendered LangReach scenes"
    )
    m.add_argument("--output", required=True, help="dataset directory")
    m.add_argument("--n", type=int, default=2000, help="number of images (one record of each kind)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--image-size", type=int, default=64)
    m.add_argument("--max-targets", type=int, default=4, help="discs per scene: 1..this")
    m.set_defaults(fn=cmd_make_vlm_data)

    p = sub.add_parser("pretrain", help="VLM pretraining (align / instruct) on Ray Train")
    p.add_argument("--stage", required=True, choices=["align", "instruct"])
    p.add_argument("--data", required=True, help="LLaVA-Pretrain/Instruct-style .json or .jsonl")
    p.add_argument("--image-folder", help="image root (default: images/ beside the json)")
    p.add_argument("--output", required=True, help="run directory; the VLM lands in OUTPUT/vlm")
    p.add_argument("--init", help="start from a VLM directory (e.g. the align stage's OUTPUT/vlm)")
    p.add_argument("--vision", default="cnn", help="cnn|siglip|clip|dinov2 or a transformers dir")
    p.add_argument("--llm", help="transformers causal LM path or id (default: tiny Qwen2)")
    p.add_argument("--tokenizer", help="tokenizer path (default: the LLM's, else the shipped one)")
    p.add_argument("--projector", default="attention", choices=["mlp", "attention", "perceiver"])
    p.add_argument("--projector-tokens", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64, help="square images, pixels per side")
    p.add_argument(
        "--model-config",
        metavar="JSON",
        help='more VLA config keys, e.g. \'{"llm_config": {"hidden_size": 512, '
        '"num_hidden_layers": 8}}\'',
    )
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--lora", action="store_true", help="instruct: LoRA adapters instead of full LM")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument(
        "--train-vision", action="store_true", help="instruct: train the vision encoder too"
    )
    p.add_argument(
        "--strategy",
        default="ddp",
        choices=["ddp", "fsdp"],
        help="ddp (replicated model) or fsdp (FSDP2: sharded per decoder layer; GPU or CPU)",
    )
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute the LM's activations in backward (default: on with --use-gpu)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="global batch (all workers)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--epochs", type=int, help="default 1 (unbounded with --max-steps)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float, help="default 1e-3 (align) / 3e-4 (instruct)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, help="optimiser steps")
    p.add_argument("--max-bad-fraction", type=float, default=0.05, help="stop above this")
    p.add_argument("--resume", action="store_true", help="continue OUTPUT's last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_tracking_flags(p)
    p.set_defaults(fn=cmd_pretrain)
    _finish_help(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vla-ray`` console script."""
    args = build_parser().parse_args(argv)
    from vla_ray.logs import drop_rllib_own_deprecation_notices

    drop_rllib_own_deprecation_notices()
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as err:
        print(f"vla-ray {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
