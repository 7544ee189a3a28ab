r"""Benchmark: VLM pretraining throughput (samples/s) on Ray Train for 1, 2, ... workers.

Makes a synthetic LLaVA-layout dataset (``vla-ray make-vlm-data``) unless ``--data`` is given,
then runs ``vla-ray pretrain`` for each stage, strategy and worker count with the same global
batch, and reports samples/s over the steps after ``--warmup`` (time per optimiser step as
measured in the workers: data loading + forward + backward + all-reduce + optimiser). Prints a
table and writes ``OUT/pretrain.json`` (``OUT/pretrain_no_ray.json`` with ``--no-ray``).

Model FLOPs per sample are counted once on the driver (``torch.utils.flop_counter`` over one
forward + backward of the stage's trainable set, on real batches; gradient-checkpointing
recomputation is not counted), so each row also reports the achieved FLOP/s and, where the peak
of the device is known (``--peak-tflops``, or a table of NVIDIA GPUs for ``--use-gpu``), the
model FLOPs utilisation (MFU = achieved / peak, per worker).

    python bench/pretrain.py --workers 1 2 --stages align instruct --out docs/bench
    python bench/pretrain.py --workers 2 --strategies ddp fsdp --stages instruct --out docs/bench

``--no-ray`` times the same optimiser step (``vla_ray.pretrain.trainer.optimizer_step`` on the
model of ``build_vlm``) in this process on one device, over batches collated beforehand: the
model's own throughput, without Ray Data or Ray Train. It needs neither Ray nor gymnasium (torch,
transformers, peft, pillow and a dataset made elsewhere), so it runs on a bare GPU machine with
``PYTHONPATH=.``. On a GPU, with a model large enough to load it (``--model-config`` takes VLA
config keys; bf16 and activation checkpointing as ``vla-ray pretrain --use-gpu`` uses them)::

    python bench/pretrain.py --no-ray --use-gpu --precision bf16 --data DIR --image-size 224 \
        --model-config '{"llm_config": {"hidden_size": 1024, "intermediate_size": 2816,
        "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 16}}' \
        --batch-size 64 --warmup 3 --steps 20 --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")


# Dense peak TFLOP/s per GPU from NVIDIA's data sheets (SXM parts; no sparsity), by precision.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp32": 66.9},
    "H100": {"bf16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp32": 31.2},
}


def peak_tflops(device_name: str | None, precision: str) -> float | None:
    """Dense peak of a known NVIDIA GPU for ``precision`` (fp32 means no TF32), else None."""
    if not device_name:
        return None
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name.upper():
            return peaks["bf16" if precision == "bf16" else "fp32"]
    return None


def bench_config(data: Path, stage: str, args, output: Path, strategy="ddp", workers=1):
    """The ``PretrainConfig`` of one benchmark row."""
    from vla_ray.pretrain.data import INSTRUCT_FILE, PRETRAIN_FILE
    from vla_ray.pretrain.trainer import PretrainConfig

    return PretrainConfig(
        stage=stage,
        data=str(data / (PRETRAIN_FILE if stage == "align" else INSTRUCT_FILE)),
        output=str(output),
        num_workers=workers,
        batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        checkpoint_every=10**6,
        use_gpu=args.use_gpu,
        precision=args.precision,
        strategy=strategy,
        gradient_checkpointing=args.gradient_checkpointing,
        vision=args.vision,
        projector=args.projector,
        image_size=args.image_size,
        extra_model_config=args.model_config,
        progress=False,
    )


def collated_batches(cfg, vla, vlm, n: int, batch: int) -> list[dict[str, Any]]:
    """``n`` batches of ``batch`` records of the stage's data, as the workers' collate makes them
    (records reused in order when the data holds fewer than ``n * batch``)."""
    import torch

    from vla_ray.pretrain.data import collate, load_records

    records = list(load_records(cfg.data).records)
    out = []
    for i in range(n):
        rows = [records[(i * batch + j) % len(records)] for j in range(batch)]
        cols = {k: [r[k] for r in rows] for k in rows[0]}
        arrays = collate(
            cols, vla.tokenizer, vlm.num_image_tokens, tuple(vla.config.image_size), cfg.max_length
        )
        out.append({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return out


def flops_per_sample(data: Path, stage: str, args, batches: int = 4, batch: int = 8) -> float:
    """Model FLOPs of one training sample (forward + backward) in ``stage``, averaged over a few
    real batches of the dataset."""
    from torch.utils.flop_counter import FlopCounterMode

    from vla_ray.pretrain.trainer import build_vlm, vla_config_for

    cfg = bench_config(data, stage, args, data / "unused")
    cfg.gradient_checkpointing = False  # count the model's FLOPs, not the recomputation
    vla, vlm = build_vlm(vla_config_for(cfg).to_dict(), cfg)
    total, samples = 0, 0
    for inputs in collated_batches(cfg, vla, vlm, batches, batch):
        with FlopCounterMode(display=False) as counter:
            loss_sum, _ = vlm(**inputs)
            loss_sum.backward()
        vlm.zero_grad(set_to_none=True)
        total += counter.get_total_flops()
        samples += len(inputs["input_ids"])
    return total / samples


def result_row(stage, strategy, workers, args, step_times, first_loss, last_loss, wall, records):
    """One table row from the per-step times after the warm-up."""
    median = float(np.median(step_times))
    return dict(
        stage=stage,
        strategy=strategy,
        workers=workers,
        global_batch=args.batch_size,
        steps_timed=len(step_times),
        samples_per_s=len(step_times) * args.batch_size / sum(step_times),
        samples_per_s_median_step=args.batch_size / median,
        step_time_s=sum(step_times) / len(step_times),
        step_times_s=step_times,
        first_loss=first_loss,
        last_loss=last_loss,
        fit_wall_s=wall,
        records=records,
    )


def run_one(data: Path, stage: str, strategy: str, workers: int, args, work: Path) -> dict:
    """``vla-ray pretrain`` on Ray Train; step times from the run's metrics.jsonl."""
    from vla_ray.pretrain.trainer import pretrain

    out = work / f"{stage}-{strategy}-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = bench_config(data, stage, args, out, strategy, workers)
    t0 = time.perf_counter()
    summary = pretrain(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r["step_time_s"] for r in rows if r["step"] > args.warmup]
    return result_row(
        stage,
        strategy,
        workers,
        args,
        timed,
        rows[0]["loss"],
        rows[-1]["loss"],
        wall,
        summary["records"],
    )


