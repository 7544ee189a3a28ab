"""Quickstart's last stage (export, start the endpoint, one real request) and its --no-serve flag."""

from __future__ import annotations

import json
import urllib.request

import gymnasium as gym
import numpy as np
import pytest

from vla_ray import cli


def test_serve_stage_answers_a_real_request(ray_session, tiny_vla, tiny_vla_dir, tmp_path, capsys):
    result = cli.quickstart_serve_stage(tiny_vla_dir, tmp_path / "export", progress=False)
    out = capsys.readouterr().out
    assert "endpoint answered: action" in out and "vla-ray serve --model" in out
    assert (tmp_path / "export" / "onnx" / "model.onnx").is_file()
    answer = result["answer"]
    assert answer["backend"] == "onnx" and len(answer["action"]) == 2
    # the request was the env's real first observation (seed 123): same action as the module
    env = gym.make("vla_ray/LangReach-v0")
    obs, info = env.reset(seed=123)
    env.close()
    assert result["instruction"] == info["instruction"]
    want = np.clip(tiny_vla.act(obs["image"], info["instruction"], obs["state"]), -1, 1)
    np.testing.assert_allclose(answer["actions"], want, atol=1e-4)
    # the endpoint is stopped afterwards
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{result['url']}/v1/health", timeout=5)


def test_quickstart_runs_the_serve_stage_unless_no_serve(tmp_path, monkeypatch):
    import vla_ray.evaluate
    import vla_ray.train

    calls = []
    ckpt = str(tmp_path / "run" / "checkpoints" / "best")
    monkeypatch.setattr(
        vla_ray.train, "train", lambda *a, **k: {"best_checkpoint": ckpt, "last_checkpoint": "x"}
    )
    monkeypatch.setattr(vla_ray.evaluate, "load_policy", lambda path: path)
    result = dict(env="e", episodes=1, success_rate=0.0, mean_return=0.0, mean_length=1.0)
    monkeypatch.setattr(vla_ray.evaluate, "evaluate", lambda *a, **k: result)
    monkeypatch.setattr(cli, "quickstart_serve_stage", lambda *a, **k: calls.append(a))

    def quickstart(output, *flags):  # each run gets a new output (a used one is refused)
        output.mkdir()  # empty: train is mocked and writes nothing there
        argv = ["quickstart", "--rl", "ppo", "--minutes", "0.1", "--demos", "0"]
        argv += ["--output", str(output)]
        return cli.main([*argv, "--quiet", *flags])

    assert quickstart(tmp_path / "run", "--no-serve") == 0
    assert calls == []
    assert json.loads((tmp_path / "run" / "eval.json").read_text()) == result
    assert quickstart(tmp_path / "run2") == 0
    assert calls == [(ckpt, tmp_path / "run2" / "export")]
