"""The ``vla-ray`` command line: list, train, eval, quickstart, make-vlm-data, pretrain."""

from __future__ import annotations

import argparse
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
    from vla_ray.train import parse_overrides, resolve, train

    spec = resolve(
        args.preset,
        parse_overrides(args.set),
        num_env_runners=args.num_env_runners,
        num_envs_per_env_runner=args.num_envs_per_env_runner,
        local=args.local,
    )
    output = args.output or _default_output(args.preset)
    print(f"training {spec.preset} ({spec.algorithm} on {spec.env}) -> {output}")
    summary = train(
        spec,
        output,
        stop_iters=args.stop_iters,
        stop_timesteps=args.stop_timesteps,
        stop_seconds=args.stop_seconds,
        resume=args.resume,
        progress=not args.quiet,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _print_eval(result: dict[str, Any]) -> None:
    print(
        f"{result['env']}: success_rate {result['success_rate']:.3f}  "
        f"mean_return {result['mean_return']:.3f}  mean_length {result['mean_length']:.1f}  "
        f"({result['episodes']} episodes)"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from vla_ray.evaluate import evaluate, load_policy

    policy = load_policy(args.checkpoint)
    env_config = json.loads(args.env_config) if args.env_config else None
    result = evaluate(
        policy,
        env_id=args.env,
        env_config=env_config,
        episodes=args.episodes,
        seed=args.seed,
        video=args.video,
    )
    _print_eval(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.video:
        print(f"video: {args.video}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from vla_ray.evaluate import evaluate, load_policy
    from vla_ray.train import resolve, train

    output = args.output or _default_output("quickstart")
    spec = resolve("langreach-ppo", {})
    print(
        f"quickstart: training langreach-ppo on an embedded local Ray for {args.minutes:g} min "
        f"(CPU) -> {output}"
    )
    summary = train(spec, output, stop_seconds=args.minutes * 60.0, progress=not args.quiet)
    ckpt = summary.get("best_checkpoint", summary["last_checkpoint"])
    result = evaluate(load_policy(ckpt), episodes=args.episodes, progress=not args.quiet)
    _print_eval(result)
    Path(output, "eval.json").write_text(json.dumps(result, indent=2))
    print(f"checkpoint (RLlib): {ckpt}")
    print(f"policy (save_pretrained): {Path(ckpt) / 'vla'}")
    print(f"evaluate again: vla-ray eval --checkpoint {ckpt} --episodes 100 --video eval.mp4")
    return 0


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
    from vla_ray.pretrain.trainer import PretrainConfig, PretrainError, pretrain

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
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        lora=args.lora,
        lora_r=args.lora_r,
        train_vision=args.train_vision,
        strategy=args.strategy,
        precision=args.precision,
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
    )
    try:
        summary = pretrain(cfg)
    except PretrainError as err:
        print(f"vla-ray pretrain: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    print(
        f"start RL from it: vla-ray train --preset langreach-ppo --set model.vlm_path={summary['vlm']}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vla-ray", description="Train, evaluate and serve VLA policies on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="presets, envs and algorithms").set_defaults(fn=cmd_list)

    t = sub.add_parser("train", help="train a preset with RLlib")
    t.add_argument("--preset", required=True)
    t.add_argument("--num-env-runners", type=int)
    t.add_argument("--num-envs-per-env-runner", type=int)
    stop = t.add_mutually_exclusive_group()
    stop.add_argument("--stop-iters", type=int)
    stop.add_argument("--stop-timesteps", type=int)
    stop.add_argument("--stop-seconds", type=float)
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
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/last")
    t.add_argument("--quiet", action="store_true", help="no progress display")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on its env")
    e.add_argument("--checkpoint", required=True, help="RLlib checkpoint or save_pretrained dir")
    e.add_argument("--episodes", type=int, default=50)
    e.add_argument("--env", help="env id (default: the one the checkpoint was trained on)")
    e.add_argument("--env-config", help="JSON env kwargs (default: the training ones)")
    e.add_argument("--seed", type=int, default=100_000, help="seed of the first episode")
    e.add_argument("--video", help="write an mp4 of the episodes")
    e.add_argument("--json", help="write the results as JSON")
    e.set_defaults(fn=cmd_eval)

    q = sub.add_parser("quickstart", help="train langreach-ppo for a few minutes and evaluate")
    q.add_argument("--minutes", type=float, default=10.0)
    q.add_argument("--episodes", type=int, default=50)
    q.add_argument("--output")
    q.add_argument("--quiet", action="store_true")
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
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--lora", action="store_true", help="instruct: LoRA adapters instead of full LM")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument(
        "--train-vision", action="store_true", help="instruct: train the vision encoder too"
    )
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
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
    p.set_defaults(fn=cmd_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vla-ray`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"vla-ray {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
