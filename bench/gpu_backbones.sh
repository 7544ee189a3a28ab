#!/usr/bin/env bash
# The GPU rows of bench/backbones.py, as one call of the `device` tool (a bare machine with torch,
# transformers, peft and pillow but no Ray, gymnasium or MuJoCo): latency with and without the
# prefix cache, tokens/s, peak GPU memory of the policy and of a learner step, updates/s, for the
# tiny default, a SmolVLM-256M-sized and a SmolVLA-450M-sized trunk, fp32/bf16, LoRA off/on.
# Sampling through EnvRunners needs Ray and is measured on the CPU machine only.
#
# Device call:  run(command="bash bench/gpu_backbones.sh", timeout_s=480)
# Dry run here: DEVICE=cpu CONFIGS=tiny REPEATS=1 STEPS=1 bash bench/gpu_backbones.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT="${OUT:-bench_out/gpu}"
DEVICE="${DEVICE:-cuda}"
CONFIGS="${CONFIGS:-tiny smolvlm-256m smolvla-450m}"
REPEATS="${REPEATS:-10}"
STEPS="${STEPS:-5}"
PY="$(command -v python3 || command -v python)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
# shellcheck disable=SC2086
timeout 450 "$PY" bench/backbones.py --device "$DEVICE" --configs $CONFIGS \
    --dtypes float32 bfloat16 --lora off on --repeats "$REPEATS" --learner-steps "$STEPS" \
    --batch 32 --out "$OUT"
