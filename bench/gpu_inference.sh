#!/usr/bin/env bash
# The GPU variant of bench/inference_service.py, as one unattended call of the `device` tool
# (single GPU, <= 8 minutes). The device machine has torch + transformers but (so far) no Ray or
# gymnasium, so part 1 always runs: what one GPU inference actor does per batch (the ~115M
# policy's forward at batch 1..64: latency and actions/s), the number that says how many
# EnvRunners one GPU actor can serve. Part 2 (the whole service: EnvRunners on the CPUs, one
# actor on the GPU) runs only where Ray and gymnasium import.
#
# Device call:  run(command="bash bench/gpu_inference.sh", timeout_s=480)
# Dry run here: DEVICE=cpu REPEATS=1 bash bench/gpu_inference.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 MUJOCO_GL=egl
OUT="${OUT:-bench_out/gpu}"
DEVICE="${DEVICE:-cuda}"
REPEATS="${REPEATS:-10}"
PY="$(command -v python3 || command -v python)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
# 1. the actor's batched forward on the GPU (and, for reference, on this machine's CPUs)
timeout 150 "$PY" bench/inference_service.py --forward-only --device "$DEVICE" \
    --repeats "$REPEATS" --out "$OUT"
timeout 120 "$PY" bench/inference_service.py --forward-only --device cpu --repeats 2 \
    --out "$OUT" || true
# 2. the service end to end (2 and 4 EnvRunners, one actor with the GPU), where Ray is installed
if "$PY" -c "import ray, gymnasium" 2>/dev/null && [ "$DEVICE" = cuda ]; then
    timeout 180 "$PY" bench/inference_service.py --gpus-per-actor 1 --cpus-per-actor 1 \
        --steps 32 --ray-cpus "$(nproc)" --out "$OUT" || true
else
    echo "Ray/gymnasium not installed (or no GPU): the end-to-end service rows are skipped"
fi
