"""bench/backbones.py's measurements (the GPU script's code path) run on the CPU: latency with
and without the prefix cache, the EnvRunner's and learner's peak memory, updates/s."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "bench_backbones", Path(__file__).parents[1] / "bench" / "backbones.py"
)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

SMALL_VLM = dict(backbone="vlm", vlm_family="smolvlm", head="gaussian", value="shared")


@pytest.mark.parametrize(
    "mc",
    [
        bench.model_config("tiny", "float32", lora=True),
        {**SMALL_VLM, "dtype": "bfloat16", "lora": {"r": 4}},
    ],
    ids=["tiny-lora", "smolvlm-bf16-lora"],
)
def test_measurements_run_on_cpu(mc):
    lat = bench.one_latency(mc, "cpu", repeats=1)
    for b in (1, 32):
        for mode in ("cache", "no_cache"):
            assert lat[f"latency_ms_b{b}_{mode}"] > 0
    assert bench.one_envrunner(mc, "cpu", envs=4)["peak_rss_mb"] > 0
    learn = bench.one_learner(mc, "cpu", batch_size=8, steps=1)
    assert learn["updates_per_s"] > 0
    assert 0 < learn["params_trainable"] < learn["params_total"]  # LoRA: base weights frozen
    vla, _, _ = bench._model(mc, with_value=False, device="cpu")
    assert bench._prompt_tokens(vla) > bench.INSTRUCTION_LENGTH


def test_table_lists_every_row():
    rows = [dict(config="tiny", dtype="float32", lora=False, params_total=575909)]
    text = bench.table(rows)
    assert "| tiny | float32 | False | 0.58M |" in text
