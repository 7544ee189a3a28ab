"""Benchmark: eager PyTorch vs onnxruntime fp32 (the single graph, and the prefix + suffix
graphs with the runner's instruction-prefix cache) on real LangReach observations, one
intra-op thread, batch 1 and 32. The runtimes are timed in interleaved rounds (median of the
rounds), so that other load on the machine falls on all of them alike.

    python bench/onnx_prefix.py EXPORT_DIR [--rounds 7] [--seconds 1]

EXPORT_DIR is a ``vla-ray export`` output with ``pytorch/`` and ``onnx/`` (exported with the
prefix cache, the default), e.g. of bench/serve.py's model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=1.0, help="per runtime and round")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()

    import torch

    from serve import observations, time_calls  # bench/serve.py
    from vla_ray.export import OnnxRunner, load_runner
    from vla_ray.models.vla import VLA
    from vla_ray.tokenizer import encode_instructions

    torch.set_num_threads(1)
    vla = VLA.from_pretrained(args.export_dir / "pytorch").eval()
    runtimes = {
        "torch eager (memoised prefix)": lambda x: vla.predict(x),
        "onnxruntime fp32, one graph": OnnxRunner(args.export_dir / "onnx" / "model.onnx"),
        "onnxruntime fp32, prefix cache": load_runner(args.export_dir / "onnx"),
    }
    obs = observations()
    load_before = os.getloadavg()[0]
    for b in args.batch:
        pick = [obs[i % len(obs)] for i in range(b)]
        ids, mask = encode_instructions([t for _, t in pick], 16, vla.tokenizer)
        x = {
            "image": np.stack([o["image"] for o, _ in pick]),
            "state": np.stack([o["state"] for o, _ in pick]).astype(np.float32),
            "instruction": ids,
            "instruction_mask": mask,
        }
        times: dict[str, list[float]] = {k: [] for k in runtimes}
        for _ in range(args.rounds):
            for name, fn in runtimes.items():
                times[name].append(time_calls(fn, x, args.seconds))
        eager = statistics.median(times["torch eager (memoised prefix)"])
        for name, sec in times.items():
            med = statistics.median(sec)
            rounds = ", ".join(f"{s * 1e3:.2f}" for s in sec)
            print(
                f"batch {b:>3} {name:<32} {med * 1e3:8.3f} ms  {eager / med:5.2f}x eager  "
                f"(rounds, ms: {rounds})",
                flush=True,
            )
    print(f"1-minute load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
