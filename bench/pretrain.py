"""Benchmark: VLM pretraining throughput (samples/s) on Ray Train for 1, 2, ... workers.

Makes a synthetic LLaVA-layout dataset (``vla-ray make-vlm-data``) unless ``--data`` is given,
then runs ``vla-ray pretrain`` for each stage and worker count with the same global batch, and
reports samples/s over the steps after ``--warmup`` (time per optimiser step as measured in the
workers: data loading + forward + backward + all-reduce + optimiser). Prints a table and writes
``OUT/pretrain.json``.

Model FLOPs per sample are counted once on the driver (``torch.utils.flop_counter`` over one
forward + backward of the stage's trainable set, on real batches; gradient-checkpointing
recomputation is not counted), so each row also reports the achieved FLOP/s and, where the peak of
the device is known (``--peak-tflops``, or a table of NVIDIA GPUs for ``--use-gpu``), the model FLOPs
utilisation (MFU = achieved / peak, per worker).

    python bench/pretrain.py --workers 1 2 --stages align instruct --out docs/bench
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


def flops_per_sample(data: Path, stage: str, args, batches: int = 4, batch: int = 8) -> float:
    """Model FLOPs of one training sample (forward + backward) in ``stage``, averaged over a few
    real batches of the dataset."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vla_ray.pretrain.data import INSTRUCT_FILE, PRETRAIN_FILE, collate, load_records
    from vla_ray.pretrain.model import VisionLanguageModel, set_trainable
    from vla_ray.pretrain.trainer import PretrainConfig, build_vla, vla_config_for

    cfg = PretrainConfig(
        stage=stage,
        data=str(data / (PRETRAIN_FILE if stage == "align" else INSTRUCT_FILE)),
        output=str(data / "unused"),
        vision=args.vision,
        projector=args.projector,
    )
    vla = build_vla(vla_config_for(cfg).to_dict(), None, 0)
    set_trainable(vla.trunk, stage, cfg.train_vision)
    vlm = VisionLanguageModel(vla.trunk)
    records = list(load_records(cfg.data).records)[: batches * batch]
    total, samples = 0, 0
    for i in range(0, len(records), batch):
        rows = records[i : i + batch]
        cols = {k: [r[k] for r in rows] for k in rows[0]}
        arrays = collate(
            cols, vla.tokenizer, vlm.num_image_tokens, tuple(vla.config.image_size), cfg.max_length
        )
        inputs = {k: torch.from_numpy(v) for k, v in arrays.items()}
        with FlopCounterMode(display=False) as counter:
            loss_sum, _ = vlm(**inputs)
            loss_sum.backward()
        vlm.zero_grad(set_to_none=True)
        total += counter.get_total_flops()
        samples += len(rows)
    return total / samples


def run_one(data: Path, stage: str, workers: int, args, work: Path) -> dict:
    from vla_ray.pretrain.data import INSTRUCT_FILE, PRETRAIN_FILE
    from vla_ray.pretrain.trainer import PretrainConfig, pretrain

    out = work / f"{stage}-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = PretrainConfig(
        stage=stage,
        data=str(data / (PRETRAIN_FILE if stage == "align" else INSTRUCT_FILE)),
        output=str(out),
        num_workers=workers,
        batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        checkpoint_every=10**6,
        use_gpu=args.use_gpu,
        precision=args.precision,
        vision=args.vision,
        projector=args.projector,
        progress=False,
    )
    t0 = time.perf_counter()
    summary = pretrain(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > args.warmup]
    seconds = sum(r["step_time_s"] for r in timed)
    median = float(np.median([r["step_time_s"] for r in timed]))
    return dict(
        samples_per_s_median_step=args.batch_size / median,
        step_times_s=[r["step_time_s"] for r in timed],
        stage=stage,
        workers=workers,
        global_batch=args.batch_size,
        steps_timed=len(timed),
        samples_per_s=len(timed) * args.batch_size / seconds,
        step_time_s=seconds / len(timed),
        first_loss=rows[0]["loss"],
        last_loss=rows[-1]["loss"],
        fit_wall_s=wall,
        records=summary["records"],
    )


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
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--precision", default="fp32")
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="peak TFLOP/s of one worker's device for MFU (default: known GPUs only)",
    )
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()

    from vla_ray.pretrain.data import make_vlm_data
    from vla_ray.train import init_ray

    work = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    try:
        data = Path(args.data) if args.data else work / "data"
        if not args.data:
            make_vlm_data(data, args.n, progress=False)
        init_ray()
        results = [
            run_one(data, stage, w, args, work) for stage in args.stages for w in args.workers
        ]
        import torch

        device = (
            torch.cuda.get_device_name(0) if args.use_gpu and torch.cuda.is_available() else None
        )
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
        "\n| stage | workers | global batch | samples/s (mean step) | samples/s (median step) "
        "| model GFLOPs/sample | achieved TFLOP/s | MFU | loss first -> last |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.2f}%"
        print(
            f"| {r['stage']} | {r['workers']} | {r['global_batch']} | {r['samples_per_s']:.0f} "
            f"| {r['samples_per_s_median_step']:.0f} | {r['model_flops_per_sample'] / 1e9:.3f} "
            f"| {r['achieved_tflops']:.4f} | {mfu} "
            f"| {r['first_loss']:.2f} -> {r['last_loss']:.2f} |"
        )
    import ray
    import torch

    meta = dict(
        machine=platform.machine(),
        processor=platform.processor(),
        cpus=os.cpu_count(),
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        ray=ray.__version__,
        torch=torch.__version__,
        args=vars(args),
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "pretrain.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2)
    )
    print(f"wrote {Path(args.out) / 'pretrain.json'}")
    ray.shutdown()


if __name__ == "__main__":
    main()
