"""Benchmark: VLA backbones of realistic size on LangReach (random weights; timing does not
depend on them).

For each configuration x dtype x LoRA: parameter counts (total / trainable), inference latency at
batch 1 and 32 with the instruction-prefix cache on (memoised prefixes, as in RL where the
instruction repeats) and off (every row's prefix encoded), the peak resident memory of one
EnvRunner's module (inference-only, batch of ``--envs-per-runner``) and of a learner step, and
learner updates/s (forward + backward + AdamW on a behaviour-cloning loss at ``--batch``). With
``--runners`` it also measures env steps/s sampling LangReach through PPO's EnvRunners.
Every measurement runs in a fresh subprocess (clean peak memory). Prints a table and writes
``OUT/backbones.json`` (``backbones_cuda.json`` with ``--device cuda``, which also reports
tokens/s and GPU memory).

    python bench/backbones.py --out docs/bench
    python bench/backbones.py --configs smolvlm-256m --dtypes bfloat16 --lora off --runners
    python bench/backbones.py --device cuda --out $OUT     # the GPU rows (bench/gpu_backbones.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

ENV = "vla_ray/LangReach-v0"
# LangReach's instruction length in tokens of the shipped tokenizer
INSTRUCTION_LENGTH = 16
_SIGLIP_BASE = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
)
# name -> model_config of VLAModule (everything else derives from LangReach's spaces)
CONFIGS: dict[str, dict[str, Any]] = {
    # the langreach-ppo model: CoordConv CNN keypoints + 2-layer, 64-wide Qwen2 LM
    "tiny": dict(
        vision="cnn",
        vision_config={"tokens": "keypoints"},
        projector="attention",
        projector_tokens=8,
        vision_skip=True,
    ),
    # SmolVLM-256M's architecture and sizes (SigLIP-B/16 tower, pixel-shuffle x4 connector,
    # 30-layer 576-wide Llama LM, 49,280-token vocabulary) at 128-px images (4 tokens each;
    # the published model takes 512 px: 64 tokens)
    "smolvlm-256m": dict(
        backbone="vlm",
        vlm_family="smolvlm",
        vlm_config={
            "scale_factor": 4,
            "text_config": dict(
                hidden_size=576,
                intermediate_size=1536,
                num_hidden_layers=30,
                num_attention_heads=9,
                num_key_value_heads=3,
                vocab_size=49280,
                tie_word_embeddings=True,
            ),
            "vision_config": dict(_SIGLIP_BASE, patch_size=16, image_size=128),
        },
    ),
    # SmolVLA-450M's VLM part: SmolVLM2-500M with 16 of its 32 LM layers (960 wide); its
    # flow-matching action expert (~100M parameters) is not part of this configuration
    "smolvla-450m": dict(
        backbone="vlm",
        vlm_family="smolvlm",
        vlm_config={
            "scale_factor": 4,
            "text_config": dict(
                hidden_size=960,
                intermediate_size=2560,
                num_hidden_layers=16,
                num_attention_heads=15,
                num_key_value_heads=5,
                vocab_size=49280,
                tie_word_embeddings=True,
            ),
            "vision_config": dict(_SIGLIP_BASE, patch_size=16, image_size=128),
        },
    ),
}
LORA = {"r": 8, "alpha": 16}


def model_config(name: str, dtype: str, lora: bool) -> dict[str, Any]:
    mc = json.loads(json.dumps(CONFIGS[name]))
    mc.update(head="gaussian", value="shared", dtype=dtype)
    if lora:
        mc["lora"] = dict(LORA)
    return mc


# ---- one measurement (runs in its own process) ---------------------------------------------------
# LangReach's spaces (64x64 RGB, 4-D state, 2-D action, 16 instruction tokens); the latency,
# memory and learner rows use observations of that shape without the env or Ray, so they also
# run on a GPU machine that has only torch + transformers + peft
IMAGE_SIZE, STATE_DIM, ACTION_DIM = (64, 64), 4, 2
TEXTS = ["reach the red target", "go to the green ball", "move to the blue goal"]


def _model(mc: dict[str, Any], with_value: bool, device: str):
    """The VLA of ``mc`` (+ a value MLP, as VLAModule's learner has) and 32 observations."""
    import numpy as np
    import torch

    from vla_ray.config import VLAConfig
    from vla_ray.models.heads import mlp
    from vla_ray.models.vla import VLA
    from vla_ray.tokenizer import encode_instructions

    torch.manual_seed(0)
    cfg = {k: v for k, v in mc.items() if k != "value"}
    cfg.update(
        image_size=IMAGE_SIZE,
        state_dim=STATE_DIM,
        action_dim=ACTION_DIM,
        instruction_max_length=INSTRUCTION_LENGTH,
    )
    vla = VLA(VLAConfig.from_dict(cfg))
    vf = mlp(vla.trunk.feature_dim, 256, 1) if with_value else None
    rng = np.random.default_rng(0)
    texts = [TEXTS[i % len(TEXTS)] for i in range(32)]
    ids, mask = encode_instructions(texts, INSTRUCTION_LENGTH, vla.tokenizer)
    obs = {
        "image": rng.integers(0, 256, size=(32, *IMAGE_SIZE, 3), dtype=np.uint8),
        "state": rng.normal(size=(32, STATE_DIM)).astype(np.float32),
        "instruction": ids,
        "instruction_mask": mask,
    }
    obs = {k: torch.as_tensor(v).to(device) for k, v in obs.items()}
    vla = vla.to(device)
    return vla, (vf.to(device) if vf is not None else None), obs


def _batch(obs: dict, n: int) -> dict:
    return {k: v[:n] for k, v in obs.items()}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device: str) -> dict[str, float]:
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device == "cuda":
        import torch

        out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _prompt_tokens(vla: Any) -> int:
    """Tokens the LM runs per sample without the prefix cache (for tokens/s)."""
    trunk = vla.trunk
    if hasattr(trunk, "suffix_ids"):  # backbone="vlm"
        return (
            len(trunk.prefix_ids)
            + INSTRUCTION_LENGTH
            + len(trunk.mid_ids)
            + len(trunk.suffix_ids)
            + len(trunk.post_ids)
        )
    return 1 + INSTRUCTION_LENGTH + trunk.projector.num_tokens + 2


