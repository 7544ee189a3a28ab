"""Benchmark: the learner's memory and speed, full fine-tuning vs LoRA (random weights; neither
depends on them).

For the tiny default VLA and a SmolVLM-256M-sized one (``bench/backbones.py``'s configurations),
each in the modes of ``MODES`` (full fine-tuning, LoRA, LoRA + bf16 autocast, LoRA + gradient
checkpointing, full + gradient checkpointing), one learner update is what PPO's learner
differentiates: ``VLAModule.forward_train`` on a fixed batch, the Gaussian policy's negative
log-likelihood of fixed actions + a squared value loss on the shared trunk, backward, AdamW over
the trainable parameters only. Reported per row: parameters (total / trainable), resident memory
after building the module (``rest_mb``), the peak resident memory during the updates (``peak_mb``:
Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs`` just before the first update,
so model building does not count), their difference (``update_mb``: activations, gradients,
optimizer state, temporaries) and updates/s (after one warm-up update, which allocates the
optimizer state). Every row runs in a fresh process. Prints a markdown table and writes
``OUT/lora_memory.json``.

    OMP_NUM_THREADS=1 flock /work/cpu.lock python bench/lora_memory.py --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).parent))

from backbones import CONFIGS, INSTRUCTION_LENGTH, TEXTS  # noqa: E402

LORA = {"r": 8, "alpha": 16}
# mode -> model_config additions
MODES: dict[str, dict[str, Any]] = {
    "full": {},
    "lora": {"lora": LORA, "freeze_vision": True},
    "lora+bf16-autocast": {"lora": LORA, "freeze_vision": True, "autocast": "bf16"},
    "lora+checkpointing": {"lora": LORA, "freeze_vision": True, "gradient_checkpointing": True},
    "full+checkpointing": {"gradient_checkpointing": True},
}


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def one_row(config: str, mode: str, batch_size: int, steps: int) -> dict[str, Any]:
    """Build the module, then time ``steps`` updates and record the peak RSS during them."""
    import gymnasium as gym
    import numpy as np
    import torch
    from ray.rllib.core.columns import Columns

    import vla_ray.envs  # noqa: F401  (registers LangReach)
    from vla_ray.rl_module import VLAModule
    from vla_ray.tokenizer import encode_instructions

    env = gym.make("vla_ray/LangReach-v0")
    torch.manual_seed(0)
    mc = {**json.loads(json.dumps(CONFIGS[config])), "head": "gaussian", "value": "shared"}
    mc.update(MODES[mode])
    module = VLAModule(
        observation_space=env.observation_space, action_space=env.action_space, model_config=mc
    )
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    rng = np.random.default_rng(0)
    texts = [TEXTS[i % len(TEXTS)] for i in range(batch_size)]
    ids, mask = encode_instructions(texts, INSTRUCTION_LENGTH, module.vla.tokenizer)
    h, w, _ = env.observation_space["image"].shape
    obs = {
        "image": rng.integers(0, 256, size=(batch_size, h, w, 3), dtype=np.uint8),
        "state": rng.normal(size=(batch_size, env.observation_space["state"].shape[0])),
        "instruction": ids,
        "instruction_mask": mask,
    }
    batch = {Columns.OBS: {k: torch.as_tensor(v) for k, v in obs.items()}}
    batch[Columns.OBS]["state"] = batch[Columns.OBS]["state"].float()
    actions = torch.zeros(batch_size, env.action_space.shape[0])
    dist_cls = module.get_train_action_dist_cls()

    def update() -> None:
        out = module.forward_train(batch)
        dist = dist_cls.from_logits(out[Columns.ACTION_DIST_INPUTS])
        values = module.compute_values(batch, embeddings=out[Columns.EMBEDDINGS])
        loss = -dist.logp(actions).mean() + values.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rest = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    update()  # warm-up: optimizer state
    t0 = time.perf_counter()
    for _ in range(steps):
        update()
    rate = steps / (time.perf_counter() - t0)
    peak = _status_mb("VmHWM")
    return {
        "params_total": sum(p.numel() for p in module.parameters()),
        "params_trainable": sum(p.numel() for p in params),
        "rest_mb": round(rest, 1),
        "peak_mb": round(peak, 1),
        "update_mb": round(peak - rest, 1),
        "updates_per_s": round(rate, 3),
    }


def run_child(config: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    steps = args.steps if config == "tiny" else args.large_steps
    job = json.dumps({"config": config, "mode": mode, "batch": args.batch, "steps": steps})
    proc = subprocess.run(
        [sys.executable, __file__, "--one", job], capture_output=True, text=True, check=False
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": " | ".join(tail)}


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows."""
    cols = [
        ("config", "config"),
        ("mode", "mode"),
        ("params_total", "params"),
        ("params_trainable", "trainable"),
        ("rest_mb", "RSS at rest MB"),
        ("peak_mb", "peak RSS in updates MB"),
        ("update_mb", "update MB (peak - rest)"),
        ("updates_per_s", "updates/s"),
    ]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key, r.get("error", "") if key == "updates_per_s" else "")
            if key.startswith("params") and isinstance(v, int):
                v = f"{v / 1e6:.3f}M" if v < 10_000_000 else f"{v / 1e6:.1f}M"
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "smolvlm-256m"], choices=CONFIGS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch", type=int, default=32, help="learner batch (fixed)")
    parser.add_argument("--steps", type=int, default=20, help="timed updates, tiny config")
    parser.add_argument("--large-steps", type=int, default=3, help="timed updates, others")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--tag", default="", help="write OUT/lora_memory_TAG.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        job = json.loads(args.one)
        row = one_row(job["config"], job["mode"], job["batch"], job["steps"])
        print("RESULT " + json.dumps(row), flush=True)
        return
    rows = []
    for config in args.configs:
        for mode in args.modes:
            t0 = time.perf_counter()
            row = {"config": config, "mode": mode, **run_child(config, mode, args)}
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(
        bench="lora_memory",
        command="python bench/lora_memory.py " + " ".join(sys.argv[1:]),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        batch=args.batch,
        rows=rows,
    )
    name = f"lora_memory_{args.tag}.json" if args.tag else "lora_memory.json"
    (out / name).write_text(json.dumps(record, indent=2))
    print(table(rows))
    print(f"\nwrote {out / name}")


if __name__ == "__main__":
    main()
