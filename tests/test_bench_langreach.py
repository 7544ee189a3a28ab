"""bench/langreach_ppo.py's multi-seed plan and the pass count it reports (issue 30's bar:
eval success >= 0.8 with every colour >= 0.6, in 4 of 5 seeds)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "bench_langreach_ppo", Path(__file__).parents[1] / "bench" / "langreach_ppo.py"
)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_one_instruction_run_per_seed_and_the_blind_control_with_the_first():
    common = {"env_config": {"image_size": 64}}
    variants = dict(bench.plan_variants(common, [2, 3]))
    assert list(variants) == ["instruction_s2", "instruction_s3", "blind_s2"]
    assert variants["instruction_s3"] == {"env_config": {"image_size": 64}, "seed": 3}
    assert variants["blind_s2"] == {
        "env_config": {"image_size": 64, "instruction_mode": "blind"},
        "seed": 2,
    }
    assert common == {"env_config": {"image_size": 64}}  # not changed in place
    # without seeds: the two runs of the earlier layout
    assert [n for n, _ in bench.plan_variants({}, None)] == ["instruction", "blind"]
    assert [n for n, _ in bench.plan_variants({}, [0], blind=False)] == ["instruction_s0"]


def test_a_run_passes_only_with_every_colour_above_the_floor():
    def run(name, success, colours):
        by_target = dict(zip(("red", "green", "blue"), colours, strict=True))
        return {"variant": name, "eval": {"success_rate": success, "success_by_target": by_target}}

    results = [
        run("instruction_s0", 0.99, (1.0, 0.97, 1.0)),
        run("instruction_s1", 0.81, (0.24, 1.0, 1.0)),  # one colour lags: not a pass
        run("instruction_s2", 0.80, (0.6, 0.9, 0.9)),
        run("instruction_s3", 0.79, (0.7, 0.8, 0.9)),
        run("blind_s0", 0.95, (1.0, 1.0, 1.0)),  # the control is not counted
    ]
    assert bench.summary_line(results).endswith(": 2 of 4")