def one_latency(mc: dict[str, Any], device: str, repeats: int) -> dict[str, Any]:
    """Inference latency (ms) at batch 1 and 32, prefix cache on and off."""
    import torch

    vla, _, obs = _model(mc, with_value=False, device=device)
    vla.eval()
    trunk, head = vla.trunk, vla.head
    out: dict[str, Any] = {}
    with torch.no_grad():
        for b in (1, 32):
            batch = _batch(obs, b)
            for mode, fn in (("cache", trunk), ("no_cache", trunk.forward_functional)):
                head.dist_inputs(fn(batch))  # warm-up (fills the prefix memo)
                times = []
                for _ in range(repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    head.dist_inputs(fn(batch))
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                ms = statistics.median(times) * 1000
                out[f"latency_ms_b{b}_{mode}"] = round(ms, 2)
                if device == "cuda" and b == 32 and mode == "no_cache":
                    out["tokens_per_s_b32"] = round(32 * _prompt_tokens(vla) / ms * 1000)
    return {**out, **_peak_mb(device)}


def one_envrunner(mc: dict[str, Any], device: str, envs: int) -> dict[str, Any]:
    """Peak memory of an EnvRunner's policy: inference only, ``envs`` observations a step."""
    import torch

    vla, _, obs = _model(mc, with_value=False, device=device)
    vla.eval()
    with torch.no_grad():
        for _ in range(3):
            vla.head.dist_inputs(vla.trunk(_batch(obs, envs)))
    return _peak_mb(device)


def one_learner(mc: dict[str, Any], device: str, batch_size: int, steps: int) -> dict[str, Any]:
    """Parameters, updates/s and peak memory of forward + backward + AdamW (policy NLL +
    value loss on a shared trunk, as PPO's learner differentiates)."""
    import torch

    vla, vf, obs = _model(mc, with_value=True, device=device)
    vla.train()
    params = [p for m in (vla, vf) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = {
        k: v.repeat(-(-batch_size // 32), *([1] * (v.ndim - 1)))[:batch_size]
        for k, v in obs.items()
    }
    target = torch.zeros(batch_size, 1, ACTION_DIM, device=device)

    def step() -> None:
        feats = vla.trunk(batch)
        loss = vla.head.loss(feats, target) + vf(feats).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (optimizer state allocated)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    rate = steps / (time.perf_counter() - t0)
    total = sum(p.numel() for m in (vla, vf) for p in m.parameters())
    return {
        "params_total": total,
        "params_trainable": sum(p.numel() for p in params),
        "updates_per_s": round(rate, 3),
        **_peak_mb(device),
    }


def one_sampling(mc: dict[str, Any], runners: int, envs: int, steps: int) -> dict[str, Any]:
    """Env steps/s sampling LangReach with ``runners`` EnvRunners (PPO's), model ``mc`` (CPU, needs Ray)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from sampling import measure

    from vla_ray.train import init_ray, resolve

    init_ray(num_cpus=runners + 1)
    spec = resolve(
        "langreach-ppo",
        {"env_runners": {"num_env_runners": runners, "num_envs_per_env_runner": envs}},
    )
    spec.settings["model"] = {**mc}  # exactly this model (no preset keys merged in)
    rate = measure("vla", runners, envs, steps, repeats=2, spec=spec)
    return {"steps_per_s": round(rate, 2)}


def measure_job(job: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    mc = model_config(job["config"], job["dtype"], job["lora"])
    kind = job["kind"]
    if kind == "latency":
        return one_latency(mc, args.device, args.repeats)
    if kind == "envrunner":
        return one_envrunner(mc, args.device, args.envs_per_runner)
    if kind == "learner":
        return one_learner(mc, args.device, args.batch, args.learner_steps)
    return one_sampling(mc, job["runners"], args.envs_per_runner, args.steps)


def child(args: argparse.Namespace) -> None:
    print("RESULT " + json.dumps(measure_job(json.loads(args.one), args)), flush=True)


# ---- driver -------------------------------------------------------------------------------------
def run_child(job: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in a fresh process (CPU: clean peak RSS), or in this process on a GPU
    (peak GPU memory reset per measurement; saves a process start per row)."""
    if args.device == "cuda":
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            return measure_job(job, args)
        except Exception as err:  # noqa: BLE001 - a row's failure is reported, the rest run
            return {"error": f"{type(err).__name__}: {err}"[:300]}
    cmd = [
        sys.executable,
        __file__,
        "--one",
        json.dumps(job),
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
        "--envs-per-runner",
        str(args.envs_per_runner),
        "--batch",
        str(args.batch),
        "--learner-steps",
        str(args.learner_steps),
        "--steps",
        str(args.steps),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": " | ".join(tail)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--lora", nargs="+", default=["off", "on"], choices=("off", "on"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=5, help="latency repeats (median)")
    parser.add_argument("--batch", type=int, default=32, help="learner batch")
    parser.add_argument("--learner-steps", type=int, default=3)
    parser.add_argument("--envs-per-runner", type=int, default=8)
    parser.add_argument(
        "--runners",
        nargs="*",
        type=int,
        default=None,
        help="also sample LangReach with these EnvRunner counts (fp32, no LoRA rows)",
    )
    parser.add_argument("--steps", type=int, default=256, help="env steps per sampling run")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        child(args)
        return
    if args.runners == []:
        args.runners = [1, 2]
    rows = []
    for name in args.configs:
        # the default trunk has no bf16 weights option (dtype is the transformers trunks')
        dtypes = args.dtypes if CONFIGS[name].get("backbone") else ["float32"]
        for dtype in dtypes:
            for lora in args.lora:
                job = dict(config=name, dtype=dtype, lora=lora == "on")
                row: dict[str, Any] = dict(job)
                t0 = time.perf_counter()
                lat = run_child({**job, "kind": "latency"}, args)
                row.update({k: v for k, v in lat.items() if k != "peak_rss_mb"})
                env = run_child({**job, "kind": "envrunner"}, args)
                row["envrunner_peak_rss_mb"] = env.get("peak_rss_mb", env.get("error"))
                if "gpu_peak_mb" in env:
                    row["envrunner_gpu_peak_mb"] = env["gpu_peak_mb"]
                learn = run_child({**job, "kind": "learner"}, args)
                row.update({k: v for k, v in learn.items() if k not in ("peak_rss_mb",)})
                row["learner_peak_rss_mb"] = learn.get("peak_rss_mb", learn.get("error"))
                if args.runners and dtype == "float32" and lora == "off":
                    for r in args.runners:
                        s = run_child({**job, "kind": "sampling", "runners": r}, args)
                        row[f"steps_per_s_{r}_runners"] = s.get("steps_per_s", s.get("error"))
                row["wall_s"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "backbones.json" if args.device == "cpu" else f"backbones_{args.device}.json"
    record = dict(
        bench="backbones",
        command="python bench/backbones.py " + " ".join(sys.argv[1:]),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, device {args.device}",
        rows=rows,
    )
    (out / name).write_text(json.dumps(record, indent=2))
    print(table(rows))
    print(f"\nwrote {out / name}")


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows."""
    cols = [
        ("config", "config"),
        ("dtype", "dtype"),
        ("lora", "LoRA"),
        ("params_total", "params"),
        ("params_trainable", "trainable"),
        ("latency_ms_b1_cache", "b1 ms (cache)"),
        ("latency_ms_b1_no_cache", "b1 ms (no cache)"),
        ("latency_ms_b32_cache", "b32 ms (cache)"),
        ("latency_ms_b32_no_cache", "b32 ms (no cache)"),
        ("envrunner_peak_rss_mb", "EnvRunner MB"),
        ("learner_peak_rss_mb", "learner MB"),
        ("updates_per_s", "updates/s"),
        ("steps_per_s_1_runners", "steps/s 1 runner"),
        ("steps_per_s_2_runners", "steps/s 2 runners"),
    ]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key, "")
            if key.startswith("params") and isinstance(v, int):
                v = f"{v / 1e6:.2f}M"
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
