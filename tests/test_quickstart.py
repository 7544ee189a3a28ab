"""The quickstart's recipes: expert demos -> BC -> PPO (the default) or demos -> DAgger with the
keypoint-reconstruction loss; seeded, evaluated on held-out episodes; it ends with the run
directory."""

import json

import pytest

from vla_ray import cli

RESULT = dict(env="e", episodes=100, success_rate=0.9, mean_return=1.0, mean_length=9.0)


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """The quickstart with collection, training and evaluation replaced by recorders."""
    import vla_ray.data
    import vla_ray.evaluate
    import vla_ray.train

    calls: dict = {"train": []}

    def fake_collect(env_id, policy, episodes, output, **kwargs):
        calls["collect"] = dict(policy=policy, episodes=episodes, output=output, **kwargs)

    def fake_train(spec, output, **kwargs):
        calls["train"].append((spec, output, kwargs))
        ckpt = output / "checkpoints"
        return {"last_checkpoint": str(ckpt / "last"), "best_checkpoint": str(ckpt / "best")}

    def fake_evaluate(policy, **kwargs):
        calls["evaluate"] = dict(policy=policy, **kwargs)
        return RESULT

    monkeypatch.setattr(vla_ray.data, "collect", fake_collect)
    monkeypatch.setattr(vla_ray.train, "train", fake_train)
    monkeypatch.setattr(vla_ray.evaluate, "load_policy", lambda path: path)
    monkeypatch.setattr(vla_ray.evaluate, "evaluate", fake_evaluate)
    return calls


def test_quickstart_dagger_is_seeded_by_the_demos_with_the_reconstruction_loss(
    recorded, tmp_path, capsys
):
    out = tmp_path / "qs"
    argv = ["quickstart", "--rl", "dagger", "--seed", "3", "--no-serve", "--quiet"]
    argv += ["--output", str(out)]
    assert cli.main(argv) == 0
    assert recorded["collect"]["policy"] == "expert" and recorded["collect"]["episodes"] == 300
    # demo seeds differ per --seed and stay below the held-out evaluation seeds (100_000 + i)
    assert recorded["collect"]["seed"] == 3 * cli.QUICKSTART_DEMO_SEED
    assert recorded["collect"]["seed"] + 300 < 100_000
    [(spec, output, kwargs)] = recorded["train"]  # no BC stage: the demos seed DAgger
    assert spec.preset == "langreach-dagger" and output == out / "dagger"
    assert spec.settings["data"] == str(out / "demos")
    assert spec.settings["seed"] == 3
    assert spec.settings["model"]["vision_config"]["recon_coeff"] > 0
    assert spec.settings["training"]["beta"] == 0.0  # the policy acts from the first rollout
    assert kwargs["stop_seconds"] == 8.0 * 60
    # DAgger's last policy (its "best" row can be an early lucky rollout), 100 held-out episodes
    assert recorded["evaluate"]["policy"] == str(out / "dagger" / "checkpoints" / "last")
    assert recorded["evaluate"]["episodes"] == 100
    assert json.loads((out / "eval.json").read_text()) == RESULT
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].endswith(f"run directory: {out}")


def test_quickstart_dagger_without_demos_keeps_the_expert_schedule(recorded, tmp_path):
    out = tmp_path / "qs"
    argv = ["quickstart", "--rl", "dagger", "--demos", "0", "--no-serve", "--quiet"]
    assert cli.main([*argv, "--output", str(out)]) == 0
    assert "collect" not in recorded
    [(spec, _, _)] = recorded["train"]
    assert spec.settings.get("data") is None
    assert spec.settings["training"]["beta"] == 1.0  # the preset's: the expert acts first
    assert spec.settings["model"]["vision_config"]["recon_coeff"] > 0


def test_quickstart_default_clones_the_demos_then_runs_ppo(recorded, tmp_path):
    out = tmp_path / "qs"
    argv = ["quickstart", "--no-serve", "--quiet", "--output", str(out)]
    assert cli.main([*argv, "--bc-iters", "7"]) == 0
    (bc, bc_out, bc_kwargs), (ppo, ppo_out, _) = recorded["train"]
    assert bc.preset == "langreach-bc" and bc_out == out / "bc" and bc_kwargs["stop_iters"] == 7
    assert ppo.preset == "langreach-ppo" and ppo_out == out / "ppo"
    bc_best = out / "bc" / "checkpoints" / "best"
    assert ppo.settings["model"]["pretrained_path"] == str(bc_best / "vla")
    # the BC learner trains the PPO preset's keypoint-reconstruction decoder too
    assert bc.settings["model"]["vision_config"]["recon_coeff"] > 0
    assert recorded["evaluate"]["policy"] == str(out / "ppo" / "checkpoints" / "best")


def test_quickstart_ends_with_the_report(recorded, tmp_path, monkeypatch, capsys):
    """The last stage writes `vla-ray report` of the run directory and prints its path."""
    pytest.importorskip("matplotlib")
    import vla_ray.train

    def fake_train(spec, output, **kwargs):  # a run directory as training leaves it
        output.mkdir(parents=True)
        (output / "config.json").write_text(json.dumps({"preset": spec.preset}))
        row = {"iteration": 1, "env_steps": 64, "episode_return_mean": 1.0, "success_rate": 0.5}
        (output / "metrics.jsonl").write_text(json.dumps(row) + "\n")
        ckpt = output / "checkpoints"
        return {"last_checkpoint": str(ckpt / "last"), "best_checkpoint": str(ckpt / "best")}

    monkeypatch.setattr(vla_ray.train, "train", fake_train)
    out = tmp_path / "qs"
    argv = ["quickstart", "--rl", "dagger", "--demos", "0", "--no-serve", "--quiet"]
    assert cli.main([*argv, "--output", str(out)]) == 0
    html = out / "report.html"
    assert html.is_file() and "success rate" in (out / "report.md").read_text()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith(f"report: {html} ")
    assert lines[-1].endswith(f"run directory: {out}")


def test_quickstart_says_why_there_is_no_report(recorded, tmp_path, capsys):
    out = tmp_path / "qs"  # the recorders write no metrics: nothing to draw
    argv = ["quickstart", "--rl", "dagger", "--demos", "0", "--no-serve", "--quiet"]
    assert cli.main([*argv, "--output", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("report: not written (run_dir:") and "metrics.jsonl" in lines[-2]
