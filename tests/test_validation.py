"""Held-out validation (``--val-fraction``) and dataset action metrics (``eval --data``): the
seeded episode split and the MSE / L1 / chunk ADE-FDE / token accuracy values, without Ray."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium import spaces
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from vla_ray.data import DataError, read_episodes, write_episodes
from vla_ray.data.validation import action_metrics, split_files, token_bins

OBS = spaces.Box(-10, 10, (3,), np.float32)
ACT = spaces.Box(-1, 1, (2,), np.float32)


def episode(i: int, T: int = 4) -> SingleAgentEpisode:
    obs = [np.full(3, i * 10 + t, np.float32) for t in range(T + 1)]
    acts = [np.array([t, -t], np.float32) * 0.1 for t in range(T)]
    ep = SingleAgentEpisode(
        id_=f"ep{i}",
        observations=obs,
        actions=acts,
        rewards=[0.0] * T,
        terminated=True,
        observation_space=OBS,
        action_space=ACT,
        len_lookback_buffer=0,
    )
    return ep.to_numpy()


def test_split_is_seeded_disjoint_and_cached(tmp_path):
    src = write_episodes([episode(i) for i in range(10)], tmp_path / "ds")
    files = [str(f) for f in sorted(src.glob("*.parquet"))]
    train, val = split_files(files, 0.3, seed=1, cache=tmp_path / "cache")
    ids_t = {e.id_ for f in train for e in read_episodes(f)}
    ids_v = {e.id_ for f in val for e in read_episodes(f)}
    assert len(ids_v) == 3 and len(ids_t) == 7 and not ids_t & ids_v
    assert split_files(files, 0.3, seed=1, cache=tmp_path / "cache") == (train, val)  # reused
    _, val2 = split_files(files, 0.3, seed=2, cache=tmp_path / "cache")
    other = {e.id_ for f in val2 for e in read_episodes(f)}
    assert val2 != val and len(other) == 3
    with pytest.raises(ValueError, match=r"val_fraction: expected a number in \(0, 1\), got 1.5"):
        split_files(files, 1.5, seed=1, cache=tmp_path / "cache")
    one = write_episodes([episode(0)], tmp_path / "one")
    with pytest.raises(DataError, match=r"1 episode\(s\); a validation split needs at least 2"):
        split_files([str(f) for f in one.glob("*.parquet")], 0.5, seed=0, cache=tmp_path / "c")


def test_action_metrics_values():
    eps = [episode(0), episode(1, T=3)]

    def zero(obs):  # predicts 0: the error is the dataset's action itself
        return np.zeros((len(obs), 2))

    got = action_metrics(zero, eps)
    acts = np.concatenate([np.asarray(e.get_actions(), np.float64) for e in eps])
    np.testing.assert_allclose(got["val_action_mse_per_dim"], (acts**2).mean(0), atol=1e-6)
    np.testing.assert_allclose(got["val_action_l1_per_dim"], np.abs(acts).mean(0), atol=1e-6)
    assert got["val_steps"] == 7 and "val_chunk_ade" not in got
    assert got["val_action_mse"] == pytest.approx(float((acts**2).mean()), abs=1e-6)

    def chunk(obs):  # a chunk of 2: step t's true action, then t's action again (error at +1)
        t = np.asarray(obs)[:, 0] % 10
        a = np.stack([t, -t], axis=1) * 0.1
        return np.concatenate([a, a], axis=1)

    got = action_metrics(chunk, [episode(0)])
    assert got["val_action_mse"] == pytest.approx(0.0, abs=1e-12)
    # steps 0..2: second action off by (0.1, -0.1) -> L2 0.1414; step 3: only its own target
    d = np.hypot(0.1, 0.1)
    assert got["val_chunk_fde"] == pytest.approx((3 * d + 0.0) / 4, rel=1e-5)
    assert got["val_chunk_ade"] == pytest.approx((3 * d / 2 + 0.0) / 4, rel=1e-5)

    with pytest.raises(DataError, match=r"the policy gives 3 action values per step, the datas"):
        action_metrics(lambda o: np.zeros((len(o), 3)), eps)


def test_token_accuracy_of_a_token_head():
    from types import SimpleNamespace

    from vla_ray.models.heads import GaussianHead, TransformerHead

    head = TransformerHead(8, 2, 2, -1.0, 1.0)
    tokenize = token_bins(SimpleNamespace(head=head))
    assert tokenize(np.array([[-1.0, 1.0], [0.0, 0.004]])).tolist() == [[0, 255], [128, 128]]
    assert token_bins(SimpleNamespace(head=GaussianHead(8, 2, 1, -1.0, 1.0))) is None

    def chunk(obs):  # step t's true action, then t's again (the wrong bin for step t + 1)
        t = np.asarray(obs)[:, 0] % 10
        a = np.stack([t, -t], axis=1) * 0.1
        return np.concatenate([a, a], axis=1)

    got = action_metrics(chunk, [episode(0)], tokenize=tokenize)
    # steps 0..2: 2 of 4 tokens right (the first action's); step 3: 2 of 2 (no step 4)
    assert got["val_token_accuracy"] == pytest.approx(8 / 14)
    assert "val_token_accuracy" not in action_metrics(chunk, [episode(0)])


def test_val_fraction_setting():
    from vla_ray.train import resolve

    spec = resolve("langreach-bc", {"val_fraction": 0.2}, data="some/data")
    assert spec.settings["val_fraction"] == 0.2
    assert resolve("langreach-bc", {}, data="some/data").settings["val_fraction"] == 0.0
    with pytest.raises(ValueError, match=r"--val-fraction: ppo is not an offline algorithm"):
        resolve("langreach-ppo", {"val_fraction": 0.2})


def test_eval_on_data_cli(tmp_path, monkeypatch, capsys):
    """``vla-ray eval --data``: the checkpoint's actions against a dataset's, no env stepped."""
    import json

    import vla_ray.evaluate as evaluate
    from vla_ray.cli import main
    from vla_ray.evaluate import Policy

    data = write_episodes([episode(i) for i in range(3)], tmp_path / "ds")
    policy = Policy(lambda o: np.zeros((len(o), 2)), {"env": "vla_ray/LangReach-v0"}, "test")
    monkeypatch.setattr(evaluate, "load_policy", lambda path, **options: policy)
    out = tmp_path / "val.json"
    assert main(["eval", "--checkpoint", "ckpt", "--data", str(data), "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    acts = np.concatenate([np.asarray(episode(i).get_actions()) for i in range(3)])
    assert got["episodes"] == 3 and got["val_steps"] == 12
    assert got["val_action_mse"] == pytest.approx(float((acts.astype(float) ** 2).mean()))
    assert "3 episodes, 12 steps of" in capsys.readouterr().out
