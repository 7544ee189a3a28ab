"""Benchmark: eager PyTorch vs onnxruntime fp32 (the single graph, and the prefix + suffix
graphs with the runner's instruction-prefix cache) on real LangReach observations, one
intra-op thread, batch 1 and 32. The runtimes are timed in interleaved rounds (median of the
rounds), so that other load on the machine falls on all of them alike. Each call is timed on
two clocks: wall time, and the calling thread's CPU time (``time.thread_time``; every runtime
here computes in the calling thread), which time spent waiting for a core on a loaded machine
does not add to.

    python bench/onnx_prefix.py EXPORT_DIR [--rounds 7] [--seconds 1] [--baseline OTHER_DIR]

EXPORT_DIR is a ``vla-ray export`` output with ``pytorch/`` and ``onnx/`` (exported with the
prefix cache, the default), e.g. of bench/serve.py's model. ``--baseline`` adds the prefix-cached
runner of another export of the same weights (e.g. made by an older commit) to the same rounds,
for a before/after comparison on equal terms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=1.0, help="per runtime and round")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--baseline", type=Path, action="append", default=[], help="another export's dir"
    )
    args = parser.parse_args()

    import torch

    from serve import observations  # bench/serve.py
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
    for other in args.baseline:
        runtimes[f"prefix cache, {other.name}"] = load_runner(other / "onnx")
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
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in runtimes}
        for _ in range(args.rounds):
            for name, fn in runtimes.items():
                times[name].append(time_calls(fn, x, args.seconds))
        for clock, c in (("wall", 0), ("cpu", 1)):
            eager = statistics.median(t[c] for t in times["torch eager (memoised prefix)"])
            for name, sec in times.items():
                med = statistics.median(t[c] for t in sec)
                rounds = ", ".join(f"{t[c] * 1e3:.2f}" for t in sec)
                print(
                    f"batch {b:>3} {clock:<4} {name:<32} {med * 1e3:8.3f} ms  "
                    f"{eager / med:5.2f}x eager  (rounds, ms: {rounds})",
                    flush=True,
                )
    print(f"1-minute load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")


def time_calls(fn, inputs, seconds: float, min_calls: int = 20) -> tuple[float, float]:
    """Median wall and thread-CPU seconds per call of ``fn(inputs)`` over ~``seconds`` of wall
    time, after warm-up."""
    for _ in range(5):
        fn(inputs)
    wall, cpu = [], []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(wall) < min_calls:
        t0, c0 = time.perf_counter(), time.thread_time()
        fn(inputs)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


if __name__ == "__main__":
    main()