def run_local(data: Path, stage: str, args) -> dict:
    """The workers' optimiser step in this process on one device (no Ray), batches collated
    beforehand; wall time per step with the device synchronised."""
    import torch

    from vla_ray.pretrain.data import IGNORE_INDEX
    from vla_ray.pretrain.trainer import build_vlm, optimizer_step, vla_config_for

    cfg = bench_config(data, stage, args, data / "unused")
    device = torch.device("cuda" if args.use_gpu else "cpu")
    if device.type == "cpu":  # as a Ray Train worker: one torch thread per CPU it holds
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    vla, vlm = build_vlm(vla_config_for(cfg).to_dict(), cfg)
    vlm.to(device).train()
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    batches = collated_batches(cfg, vla, vlm, args.warmup + args.steps, args.batch_size)
    times, losses = [], []
    t_start = time.perf_counter()
    for batch in batches:
        t0 = time.perf_counter()
        count = float(max(int((batch["labels"] != IGNORE_INDEX).sum()), 1))
        loss = optimizer_step(vlm, [batch], opt, cfg, device=device, global_count=count)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss / count)
    wall = time.perf_counter() - t_start
    row = result_row(
        stage,
        "none (no Ray)",
        1,
        args,
        times[args.warmup :],
        losses[0],
        losses[-1],
        wall,
        len(batches) * args.batch_size,
    )
    if device.type == "cuda":
        row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row["parameters"] = sum(p.numel() for p in vlm.parameters())
    row["trainable_parameters"] = sum(p.numel() for p in params)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--stages", nargs="+", default=["align", "instruct"])
    p.add_argument("--data", help="dataset dir from make-vlm-data (default: make one)")
    p.add_argument("--n", type=int, default=1024, help="records to generate")
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--vision", default="cnn")
    p.add_argument("--projector", default="attention")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument(
        "--model-config", type=json.loads, default={}, metavar="JSON", help="more VLA config keys"
    )
    p.add_argument(
        "--strategies",
        nargs="+",
        default=["ddp"],
        choices=["ddp", "fsdp"],
        help="fsdp rows run for 2+ workers only (1 worker is unsharded either way)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on with --use-gpu",
    )
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument(
        "--no-ray",
        action="store_true",
        help="time the optimiser step in this process on one device (no Ray Data / Train)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="peak TFLOP/s of one worker's device for MFU (default: known GPUs only)",
    )
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()

    import torch

    from vla_ray.pretrain.data import make_vlm_data

    if args.use_gpu and not torch.cuda.is_available():
        p.error("--use-gpu: torch sees no CUDA device")
    work = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    try:
        data = Path(args.data) if args.data else work / "data"
        if not args.data:
            make_vlm_data(data, args.n, progress=False)
        if args.no_ray:
            results = [run_local(data, stage, args) for stage in args.stages]
        else:
            from vla_ray.train import init_ray

            init_ray()
            results = [
                run_one(data, stage, strategy, w, args, work)
                for stage in args.stages
                for strategy in args.strategies
                for w in args.workers
                if strategy == "ddp" or w > 1
            ]
        device = torch.cuda.get_device_name(0) if args.use_gpu else None
        peak = args.peak_tflops or peak_tflops(device, args.precision)
        flops = {stage: flops_per_sample(data, stage, args) for stage in args.stages}
        for r in results:
            r["model_flops_per_sample"] = flops[r["stage"]]
            r["achieved_tflops"] = flops[r["stage"]] * r["samples_per_s"] / 1e12
            r["peak_tflops_per_worker"] = peak
            r["mfu"] = r["achieved_tflops"] / (peak * r["workers"]) if peak else None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        "\n| stage | strategy | workers | global batch | samples/s (mean step) "
        "| samples/s (median step) | model GFLOPs/sample | achieved TFLOP/s | MFU "
        "| loss first -> last |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.2f}%"
        print(
            f"| {r['stage']} | {r['strategy']} | {r['workers']} | {r['global_batch']} "
            f"| {r['samples_per_s']:.0f} | {r['samples_per_s_median_step']:.0f} "
            f"| {r['model_flops_per_sample'] / 1e9:.3f} | {r['achieved_tflops']:.4f} | {mfu} "
            f"| {r['first_loss']:.2f} -> {r['last_loss']:.2f} |"
        )
    meta = dict(
        machine=platform.machine(),
        processor=platform.processor(),
        cpus=os.cpu_count(),
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        torch=torch.__version__,
        args=vars(args),
    )
    if not args.no_ray:
        import ray

        meta["ray"] = ray.__version__
        ray.shutdown()
    path = Path(args.out) / ("pretrain_no_ray.json" if args.no_ray else "pretrain.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
