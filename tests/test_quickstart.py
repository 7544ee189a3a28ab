"""The quickstart's recipes: expert demos -> BC -> PPO (the default) or demos -> DAgger with the
keypoint-reconstruction loss; seeded, evaluated on held-out episodes; it ends with the run
directory."""

import json

import pytest
import torch

from vla_ray import cli
from vla_ray.presets import get_preset

RESULT = dict(env="e", episodes=100, success_rate=0.9, mean_return=1.0, mean_length=9.0)


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """The quickstart with cloning, training and evaluation replaced by recorders."""
    import vla_ray.clone
    import vla_ray.evaluate
    import vla_ray.train

    calls: dict = {"train": []}

    def fake_clone_run(output, model_config, env_id, **kwargs):
        calls["clone"] = dict(output=output, model=model_config, env=env_id, **kwargs)
        calls["clone_threads"] = torch.get_num_threads()
        return output / "vla"

    def fake_train(spec, output, **kwargs):
        calls["train"].append((spec, output, kwargs))
        ckpt = output / "checkpoints"
        return {"last_checkpoint": str(ckpt / "last"), "best_checkpoint": str(ckpt / "best")}

    def fake_evaluate(policy, **kwargs):
        calls["evaluate"] = dict(policy=policy, **kwargs)
        return RESULT

    monkeypatch.setattr(vla_ray.clone, "clone_run", fake_clone_run)
    monkeypatch.setattr(vla_ray.train, "train", fake_train)
    monkeypatch.setattr(vla_ray.evaluate, "load_policy", lambda path: path)
    monkeypatch.setattr(vla_ray.evaluate, "evaluate", fake_evaluate)
    return calls


def test_quickstart_default_clones_the_expert_and_evaluates_the_clone(recorded, tmp_path, capsys):
    out = tmp_path / "qs"
    argv = ["quickstart", "--seed", "3", "--no-serve", "--quiet", "--output", str(out)]
    session_threads = torch.get_num_threads()  # 1 under the test suite (conftest)
    torch.set_num_threads(2)  # the torch default on a 2-core machine
    try:
        assert cli.main(argv) == 0
        # one torch thread while cloning (a second one waits on the first beside other work),
        # then the caller's setting back
        assert recorded["clone_threads"] == cli.QUICKSTART_TORCH_THREADS == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(session_threads)
    clone = recorded["clone"]
    assert clone["output"] == out / "bc" and clone["env"] == "vla_ray/LangReach-v0"
    assert clone["episodes"] == cli.QUICKSTART_DEMOS and clone["noise"] == cli.QUICKSTART_NOISE
    assert clone["seconds"] == cli.QUICKSTART_CLONE_MINUTES * 60
    assert clone["seed"] == 3
    # expert episodes differ per --seed and stay below the held-out evaluation seeds (100_000 + i)
    assert clone["frames_seed"] == 3 * cli.QUICKSTART_DEMO_SEED
    assert clone["frames_seed"] + cli.QUICKSTART_DEMOS < 100_000
    # langreach-ppo's VLA (keypoints, Gaussian head; RL can continue it) without the
    # reconstruction decoder (a second CNN pass per update)
    ppo_model = get_preset("langreach-ppo").model
    assert clone["model"] == dict(ppo_model, vision_config={"tokens": "keypoints"})
    assert recorded["train"] == []  # the default: the cloned policy is the result
    assert recorded["evaluate"]["policy"] == str(out / "bc" / "vla")
    assert recorded["evaluate"]["episodes"] == 100
    assert json.loads((out / "eval.json").read_text()) == RESULT
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].endswith(f"run directory: {out}")


def test_quickstart_flags_set_the_cloning_recipe(recorded, tmp_path):
    out = tmp_path / "qs"
    argv = ["quickstart", "--demos", "7", "--noise", "0.1", "--bc-minutes", "0.5"]
    assert cli.main([*argv, "--no-serve", "--quiet", "--output", str(out)]) == 0
    clone = recorded["clone"]
    assert (clone["episodes"], clone["noise"], clone["seconds"]) == (7, 0.1, 30.0)


def test_quickstart_rl_none_without_demos_is_refused(recorded, tmp_path, capsys):
    argv = ["quickstart", "--rl", "none", "--demos", "0", "--no-serve", "--quiet"]
    assert cli.main([*argv, "--output", str(tmp_path / "qs")]) != 0
    assert "--rl none" in capsys.readouterr().err and "--demos" not in recorded


def test_quickstart_dagger_continues_the_clone_with_the_reconstruction_loss(recorded, tmp_path):
    out = tmp_path / "qs"
    argv = ["quickstart", "--rl", "dagger", "--minutes", "2", "--no-serve", "--quiet"]
    assert cli.main([*argv, "--output", str(out)]) == 0
    [(spec, output, kwargs)] = recorded["train"]
    assert spec.preset == "langreach-dagger" and output == out / "dagger"
    assert spec.settings["model"]["pretrained_path"] == str(out / "bc" / "vla")
    assert spec.settings["model"]["vision_config"]["recon_coeff"] > 0
    assert spec.settings["training"]["beta"] == 0.0  # the cloned policy acts from the first rollout
    assert kwargs["stop_seconds"] == 2 * 60
    # DAgger's last policy (its "best" row can be an early lucky rollout)
    assert recorded["evaluate"]["policy"] == str(out / "dagger" / "checkpoints" / "last")


def test_quickstart_dagger_without_demos_keeps_the_expert_schedule(recorded, tmp_path):
    out = tmp_path / "qs"
    argv = ["quickstart", "--rl", "dagger", "--demos", "0", "--no-serve", "--quiet"]
    assert cli.main([*argv, "--output", str(out)]) == 0
    assert "clone" not in recorded
    [(spec, _, _)] = recorded["train"]
    assert spec.settings.get("data") is None and "pretrained_path" not in spec.settings["model"]
    assert spec.settings["training"]["beta"] == 1.0  # the preset's: the expert acts first
    assert spec.settings["model"]["vision_config"]["recon_coeff"] > 0


def test_quickstart_ppo_starts_from_the_clone(recorded, tmp_path):
    out = tmp_path / "qs"
    argv = ["quickstart", "--rl", "ppo", "--no-serve", "--quiet", "--output", str(out)]
    assert cli.main(argv) == 0
    [(ppo, ppo_out, _)] = recorded["train"]
    assert ppo.preset == "langreach-ppo" and ppo_out == out / "ppo"
    assert ppo.settings["model"]["pretrained_path"] == str(out / "bc" / "vla")
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
