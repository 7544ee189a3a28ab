"""The vla-ray command line: list, train (--local and with EnvRunners), eval, argument errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from vla_ray.cli import main
from vla_ray.train import parse_overrides

SMALL = [
    "--set",
    "training.train_batch_size_per_learner=128",
    "--set",
    "training.minibatch_size=64",
    "--set",
    "training.num_epochs=1",
    "--set",
    "env_runners.num_envs_per_env_runner=2",
]


def test_list_shows_presets_envs_algorithms(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "langreach-ppo" in out and "vla_ray/LangReach-v0" in out and "ppo" in out


def test_console_script_installed():
    out = subprocess.run(
        [sys.executable, "-m", "vla_ray.cli", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert "langreach-ppo" in out


def test_parse_overrides_nested_and_typed():
    got = parse_overrides(["training.lr=1e-4", "env.instruction_mode=blind", 'model.lora={"r": 4}'])
    assert got == {
        "training": {"lr": 1e-4},
        "env_config": {"instruction_mode": "blind"},
        "model": {"lora": {"r": 4}},
    }
    with pytest.raises(ValueError, match="expected key=value"):
        parse_overrides(["training.lr"])
    with pytest.raises(ValueError, match="unknown key 'trainig.lr'"):
        parse_overrides(["trainig.lr=1"])


def test_set_checks_every_key_against_its_section(capsys, tmp_path):
    """--set training.lrr is refused before anything starts: the key, its section and the
    closest valid key (the same check as the tune YAMLs)."""
    out = tmp_path / "run"
    argv = ["train", "--preset", "langreach-ppo", "--stop-iters", "1", "--output", str(out)]
    bad = ["training.lrr=1e-4", "env.num_target=4", "model.haed=mlp", "env_runners.num_env=2"]
    assert main([*argv, *(a for b in bad for a in ("--set", b))]) == 2
    err = capsys.readouterr().err
    for needle in (
        "--set training.lrr: training takes no key 'lrr'; did you mean 'lr'?",
        "--set env.num_target: env takes no key 'num_target'; did you mean 'num_targets'?",
        "--set model.haed: model takes no key 'haed'; did you mean 'head'?",
        "--set env_runners.num_env: env_runners takes no key 'num_env'",
    ):
        assert needle in err, f"{needle!r} not in {err}"
    assert not out.exists()  # refused before the run directory was made


def test_set_accepts_every_section_s_real_keys():
    """Keys each section really takes pass: the algorithm config's, the module's model keys,
    the env's kwargs and the env factory's wrapper keys; deeper keys are left to the component."""
    from vla_ray.presets import PRESETS
    from vla_ray.setting_keys import check_overrides
    from vla_ray.train import resolve

    ok = parse_overrides(
        [
            "training.lr=1e-4",
            "model.head_config.init_log_std=-1",  # open-ended: checked when the head is built
            "model.value=separate",
            "env.num_targets=2",
            "env.expert_beta=0.5",  # DAgger's wrapper key
            "env.safety=envs/safety/langreach.yaml",  # the safety layer's wrapper key
            'env_runners.inference={"actors": 1}',  # the shared inference actors
            "fault_tolerance.max_num_env_runner_restarts=3",
            "stop.iters=2",
            "seed=3",
        ]
    )
    settings = resolve("langreach-ppo", ok).settings
    assert settings["training"]["lr"] == 1e-4
    assert settings["env_runners"]["inference"] == {"actors": 1}
    check_overrides(
        parse_overrides(["model.q_hidden=64", "model.twin_q=false"]), "sac", "Pendulum-v1"
    )
    with pytest.raises(ValueError, match="model takes no key 'q_hidden'"):
        check_overrides(parse_overrides(["model.q_hidden=64"]), "ppo", "vla_ray/LangReach-v0")
    for preset in PRESETS.values():  # every preset's own settings are valid keys
        sections = {k: v for k, v in preset.sections().items() if isinstance(v, dict)}
        check_overrides(sections, preset.algorithm, preset.env)


def test_unknown_preset_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--preset", "nope", "--stop-iters", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --preset: invalid choice: 'nope'" in err
    assert "'langreach-ppo'" in err and "'carla-ppo'" in err  # the choices


def test_version(capsys):
    import vla_ray

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"vla-ray {vla_ray.__version__}"


def test_every_command_s_help_shows_defaults_choices_and_examples(capsys):
    from vla_ray.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in sub.choices:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = capsys.readouterr().out
        assert f"\nexamples:\n  vla-ray {name}" in out, f"{name}: no examples in --help"
    for argv, needle in (
        (["eval", "--help"], "(default: 50)"),  # --episodes
        (["serve", "--help"], "(default: 8000)"),  # --port, a flag without its own help
        (["collect", "--help"], "{rllib,minari,lerobot,d4rl}"),
        (["export", "--help"], "from: onnx, torchscript, onnx-int8"),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert needle in " ".join(capsys.readouterr().out.split()), (argv, needle)
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--checkpoint", "c", "--output", "o", "--format", "onnx,tflite"])
    assert exit_.value.code == 2
    assert "unknown format(s) 'tflite'; choose from onnx," in capsys.readouterr().err


@pytest.mark.slow
def test_train_local_then_eval_both_checkpoint_kinds(ray_session, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--preset",
            "langreach-ppo",
            "--local",
            "--stop-iters",
            "1",
            "--output",
            str(out),
            "--quiet",
            *SMALL,
        ]
    )
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["env_runners"]["num_env_runners"] == 0  # --local: all in this process
    assert config["training"]["train_batch_size_per_learner"] == 128
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["iteration"] == 1
    learner = rows[0]["learner"]  # PPO's learner statistics ride along with the env metrics
    assert {"policy_loss", "vf_loss", "entropy", "mean_kl_loss"} <= set(learner)
    assert all(np.isfinite(v) for v in learner.values())
    # 128 steps hold finished 50-step episodes: success is also reported per target colour
    assert rows[0]["success_by_target"]
    assert set(rows[0]["success_by_target"]) <= {"red", "green", "blue"}
    ckpt = out / "checkpoints" / "last"
    card = (ckpt / "vla" / "README.md").read_text()  # the model card names env and preset
    assert card.startswith("---\nlibrary_name: vla-ray\n")
    assert "`vla_ray/LangReach-v0`" in card and "--preset langreach-ppo" in card
    results = {}
    for name, path in (("rllib", ckpt), ("pretrained", ckpt / "vla")):
        js = tmp_path / f"{name}.json"
        assert main(["eval", "--checkpoint", str(path), "--episodes", "3", "--json", str(js)]) == 0
        results[name] = json.loads(js.read_text())
        assert {"success_rate", "mean_return", "mean_length"} <= set(results[name])
        assert 0.0 <= results[name]["success_rate"] <= 1.0
        assert 1 <= results[name]["mean_length"] <= 50
        # LangReach names the goal: per-colour success whose weighted mean is the overall one
        counts, by_target = results[name]["episodes_by_target"], results[name]["success_by_target"]
        assert set(counts) == set(by_target) <= {"red", "green", "blue"}
        assert sum(counts.values()) == 3
        weighted = sum(counts[t] * by_target[t] for t in counts) / 3
        assert weighted == pytest.approx(results[name]["success_rate"])
    # the same deterministic policy on the same seeds, whichever way it is loaded
    assert results["rllib"] == results["pretrained"]


@pytest.mark.slow
def test_eval_writes_video(tmp_path):
    from vla_ray.config import VLAConfig
    from vla_ray.models.vla import VLA

    d = VLA(VLAConfig()).save_pretrained(tmp_path / "vla")
    video = tmp_path / "ep.mp4"
    code = main(
        [
            "eval",
            "--checkpoint",
            str(d),
            "--env",
            "vla_ray/LangReach-v0",
            "--episodes",
            "1",
            "--video",
            str(video),
        ]
    )
    assert code == 0 and video.stat().st_size > 1000


def test_eval_bad_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--checkpoint", str(tmp_path / "empty")]) == 2
    assert "neither an RLlib checkpoint" in capsys.readouterr().err


def _no_training(monkeypatch):
    """Starting Ray means the run directory was accepted: fail fast instead of training."""

    def refuse(*args, **kwargs):
        raise AssertionError("the run directory was accepted and Ray was started")

    monkeypatch.setattr("vla_ray.train.init_ray", refuse)


def test_train_resume_without_checkpoint_is_a_named_error(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    base = ["train", "--preset", "langreach-ppo", "--local", "--quiet", "--stop-iters", "1"]
    assert main([*base, "--output", str(tmp_path / "new"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: no checkpoint to resume from" in err and "--resume-if-exists" in err
    from vla_ray.train import ResumeError, resolve, train

    with pytest.raises(ResumeError, match="checkpoints/last"):
        train(resolve("langreach-ppo"), tmp_path / "new", stop_iters=1, resume=True)
    # --resume-if-exists without a checkpoint starts fresh (here: reaches init_ray)
    with pytest.raises(AssertionError, match="Ray was started"):
        main([*base, "--output", str(tmp_path / "new"), "--resume-if-exists"])


def test_train_refuses_a_used_output_without_resume(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"iteration": 1}\n')
    base = ["train", "--preset", "langreach-ppo", "--local", "--quiet", "--stop-iters", "1"]
    assert main([*base, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--resume" in err and "another --output" in err
    from vla_ray.fsutil import OutputExistsError
    from vla_ray.train import resolve, train

    with pytest.raises(OutputExistsError, match="metrics.jsonl"):
        train(resolve("langreach-ppo"), out, stop_iters=1)
    assert (out / "metrics.jsonl").read_text() == '{"iteration": 1}\n'


def test_quickstart_refuses_a_used_output(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    (tmp_path / "qs").mkdir()
    (tmp_path / "qs" / "eval.json").write_text("{}")
    assert main(["quickstart", "--output", str(tmp_path / "qs"), "--quiet"]) == 2
    assert "qs already exists and is not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_continues_from_last_checkpoint(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    base = [
        "train",
        "--preset",
        "langreach-ppo",
        "--local",
        "--output",
        str(out),
        "--quiet",
        *SMALL,
    ]
    assert main([*base, "--stop-iters", "1", "--wandb", "vla-ray-test"]) == 0
    # `vla-ray train --wandb` logs the run through the W&B API (offline: files in the run dir)
    assert len(list((out / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    assert main([*base, "--stop-iters", "2", "--resume"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[1]["env_steps"] > rows[0]["env_steps"]  # env-step counter restored, not reset
    meta = json.loads((out / "checkpoints" / "last" / "vla_ray_meta.json").read_text())
    assert meta["iteration"] == 2
    # a crash after iteration 3's row, in the middle of saving its checkpoint: the row is in
    # metrics.jsonl, the old `last` was moved aside and the new one is half-written
    ckpt = out / "checkpoints"
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"iteration": 3, "env_steps": -1}) + "\n")
    (ckpt / "last").rename(ckpt / ".last.old-1-dead")
    (ckpt / ".last.tmp-1-dead").mkdir()
    assert main([*base, "--stop-iters", "3", "--resume"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]  # iteration 3 once, the resumed one
    assert rows[2]["env_steps"] > rows[1]["env_steps"]
    meta = json.loads((ckpt / "last" / "vla_ray_meta.json").read_text())
    assert meta["iteration"] == 3
    assert not [p.name for p in ckpt.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_quickstart_runs_demos_bc_then_ppo_from_the_bc_policy(ray_session, tmp_path):
    out = tmp_path / "qs"
    args = ["quickstart", "--rl", "ppo", "--minutes", "0.05", "--demos", "3"]
    args += ["--bc-minutes", "0.02", "--no-serve"]
    assert main([*args, "--episodes", "2", "--output", str(out), "--quiet"]) == 0
    bc_rows = (out / "bc" / "metrics.jsonl").read_text().splitlines()
    assert bc_rows and json.loads(bc_rows[-1])["iteration"] >= 1
    assert json.loads((out / "bc" / "config.json").read_text())["episodes"] == 3
    ppo_config = json.loads((out / "ppo" / "config.json").read_text())
    # PPO continues the cloned VLA (langreach-ppo's architecture, saved with save_pretrained)
    assert ppo_config["model"]["pretrained_path"] == str(out / "bc" / "vla")
    ppo_rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert ppo_rows
    assert (out / "report.html").is_file()  # the quickstart ends with its report
    result = json.loads((out / "eval.json").read_text())
    assert result["episodes"] == 2 and 0.0 <= result["success_rate"] <= 1.0


def test_an_int_setting_of_a_float_training_key_is_a_float_in_the_config():
    """``--set training.kl_coeff=0`` parses as the int 0; PPO's adaptive KL update then failed
    after the first iteration ("result type Float can't be cast to ... Int")."""
    from vla_ray.run_spec import parse_overrides
    from vla_ray.train import build_algorithm_config, resolve

    overrides = parse_overrides(["training.kl_coeff=0", "training.num_epochs=2"])
    assert overrides["training"]["kl_coeff"] == 0 and isinstance(
        overrides["training"]["kl_coeff"], int
    )
    cfg = build_algorithm_config(resolve("langreach-state-ppo", overrides, local=True))
    assert isinstance(cfg.kl_coeff, float) and cfg.kl_coeff == 0.0
    assert isinstance(cfg.num_epochs, int) and cfg.num_epochs == 2  # ints stay ints
