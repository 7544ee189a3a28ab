"""The Decision Transformer's result is usable: `vla-ray eval` plays the in-training module's
actions, its export (the window graph + the runner that keeps the window) matches the eager
module over an episode, and Serve keeps one context window per session (no Ray needed)."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from vla_ray.checkpoint import META_NAME, MODULE_SUBDIR

HOPPER = "vla_ray/Hopper-v5"
K, TARGET, SCALE = 4, 5.0, 2.0
TINY_DT = dict(
    vision="none",
    head="mlp",
    value="none",
    dt_hidden=32,
    dt_layers=1,
    dt_heads=2,
    dt_dropout=0.0,
    llm_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
)


def _episode_obs(env: gym.Env, seed: int, steps: int) -> tuple[list[dict], list[float]]:
    """Observations and rewards of a zero-action episode (at most ``steps`` steps)."""
    obs, _ = env.reset(seed=seed)
    observations, rewards = [obs], []
    for _ in range(steps - 1):
        obs, reward, terminated, truncated, _ = env.step(np.zeros(env.action_space.shape))
        observations.append(obs)
        rewards.append(float(reward))
        if terminated or truncated:
            break
    return observations, rewards


@pytest.fixture(scope="module")
def dt_checkpoint(tmp_path_factory):
    """A tiny DT trained for a few steps on random windows, saved in the RLlib checkpoint
    layout (the module under MODULE_SUBDIR, the run's meta with its window settings)."""
    from vla_ray.algorithms.dt import DTModule, dt_loss
    from vla_ray.export_dt import random_windows

    env = gym.make(HOPPER)
    torch.manual_seed(0)
    module = DTModule(
        observation_space=env.observation_space,
        action_space=env.action_space,
        model_config=dict(TINY_DT),
    )
    opt = torch.optim.Adam(module.parameters(), 1e-2)
    obs_keys = ("state", "instruction", "instruction_mask")
    for step in range(5):
        w = {k: torch.as_tensor(v) for k, v in random_windows(module, K, 8, seed=step).items()}
        batch = {
            Columns.OBS: {k: w[k] for k in obs_keys},
            **{k: w[k] for k in w if k.startswith("dt_")},
        }
        loss = dt_loss(module._forward_train(batch)[Columns.ACTIONS], w["dt_actions"], w["dt_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    ckpt = tmp_path_factory.mktemp("dt") / "ckpt"
    module.save_to_path(str(ckpt / MODULE_SUBDIR))
    meta = dict(
        env=HOPPER,
        env_config={},
        preset="hopper-dt",
        training=dict(context_length=K, target_return=TARGET, return_scale=SCALE),
    )
    (ckpt / META_NAME).write_text(json.dumps(meta))
    env.close()
    return ckpt, module


@pytest.fixture(scope="module")
def dt_export(dt_checkpoint, tmp_path_factory):
    from vla_ray.export import export

    out = tmp_path_factory.mktemp("dt_export") / "out"
    # torchscript only: torch-export runs the same graph through the same runner and costs ~5 s
    summary = export(dt_checkpoint[0], "torchscript", out, progress=None)
    return out, summary


def test_eval_plays_the_in_training_module_s_actions(dt_checkpoint):
    """`vla-ray eval`'s policy (load_policy) gives, step by step over a seeded episode, the
    actions of the trained module fed by the EnvRunners' DTContext connector."""
    from vla_ray.algorithms.dt import DTContext
    from vla_ray.evaluate import evaluate, load_policy

    ckpt, module = dt_checkpoint
    policy = load_policy(ckpt)
    connector = DTContext(context_length=K, target_return=TARGET, return_scale=SCALE)
    env = gym.make(HOPPER)
    obs, _ = env.reset(seed=3)
    policy.reset()
    episode = SingleAgentEpisode(
        observations=[obs], observation_space=env.observation_space, action_space=env.action_space
    )
    steps = 0
    while steps < 3 * K:
        action = policy({k: np.asarray(v)[None] for k, v in obs.items()})[0]
        batch = connector(rl_module=module, batch={}, episodes=[episode])
        col = {k: next(iter(v.values()))[0] for k, v in batch.items()}
        fed = {k: torch.as_tensor(v)[None] for k, v in col.items() if k != Columns.OBS}
        fed[Columns.OBS] = {k: torch.as_tensor(v)[None] for k, v in col[Columns.OBS].items()}
        with torch.no_grad():
            expected = module.forward_inference(fed)[Columns.ACTIONS][0].numpy()
        np.testing.assert_allclose(action, expected, atol=1e-6)
        obs, reward, terminated, truncated, _ = env.step(action)
        policy.observe(reward)
        episode.add_env_step(obs, action, reward, terminated=terminated, truncated=truncated)
        steps += 1
        if terminated or truncated:
            break
    env.close()
    assert steps > K  # the window filled up and slid
    # the same seed gives the same evaluation; --target-return changes what it conditions on
    one = evaluate(policy, episodes=1, seed=3, progress=False)
    assert evaluate(load_policy(ckpt), episodes=1, seed=3, progress=False) == one
    assert load_policy(ckpt, target_return=-7.0).context.target == -7.0


def test_export_runner_matches_the_eager_module_over_an_episode(dt_checkpoint, dt_export):
    from vla_ray.algorithms.dt import ContextRunner
    from vla_ray.evaluate import load_policy
    from vla_ray.export_dt import FP32_TOLERANCE, sequence_runner
    from vla_ray.runtime import read_spec

    ckpt, module = dt_checkpoint
    out, summary = dt_export
    assert summary["policy"] == "decision_transformer"
    assert summary["context"]["context_length"] == K
    assert summary["context"]["target_return"] == TARGET
    spec = read_spec(out / "torchscript")
    assert [i["name"] for i in spec["inputs"]] == ["state", "instruction", "instruction_mask"]
    graph = {i["name"]: i["shape"] for i in spec["graph_inputs"]}
    assert graph["state"] == ["batch", K, 11] and graph["dt_rtg"] == ["batch", K]
    assert spec["outputs"][0]["shape"] == ["batch", 1, 3]
    env = gym.make(HOPPER)
    observations, rewards = _episode_obs(env, seed=5, steps=3 * K)
    env.close()
    assert len(observations) > K
    for fmt in summary["formats"]:
        assert summary["formats"][fmt]["max_abs_diff"] <= FP32_TOLERANCE
        exported = sequence_runner(out / fmt)()
        eager = ContextRunner(module, K, TARGET, SCALE)
        other = sequence_runner(out / fmt, target_return=TARGET + 50.0)()
        moved = 0.0
        for t, obs in enumerate(observations):
            one = {k: np.asarray(v)[None] for k, v in obs.items()}
            a, b, c = eager(one), exported(one), other(one)
            np.testing.assert_allclose(b, a, atol=FP32_TOLERANCE)
            moved = max(moved, float(np.abs(c - a).max()))
            if t < len(rewards):
                for runner in (eager, exported, other):
                    runner.observe(rewards[t])
        assert moved > 1e-4  # the runner's returns-to-go reach the graph
    # pytorch/ is the eager module with its window settings: load_policy runs it
    policy = load_policy(out / "pytorch")
    assert (policy.context.K, policy.context.target) == (K, TARGET)


def test_export_refuses_formats_without_the_window(dt_checkpoint, tmp_path):
    from vla_ray.export import export
    from vla_ray.runtime import ExportError

    with pytest.raises(ExportError, match="format: onnx cannot hold a Decision Transformer"):
        export(dt_checkpoint[0], "onnx", tmp_path / "out", progress=None)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="target_return: only a Decision Transformer"):
        from vla_ray.evaluate import _no_target_return

        _no_target_return(1.0, tmp_path)


@pytest.mark.parametrize("source", ["export", "checkpoint"])
def test_serve_keeps_one_context_per_session(dt_checkpoint, dt_export, source):
    """Interleaved sessions answer as each would alone; episode_start starts a session's
    window again; rows without a session are first steps."""
    from vla_ray.serve.backends import SequenceBackend, load_backend

    model = dt_export[0] if source == "export" else dt_checkpoint[0]
    backend = load_backend(model, "torch")
    assert isinstance(backend, SequenceBackend)
    env = gym.make(HOPPER)
    eps = [_episode_obs(env, seed=s, steps=2 * K) for s in (11, 12)]
    env.close()
    n = min(len(eps[0][0]), len(eps[1][0]))

    def inputs(obs):
        return {k: np.asarray(v)[None] for k, v in obs.items()}

    def alone(observations, rewards):
        solo = load_backend(model, "torch")
        return [
            solo.act_session("solo", inputs(o), rewards[t - 1] if t else None)
            for t, o in enumerate(observations[:n])
        ]

    want = [alone(*ep) for ep in eps]
    got: list[list[np.ndarray]] = [[], []]
    for t in range(n):
        for i, sid in enumerate(("a", "b")):
            obs, rewards = eps[i]
            got[i].append(backend.act_session(sid, inputs(obs[t]), rewards[t - 1] if t else None))
    for i in range(2):
        np.testing.assert_allclose(np.concatenate(got[i]), np.concatenate(want[i]), atol=1e-6)
        assert got[i][0].shape == (1, 1, 3)
    assert not np.allclose(np.concatenate(got[0]), np.concatenate(got[1]))
    # a new episode in session "a": its first answer again
    again = backend.act_session("a", inputs(eps[0][0][0]), episode_start=True)
    np.testing.assert_allclose(again, want[0][0], atol=1e-6)
    # no session: each row is an episode's first step
    batch = {k: np.concatenate([inputs(ep[0][0])[k] for ep in eps]) for k in inputs(eps[0][0][0])}
    np.testing.assert_allclose(
        backend.predict(batch), np.concatenate([want[0][0], want[1][0]]), atol=1e-5
    )


def test_serve_request_fields_of_a_sequence_policy(dt_export, tmp_path):
    """reward / episode_start are read for a sequence policy, refused (422 naming them) for a
    VLA; the model's request schema lists them only for a sequence policy."""
    from vla_ray.runtime import read_spec
    from vla_ray.serve.schema import RequestError, RequestParser, act_request_schema

    spec = read_spec(dt_export[0] / "torchscript")
    from vla_ray.runtime import load_export_tokenizer

    tok = load_export_tokenizer(dt_export[0] / "torchscript" / "tokenizer")
    parser = RequestParser(spec, tok)
    body = {"instruction": "hop", "state": [0.0] * 11, "reward": 1.5, "episode_start": True}
    parsed = parser.parse(json.dumps(body).encode())
    assert parsed.reward == 1.5 and parsed.episode_start is True
    assert parsed.inputs["state"].shape == (1, 11)
    schema = act_request_schema(parser, [-1.0] * 3, [1.0] * 3)
    assert schema["properties"]["reward"]["type"] == "number"
    with pytest.raises(RequestError) as err:
        parser.parse(json.dumps({**body, "episode_start": "yes"}).encode())
    assert err.value.field == "episode_start"
    vla_spec = {k: v for k, v in spec.items() if k != "context"}
    vla_parser = RequestParser(vla_spec, tok)
    plain = {"instruction": "hop", "state": [0.0] * 11}
    assert vla_parser.parse(json.dumps(plain).encode()).reward is None
    for field in ("reward", "episode_start"):
        with pytest.raises(RequestError) as err:
            vla_parser.parse(json.dumps({**plain, field: body[field]}).encode())
        assert err.value.field == field and err.value.status == 422
    assert "reward" not in act_request_schema(vla_parser, [-1.0] * 3, [1.0] * 3)["properties"]


def test_serve_app_answers_each_session_from_its_own_context(dt_export):
    """The Serve deployment's /v1/act handler (called in-process, no Ray): the X-Session-Id
    header picks the context; episode_start starts it again."""
    import asyncio
    from dataclasses import asdict

    from starlette.requests import Request

    from vla_ray.serve.app import ServeSettings, VLAPolicy

    replica = VLAPolicy.func_or_class.__bases__[0](  # the class under Serve's ingress wrapper
        asdict(ServeSettings(model=str(dt_export[0]), backend="torch"))
    )

    def request(body: dict, sid: str) -> Request:
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"x-session-id", sid.encode())]
        sent: list[int] = []

        async def receive() -> dict:
            if sent:
                return {"type": "http.disconnect"}
            sent.append(1)
            return {"type": "http.request", "body": data, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/v1/act", "headers": headers}
        return Request({**scope, "query_string": b""}, receive)

    async def act(sid: str, **fields) -> list:
        body = {"instruction": "hop", "state": [0.1] * 11, **fields}
        answer = await replica._act(request(body, sid), None)
        assert answer.status_code == 200, answer.body
        return json.loads(answer.body)["actions"]

    async def play() -> list:
        return [
            await act("a"),
            await act("b"),
            await act("a", reward=1.0),
            await act("a", episode_start=True),
        ]

    a1, b1, a2, a_new = asyncio.run(play())
    assert b1 == a1  # b's first step is its own, not a's second
    assert not np.allclose(a2, a1)  # a's second step sees its first in the window
    assert a_new == a1
    assert len(replica.backend.sessions) == 2
