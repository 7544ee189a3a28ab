#!/usr/bin/env bash
# The GPU rows of bench/pretrain.py, as one call of the `device` tool (a bare machine with torch,
# transformers, peft and pillow but no Ray, gymnasium or MuJoCo; Ray's wheel is over the tool's
# 64 MiB carry limit), so `--no-ray`: the workers' optimiser step on one GPU.
#
# Here, once:   vla-ray make-vlm-data --output .vlmdata --n 1024      (ignored by git, ~5 MB)
# Device call:  run(command="bash bench/gpu_pretrain.sh", carry=[".vlmdata"], timeout_s=480)
# Dry run here: GPU_FLAGS= STEPS=1 BATCH=4 bash bench/gpu_pretrain.sh   (CPU, a few seconds' budget)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT="${OUT:-bench_out/gpu}"
DATA="${DATA:-.vlmdata}"
GPU_FLAGS="${GPU_FLAGS---use-gpu}"
STEPS="${STEPS:-20}"
BATCH="${BATCH:-64}"
PY="$(command -v python3 || command -v python)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"

# 1. The default tiny trunk of the CPU table (64x64, 2-layer LM with hidden size 64), fp32.
"$PY" bench/pretrain.py --no-ray $GPU_FLAGS --data "$DATA" --stages align instruct \
    --batch-size "$BATCH" --warmup 3 --steps "$STEPS" --out "$OUT/tiny"
# 2. A 164M-parameter VLM (224x224 images, 12-layer LM with hidden size 1024), bf16 autocast and
#    activation checkpointing, as `vla-ray pretrain --use-gpu --precision bf16` trains it.
"$PY" bench/pretrain.py --no-ray $GPU_FLAGS --precision bf16 --gradient-checkpointing \
    --data "$DATA" --image-size 224 --stages align instruct \
    --model-config '{"llm_config": {"hidden_size": 1024, "intermediate_size": 2816,
      "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 16}}' \
    --batch-size "$BATCH" --warmup 3 --steps "$STEPS" --out "$OUT/164m"
