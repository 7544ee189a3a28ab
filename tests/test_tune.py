"""`vla-ray tune`: YAML schema errors, the shipped configs, a 2-trial search with W&B offline."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from vla_ray.cli import main
from vla_ray.tuning import (
    TuneConfigError,
    build_tuner,
    check_available,
    load_tune_config,
    make_scheduler,
    make_search_alg,
    param_space,
    validate_tune_config,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "tune_configs").glob("*.yaml"))

SMOKE = ROOT / "tune_configs" / "smoke_langreach.yaml"  # 2 trials x 1 tiny iteration
TINY = yaml.safe_load(SMOKE.read_text())


def _errors(raw: object) -> str:
    with pytest.raises(TuneConfigError) as info:
        validate_tune_config(raw, "x.yaml")
    return str(info.value)


def test_shipped_configs_pass_the_schema():
    names = {p.name for p in CONFIGS}
    assert {
        "ppo_langreach.yaml",
        "sac_halfcheetah.yaml",
        "iql_hopper.yaml",
        "grpo_langreach.yaml",
    } <= names
    for path in CONFIGS:
        spec = load_tune_config(path)
        assert spec.search_space, path


def test_configs_for_missing_algorithms_fail_naming_what_is_missing(capsys):
    expected = {
        # the dataset is the user's to collect (`vla-ray collect`)
        "iql_hopper.yaml": "offline data .*datasets/hopper-medium-replay does not exist",
    }
    for name, missing in expected.items():
        with pytest.raises(ValueError, match=f"cannot run in this build; missing: {missing}"):
            check_available(load_tune_config(ROOT / "tune_configs" / name))
        # the CLI stops before starting anything, exit code 2
        assert main(["tune", str(ROOT / "tune_configs" / name), "--output", "/nonexistent"]) == 2
        assert re.search(missing, capsys.readouterr().err)
    for name in ("ppo_langreach.yaml", "grpo_langreach.yaml", "sac_halfcheetah.yaml"):
        check_available(load_tune_config(ROOT / "tune_configs" / name))


def test_schema_errors_name_every_bad_key_together():
    raw = copy.deepcopy(TINY)
    raw["serach_space"] = {}  # typo'd top-level key
    raw["mode"] = "maximum"
    raw["num_samples"] = 0
    raw["search_space"] = {
        "training.lr": {"loguniform": [0.0, 1.0e-3]},  # log of 0
        "training.gamma": {"uniform": [0.99, 0.9]},  # low > high
        "training.num_epochs": {"randint": [1.5, 4]},
        "training.minibatch": {"choice": [64]},  # not a PPO training key
        "model.head": {"chioce": ["gaussian"]},  # unknown primitive
        "env.num_target": {"choice": [1, 2]},  # not a LangReach kwarg
        "trainig.lr": {"choice": [1]},  # unknown section
    }
    raw["scheduler"] = {"type": "asha", "grace_period": 10, "max_t": 5, "eta": 3}
    msg = _errors(raw)
    for needle in (
        "serach_space: unknown key",
        "mode: expected max or min, got 'maximum'",
        "num_samples: expected a positive integer, got 0",
        "search_space.training.lr: loguniform needs 0 < low < high, got [0.0, 0.001]",
        "search_space.training.gamma: uniform needs low < high, got [0.99, 0.9]",
        "search_space.training.num_epochs: randint needs integer bounds",
        "search_space.training.minibatch: training takes no key 'minibatch'",
        "search_space.model.head: unknown primitive 'chioce'; valid primitives are choice,",
        "search_space.env.num_target: env takes no key 'num_target'",
        "search_space.trainig.lr: unknown key 'trainig.lr'",
        "scheduler.eta: unknown key; valid keys are grace_period, max_t,",
        "scheduler: grace_period (10) must be <= max_t (5)",
    ):
        assert needle in msg, f"{needle!r} not in:\n{msg}"


def test_schema_errors_for_structure_and_search_combinations():
    assert "give either a preset or algorithm + env" in _errors({**TINY, "algorithm": "ppo"})
    no_base = {k: v for k, v in TINY.items() if k != "preset"}
    assert "preset: missing" in _errors(no_base)
    grid = copy.deepcopy(TINY)
    grid["search_space"]["env.instruction_mode"] = {"grid_search": ["text", "blind"]}
    grid["search_alg"] = {"type": "optuna"}
    assert "optuna cannot search grid_search keys (env.instruction_mode)" in _errors(grid)
    assert "unknown name 'hyperband'" in _errors({**TINY, "scheduler": {"type": "hyperband"}})
    pbt = {**TINY, "scheduler": {"type": "pbt", "perturbation_interval": 0}}
    msg = _errors(pbt)
    assert "perturbation_interval: expected a positive integer, got 0" in msg
    assert "PBT needs a mapping" in msg
    assert "resources.num_env_runners: expected an integer >= 0, got -1" in _errors(
        {**TINY, "resources": {"num_env_runners": -1}}
    )
    assert "metric: unknown name 'reward'" in _errors({**TINY, "metric": "reward"})
    assert "stop.minutes: unknown key" in _errors({**TINY, "stop": {"minutes": 3}})
    assert "preset: expected a string, got ['a']" in _errors({**TINY, "preset": ["a"]})
    assert "expected a mapping of settings" in _errors([1, 2])


def test_cli_reports_schema_errors_before_starting(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "search_space": {"training.lr": {"logunif": [1, 2]}}}))
    assert main(["tune", str(bad), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "invalid tune config" in err and "unknown primitive 'logunif'" in err
    assert not (tmp_path / "out").exists()  # nothing started


def test_tuners_build_for_asha_optuna_and_pbt(tmp_path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
    from ray.tune.search.optuna import OptunaSearch

    spec = load_tune_config(ROOT / "tune_configs" / "ppo_langreach.yaml")
    assert isinstance(make_scheduler(spec), ASHAScheduler)
    assert isinstance(make_search_alg(spec), OptunaSearch)
    assert isinstance(build_tuner(spec, tmp_path / "a"), tune.Tuner)
    # the trial is the algorithm's RLlib Algorithm itself (a Tune Trainable), not a wrapper
    from ray.rllib.algorithms.ppo import PPO

    from vla_ray.tuning import VLATrialMixin, trainable_class

    trainable = trainable_class(spec)
    assert issubclass(trainable, PPO) and issubclass(trainable, VLATrialMixin)
    assert issubclass(trainable, tune.Trainable) and trainable.__name__ == "VLATrainable"
    space = param_space(spec)
    assert space["base"] == {"preset": "langreach-ppo"}
    assert isinstance(space["overrides"]["training"]["lr"], tune.search.sample.Float)
    assert space["overrides"]["env_runners"]["num_env_runners"] == 2  # resources section
    assert space["overrides"]["env_runners"]["num_envs_per_env_runner"] == 8  # set section

    raw = yaml.safe_load((ROOT / "tune_configs" / "grpo_langreach.yaml").read_text())
    raw["algorithm"] = "ppo"  # the same PBT search with an algorithm this build has
    spec = validate_tune_config(raw, "pbt.yaml")
    pbt = make_scheduler(spec)
    assert isinstance(pbt, PopulationBasedTraining)
    assert set(pbt._hyperparam_mutations["overrides"]["training"]) == {
        "lr",
        "kl_coeff",
        "clip_param",
    }
    assert make_search_alg(spec) is None  # Tune's random/grid variant generator
    assert isinstance(build_tuner(spec, tmp_path / "b"), tune.Tuner)


@pytest.mark.slow
def test_two_trial_search_reports_best_trial_with_wandb_offline(
    ray_session, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = SMOKE
    out = tmp_path / "search"
    code = main(["tune", str(config), "--output", str(out), "--quiet", "--wandb", "vla-ray-test"])
    printed = capsys.readouterr().out
    assert code == 0
    # Ray's and the trials' lines went to the search's log, Tune's tables to the console
    assert "VLATrainable pid=" in (out / "ray.log").read_text()
    assert "VLATrainable pid=" not in printed

    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["trials"]) == 2
    assert {t["status"] for t in summary["trials"]} == {"TERMINATED"}
    assert all(t["iterations"] == 1 for t in summary["trials"])
    lrs = [t["params"]["training.lr"] for t in summary["trials"]]
    assert len(set(lrs)) == 2 and all(1e-4 <= lr <= 1e-3 for lr in lrs)
    best = max(summary["trials"], key=lambda t: t["best"])
    assert summary["best_trial"] == best["trial"]
    assert summary["best_value"] == best["best"]
    # the table and the overall best are printed
    assert "training.lr" in printed and f"*{summary['best_trial']}" in printed
    assert f"best trial: {summary['best_trial']}" in printed
    # the comparison of the trials: the table and one plot in the experiment directory
    comparison = (out / "comparison.md").read_text()
    assert f"*{summary['best_trial']}" in comparison and "training.lr" in comparison
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"

    for trial in summary["trials"]:
        d = Path(trial["path"])
        cfg = json.loads((d / "config.json").read_text())  # the fully resolved settings
        assert (
            cfg["preset"] == "langreach-ppo"
            and cfg["training"]["lr"] == trial["params"]["training.lr"]
        )
        assert cfg["training"]["gamma"] == 0.9  # from the preset
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in rows] == [1] and rows[0]["env_steps"] >= 128
        for link in ("best", "last"):
            ckpt = d / "checkpoints" / link
            assert (ckpt / "vla" / "model.safetensors").is_file()
            assert (ckpt / "vla_ray_meta.json").is_file()
        # W&B offline run files, one run per trial
        runs = list((d / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1 and runs[0].stat().st_size > 0

    # --resume on a finished search restores it and reports the same best trial
    assert main(["tune", str(config), "--output", str(out), "--quiet", "--resume"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["best_trial"] == summary["best_trial"]
    assert all(t["iterations"] == 1 for t in again["trials"])
    capsys.readouterr()
    # a fresh search refuses to overwrite it
    assert main(["tune", str(config), "--output", str(out), "--quiet"]) == 2
    assert "is not empty; use --resume" in capsys.readouterr().err


def test_a_trial_bigger_than_the_cluster_is_refused_at_the_start(tmp_path, capsys, monkeypatch):
    """The README's search on a 2-CPU machine: each trial asks 3 CPUs (learner + 2 EnvRunners);
    the CLI says so before any trial is queued, and its flags make the trial fit."""
    import vla_ray.train
    import vla_ray.tuning as tuning

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(vla_ray.train, "init_ray", lambda num_cpus=None: None)
    monkeypatch.setattr(tuning, "cluster_resources", lambda: {"CPU": 2.0, "memory": 1e9})
    config = str(ROOT / "tune_configs" / "ppo_langreach.yaml")
    argv = ["tune", config, "--num-samples", "2", "--stop-iters", "1"]
    assert main([*argv, "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "one trial needs 3 CPUs and 0 GPUs (1 CPU for the driver/learner + 2 EnvRunner(s)" in err
    assert "this Ray cluster has 2 CPUs, 0 GPUs" in err
    assert "--num-env-runners 1 or --cpus-per-trial 2" in err

    def started(*args, **kwargs):
        raise RuntimeError("the search would start now")

    monkeypatch.setattr(tuning, "build_tuner", started)
    for flags in (["--num-env-runners", "1"], ["--cpus-per-trial", "2"]):
        with pytest.raises(RuntimeError, match="would start now"):  # the check passed
            main([*argv, *flags, "--output", str(tmp_path / flags[0].strip("-"))])
    spec = tuning.apply_resource_flags(load_tune_config(config), cpus_per_trial=4)
    assert spec.resources["num_env_runners"] == 3
    assert tuning.trial_resources(spec) == {"CPU": 4.0}
    spec = tuning.apply_resource_flags(load_tune_config(config), num_gpus_per_learner=1)
    with pytest.raises(ValueError, match="0 GPUs: no trial could start.*--num-gpus-per-learner"):
        tuning.check_trial_fits(spec, {"CPU": 8.0})
    with pytest.raises(ValueError, match="--cpus-per-trial: expected at least 1"):
        tuning.apply_resource_flags(load_tune_config(config), cpus_per_trial=0.5)


def test_a_search_over_a_dataset_leaves_a_cpu_for_ray_data(monkeypatch, tmp_path):
    """Offline trials read with Ray Data outside their reservation: a trial that takes every
    CPU is refused (it hung in its first read), and concurrency is capped to leave one free."""
    import vla_ray.tuning as tuning
    from vla_ray.data.collect import collect

    monkeypatch.chdir(tmp_path)  # iql_hopper.yaml's data path is relative to the working dir
    collect(
        "vla_ray/Hopper-v5",
        "random",
        1,
        tmp_path / "datasets" / "hopper-medium-replay",
        progress=False,
    )
    config = ROOT / "tune_configs" / "iql_hopper.yaml"
    spec = tuning.apply_resource_flags(load_tune_config(config), cpus_per_trial=2)
    with pytest.raises(ValueError) as err:
        tuning.check_trial_fits(spec, {"CPU": 2.0})
    assert "1 CPU must stay free for Ray Data" in str(err.value)
    assert "--num-env-runners 0 or --cpus-per-trial 1" in str(err.value)
    assert tuning.check_trial_fits(spec, {"CPU": 8.0}) == 3  # (8 - 1) // 2 trials at once
    online = load_tune_config(ROOT / "tune_configs" / "ppo_langreach.yaml")
    assert tuning.check_trial_fits(online, {"CPU": 8.0}) is None  # no cap: nothing to read


def test_offline_search_config_takes_validation_metrics_and_hub_datasets():
    """``metric: val_action_mse`` (the held-out episodes' score) and ``data: hf://ORG/NAME``
    pass the checks; the Hub id reaches every trial as it is (resolved by the data reader)."""
    raw = {
        "preset": "langreach-bc",
        "data": "hf://lerobot/pusht",
        "metric": "val_action_mse",
        "mode": "min",
        "set": {"val_fraction": 0.2},
        "search_space": {"training.lr": {"choice": [1e-3, 3e-4]}},
        "checkpoint": {"metric": "val_action_l1", "mode": "min"},
    }
    spec = validate_tune_config(raw, "bc.yaml")
    check_available(spec)  # a Hub id is not a local path that must exist
    space = param_space(spec)
    assert space["overrides"]["data"] == "hf://lerobot/pusht"
    assert space["overrides"]["val_fraction"] == 0.2
    assert "val_action_msee" in _errors({**raw, "metric": "val_action_msee"})


@pytest.mark.slow  # ~15 s: one BC trial iteration over a 3-episode dataset
def test_an_offline_trial_reports_validation_metrics(ray_session, tmp_path):
    """A BC trial with ``val_fraction`` scores the held-out episodes at its first iteration, as
    ``vla-ray train`` does, and reports them at the top level of its result (for ``metric:``)."""
    from vla_ray.data.collect import collect
    from vla_ray.tuning import trainable_class

    data = tmp_path / "demos"
    collect("vla_ray/LangReach-v0", "expert", 3, data, seed=0, progress=False)
    raw = {
        "preset": "langreach-bc",
        "data": str(data),
        "metric": "val_action_mse",
        "mode": "min",
        "set": {
            "val_fraction": 0.34,
            "training.train_batch_size_per_learner": 16,
            "eval_every": 100,
            "env_runners.num_envs_per_env_runner": 1,
        },
        "search_space": {"training.lr": {"choice": [1e-3]}},
    }
    spec = validate_tune_config(raw, "bc.yaml")
    space = param_space(spec)
    sample = copy.deepcopy(space)
    sample["overrides"]["training"]["lr"] = 1e-3  # what Tune's grid/choice would pick
    trial = trainable_class(spec)(config=sample)
    try:
        result = trial.train()
        second = trial.train()
    finally:
        trial.stop()
    assert result["training_iteration"] == 1 and second["training_iteration"] == 2
    assert 0 < result["val_action_mse"] < 10 and 0 < result["val_action_l1"] < 10
    assert second["val_action_mse"] == result["val_action_mse"]  # carried until the next score
