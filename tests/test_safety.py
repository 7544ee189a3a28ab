"""The safety layer: each rule kind and mode with exact values, rules-file errors naming the rule
and field, the env wrapper's counts in info / metrics / eval output, and Serve's per-request
interventions, e-stop, resume and watchdog through the app (in process, FastAPI's test client).
"""

from __future__ import annotations

import json
import time
import types

import gymnasium as gym
import numpy as np
import pytest

from vla_ray.safety import (
    RULE_KINDS,
    RuleSet,
    SafetyConfigError,
    SafetyRejected,
    SafetyWrapper,
    make_env,
)

LOW, HIGH = np.array([-1.0, -1.0]), np.array([1.0, 1.0])


def rules(*specs: dict, stop_action=None) -> RuleSet:
    data = {"rules": list(specs)}
    if stop_action is not None:
        data["stop_action"] = stop_action
    return RuleSet.from_dict(data, 2, LOW, HIGH)


def run(rs: RuleSet, chunk, state=None, info=None, previous=None):
    result = rs.apply(np.asarray(chunk, np.float32), state, info, previous)
    return result.actions, result.counts


# ---- each kind, clamp mode ----------------------------------------------------------------------
def test_action_bounds_clamp():
    rs = rules({"id": "b", "kind": "action_bounds", "mode": "clamp", "low": -0.5, "high": 0.5})
    out, counts = run(rs, [[0.9, -0.2], [0.1, -3.0], [0.1, 0.2]])
    np.testing.assert_allclose(out, [[0.5, -0.2], [0.1, -0.5], [0.1, 0.2]])
    assert counts == {"b": 2}  # two of the three steps changed


def test_max_delta_from_previous_then_within_chunk():
    rs = rules({"id": "smooth", "kind": "max_delta", "max_delta": 0.1})
    out, counts = run(rs, [[0.5, 0.0], [0.5, 0.0], [-0.5, 0.05]], previous=np.zeros(2))
    np.testing.assert_allclose(out, [[0.1, 0.0], [0.2, 0.0], [0.1, 0.05]], atol=1e-7)
    assert counts == {"smooth": 3}
    # no previous action: from the neutral action (0 within the bounds)
    out, _ = run(rs, [[-0.5, 0.0]])
    np.testing.assert_allclose(out, [[-0.1, 0.0]], atol=1e-7)


def test_workspace_blocks_only_the_outward_component():
    rs = rules(
        {
            "id": "arena",
            "kind": "workspace",
            "state_indices": [2, 3],
            "low": [-0.9, -0.9],
            "high": [0.9, 0.9],
        }  # fmt: skip
    )
    state = np.array([0.0, 0.0, 0.95, -0.2])  # beyond +x, inside in y
    out, counts = run(rs, [[0.5, 0.5], [-0.5, -0.5]], state=state)
    np.testing.assert_allclose(out, [[0.0, 0.5], [-0.5, -0.5]])
    assert counts == {"arena": 1}


def test_keep_out_removes_the_component_towards_the_centre():
    rs = rules(
        {
            "id": "pillar",
            "kind": "keep_out",
            "state_indices": [0, 1],
            "center": [0.0, 0.0],
            "radius": 0.2,
            "margin": 0.15,
        }  # fmt: skip
    )
    state = np.array([0.3, 0.0])  # 0.3 from the centre: within radius + margin
    out, counts = run(rs, [[-0.5, 0.4], [0.5, 0.0]], state=state)
    np.testing.assert_allclose(out, [[0.0, 0.4], [0.5, 0.0]], atol=1e-7)
    assert counts == {"pillar": 1}
    # farther than radius + margin: untouched
    out, counts = run(rs, [[-0.5, 0.4]], state=np.array([0.4, 0.0]))
    np.testing.assert_allclose(out, [[-0.5, 0.4]])
    assert counts == {"pillar": 0}


def test_speed_limit_commanded_and_measured():
    commanded = rules({"id": "v", "kind": "speed_limit", "max": 0.5})
    out, counts = run(commanded, [[0.6, 0.8], [0.3, 0.0]])
    np.testing.assert_allclose(out, [[0.3, 0.4], [0.3, 0.0]], atol=1e-6)
    assert counts == {"v": 1}
    measured = rules(
        {
            "id": "v",
            "kind": "speed_limit",
            "max": 0.5,
            "state_indices": [2, 3],
            "action_indices": [0],
        }  # fmt: skip
    )
    fast = np.array([0.0, 0.0, 0.6, 0.8])  # speed 1.0
    out, counts = run(measured, [[0.7, -0.2], [-0.3, 0.9]], state=fast)
    np.testing.assert_allclose(out, [[0.0, -0.2], [-0.3, 0.9]])
    assert counts == {"v": 1}
    out, counts = run(measured, [[0.7, -0.2]], state=np.array([0.0, 0.0, 0.3, 0.0]))
    assert counts == {"v": 0} and np.allclose(out, [[0.7, -0.2]])


def test_joint_limits_position_and_velocity_actions():
    position = rules(
        {
            "id": "j",
            "kind": "joint_limits",
            "action": "position",
            "state_indices": [0, 1],
            "low": [-0.3, -0.2],
            "high": [0.3, 0.2],
        }  # fmt: skip
    )
    out, counts = run(position, [[0.5, -0.5]], state=np.zeros(2))
    np.testing.assert_allclose(out, [[0.3, -0.2]], atol=1e-7)
    assert counts == {"j": 1}
    velocity = rules(
        {
            "id": "j",
            "kind": "joint_limits",
            "state_indices": [0, 1],
            "low": [-0.3, -0.2],
            "high": [0.3, 0.2],
        }  # fmt: skip
    )
    out, _ = run(velocity, [[0.5, -0.5]], state=np.array([0.3, 0.0]))
    np.testing.assert_allclose(out, [[0.0, -0.5]])


def test_min_distance_and_time_to_collision_clamp():
    rs = rules(
        {
            "id": "gap",
            "kind": "min_distance",
            "source": "info.front.distance",
            "min": 0.1,
            "action_indices": [0],
            "action_max": -0.5,
        }  # fmt: skip
    )
    out, counts = run(rs, [[0.8, 0.3]], info={"front": {"distance": 0.05}})
    np.testing.assert_allclose(out, [[-0.5, 0.3]])
    assert counts == {"gap": 1}
    out, counts = run(rs, [[0.8, 0.3]], info={"front": {"distance": 0.5}})
    assert counts == {"gap": 0} and np.allclose(out, [[0.8, 0.3]])
    ttc = rules(
        {
            "id": "ttc",
            "kind": "min_time_to_collision",
            "distance": "state[0]",
            "closing_speed": "state[1]",
            "min": 1.0,
            "action_max": -0.5,
        }  # fmt: skip
    )
    out, counts = run(ttc, [[0.8, 0.3]], state=np.array([2.0, 4.0]))  # ttc 0.5 s
    np.testing.assert_allclose(out, [[-0.5, 0.3]])
    assert counts == {"ttc": 1}
    out, counts = run(ttc, [[0.8, 0.3]], state=np.array([2.0, -4.0]))  # opening: no collision
    assert counts == {"ttc": 0}


def test_every_kind_is_tested_here():
    assert set(RULE_KINDS) == {
        "action_bounds",
        "max_delta",
        "workspace",
        "keep_out",
        "speed_limit",
        "joint_limits",
        "min_distance",
        "min_time_to_collision",
    }


# ---- modes ------------------------------------------------------------------------------------
GAP = {"id": "gap", "kind": "min_distance", "source": "state[0]", "min": 0.1}


def test_fallback_stop_and_hold_replace_the_whole_action():
    stop = rules({**GAP, "mode": "fallback", "fallback": "stop"}, stop_action=[0.0, -1.0])
    out, counts = run(stop, [[0.8, 0.3], [0.2, 0.2]], state=np.array([0.05]))
    np.testing.assert_allclose(out, [[0.0, -1.0], [0.0, -1.0]])
    assert counts == {"gap": 2}
    hold = rules({**GAP, "mode": "fallback", "fallback": "hold"})
    out, _ = run(hold, [[0.8, 0.3]], state=np.array([0.05]), previous=np.array([0.1, 0.2]))
    np.testing.assert_allclose(out, [[0.1, 0.2]], atol=1e-7)


def test_reject_raises_naming_the_rule_and_monitor_only_counts():
    reject = rules({**GAP, "mode": "reject"})
    with pytest.raises(SafetyRejected, match="'gap' rejected the action at step 0") as err:
        run(reject, [[0.8, 0.3]], state=np.array([0.05]))
    assert err.value.rule == "gap"
    monitor = rules({**GAP, "mode": "monitor"})
    out, counts = run(monitor, [[0.8, 0.3]], state=np.array([0.05]))
    np.testing.assert_allclose(out, [[0.8, 0.3]])
    assert counts == {"gap": 1}


def test_rules_apply_in_order():
    rs = rules(
        {"id": "smooth", "kind": "max_delta", "max_delta": 0.5},
        {"id": "b", "kind": "action_bounds", "low": -0.2, "high": 0.2},
    )
    out, counts = run(rs, [[0.9, 0.0]], previous=np.zeros(2))
    np.testing.assert_allclose(out, [[0.2, 0.0]])  # 0.9 -> 0.5 (rate) -> 0.2 (bounds)
    assert counts == {"smooth": 1, "b": 1}


# ---- rules-file errors name the rule, field, expected and given ----------------------------------
@pytest.mark.parametrize(
    "spec,rule,field,words",
    [
        ({"id": "x", "kind": "speed"}, "x", "kind", "one of action_bounds"),
        ({"id": "x", "kind": "max_delta", "mode": "slow"}, "x", "mode", "clamp, fallback"),
        ({"id": "x", "kind": "max_delta", "max_delta": 0}, "x", "max_delta", "a number > 0, got 0"),
        ({"id": "x", "kind": "max_delta"}, "x", "max_delta", "required"),
        ({"id": "x", "kind": "action_bounds", "low": [0, 0, 0]}, "x", "low", "2 finite numbers"),
        ({"id": "x", "kind": "action_bounds", "low": 1, "high": -1}, "x", "low/high", "low < high"),
        ({"id": "x", "kind": "min_distance", "source": "pos[1]", "min": 1}, "x", "source",
         '"state[INDEX]" or "info.KEY", got \'pos[1]\''),
        ({"id": "x", "kind": "workspace", "state_indices": [0, 1], "low": [0, 0],
          "high": [1, 1], "action_indices": [0, 5]}, "x", "action_indices", "indices < 2"),
        ({"id": "x", "kind": "max_delta", "max_delta": 1, "speed": 2}, "x", "speed", "unknown"),
        ({"id": "x", "kind": "min_distance", "source": "state[0]", "min": 1, "mode": "fallback",
          "fallback": "brake"}, "x", "fallback", "stop, hold"),
        ({"kind": "max_delta"}, "#0", "id", "non-empty string"),
    ],
)  # fmt: skip
def test_rule_errors_are_named(spec, rule, field, words):
    with pytest.raises(SafetyConfigError) as err:
        rules(spec)
    e = err.value
    assert (e.rule, e.field) == (rule, field), str(e)
    assert words in str(e) and str(e).startswith(f"safety rule {rule!r}: {field}: expected")


def test_rules_file_yaml_and_its_errors(tmp_path):
    from vla_ray.safety import load_rules_file

    good = tmp_path / "rules.yaml"
    good.write_text(
        "stop_action: [0.0, 0.0]\n"
        "rules:\n"
        "  - {id: b, kind: action_bounds, mode: clamp, low: -0.5, high: 0.5}\n"
        "  - {id: gap, kind: min_distance, mode: fallback, source: 'state[0]', min: 0.1}\n"
    )
    rs = RuleSet.from_config(good, gym.spaces.Box(-1.0, 1.0, (2,), np.float32))
    assert [r["id"] for r in rs.describe()] == ["b", "gap"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [ {id: b\n")
    with pytest.raises(SafetyConfigError, match="bad.yaml: expected valid YAML/JSON"):
        load_rules_file(bad)
    with pytest.raises(SafetyConfigError, match="path: expected an existing rules file"):
        load_rules_file(tmp_path / "none.yaml")
    dup = {"rules": [{"id": "b", "kind": "action_bounds"}] * 2}
    with pytest.raises(SafetyConfigError, match="'b': id: expected a unique id"):
        RuleSet.from_dict(dup, 2, LOW, HIGH)
    with pytest.raises(SafetyConfigError, match="stop_action: expected values within"):
        RuleSet.from_dict({"rules": [], "stop_action": [3.0, 0.0]}, 2, LOW, HIGH)
    with pytest.raises(SafetyConfigError, match="'<file>': rule: expected rules or stop_action"):
        RuleSet.from_dict({"rules": [], "rule": []}, 2, LOW, HIGH)


def test_discrete_action_space_is_refused():
    with pytest.raises(SafetyConfigError, match="action space: expected a Box"):
        RuleSet.from_config({"rules": []}, gym.spaces.Discrete(3))


def test_missing_state_index_or_info_key_is_named():
    rs = rules({"id": "gap", "kind": "min_distance", "source": "info.gap", "min": 0.1})
    with pytest.raises(SafetyConfigError, match="'gap': source: expected an info with key 'gap'"):
        run(rs, [[0.0, 0.0]], info={"speed": 1.0})


def test_example_rules_files_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "envs" / "safety"
    box = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    files = sorted(root.glob("*.yaml"))
    assert {f.name for f in files} >= {"langreach.yaml", "highway.yaml"}
    for path in files:
        assert RuleSet.from_config(path, box).rules


# ---- the env wrapper --------------------------------------------------------------------------
class _Recorder(gym.Env):
    """State = [x, y]; records the actions it receives; info carries a gap."""

    observation_space = gym.spaces.Box(-10, 10, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.received = np.zeros(2, np.float32), []
        return self.pos.copy(), {"gap": 1.0}

    def step(self, action):
        self.received.append(np.asarray(action).copy())
        self.pos = self.pos + np.asarray(action, np.float32)
        gap = 1.0 if len(self.received) < 3 else 0.0
        return self.pos.copy(), 1.0, False, len(self.received) >= 4, {"gap": gap}


WRAPPER_RULES = {
    "rules": [
        {"id": "b", "kind": "action_bounds", "low": -0.5, "high": 0.5},
        {"id": "gap", "kind": "min_distance", "source": "info.gap", "min": 0.5, "mode": "monitor"},
    ]
}


def test_wrapper_shields_the_env_and_counts_in_info():
    env = SafetyWrapper(_Recorder(), WRAPPER_RULES)
    _, info = env.reset(seed=0)
    assert info["safety"] == {"b": 0, "gap": 0} and info["cost"] == 0.0
    infos = [env.step(np.array([0.9, 0.1]))[-1] for _ in range(4)]
    np.testing.assert_allclose(env.unwrapped.received, [[0.5, 0.1]] * 4)
    # bounds every step; the gap rule sees info after step 3 (gap 0), so on steps 4 only
    assert [i["safety"] for i in infos] == [
        {"b": 1, "gap": 0},
        {"b": 2, "gap": 0},
        {"b": 3, "gap": 0},
        {"b": 4, "gap": 1},
    ]
    assert [i["cost"] for i in infos] == [1.0, 1.0, 1.0, 2.0]
    assert infos[-1]["episode_cost"] == 5.0
    _, info = env.reset()
    assert info["safety"] == {"b": 0, "gap": 0} and info["episode_cost"] == 0.0


def test_wrapper_reject_sends_the_stop_action():
    spec = {"rules": [{"id": "b", "kind": "action_bounds", "low": -0.5, "high": 0.5,
                       "mode": "reject"}], "stop_action": [0.0, 0.25]}  # fmt: skip
    env = SafetyWrapper(_Recorder(), spec)
    env.reset(seed=0)
    info = env.step(np.array([0.9, 0.0]))[-1]
    np.testing.assert_allclose(env.unwrapped.received, [[0.0, 0.25]])
    assert info["safety"] == {"b": 1} and info["cost"] == 1.0


def test_train_env_creator_and_make_env_apply_env_safety(tmp_path):
    from vla_ray.envs import LANGREACH_STATE_ID
    from vla_ray.train import _EnvCreator

    path = tmp_path / "rules.json"
    path.write_text(
        json.dumps(WRAPPER_RULES["rules"][:1] and {"rules": WRAPPER_RULES["rules"][:1]})
    )
    env = _EnvCreator(LANGREACH_STATE_ID)({"safety": str(path), "max_episode_steps": 5})
    assert isinstance(env, SafetyWrapper)
    env.reset(seed=0)
    info = env.step(np.array([1.0, 1.0], np.float32))[-1]
    assert info["safety"] == {"b": 1}
    assert not isinstance(make_env(LANGREACH_STATE_ID, {}), SafetyWrapper)


# ---- counts in metrics (callbacks -> summarize) and in eval output -------------------------------
def test_callback_logs_interventions_per_episode_and_summarize_reports_them():
    from ray.rllib.utils.metrics.metrics_logger import MetricsLogger

    from vla_ray.callbacks import SuccessRateCallback
    from vla_ray.train import summarize

    class Episode:
        def __init__(self, info):
            self.info = info

        def get_infos(self, index):
            return self.info

    logger = MetricsLogger()
    for counts, cost in (({"b": 4, "gap": 0}, 4.0), ({"b": 2, "gap": 2}, 4.0)):
        info = {"safety": counts, "episode_cost": cost}
        SuccessRateCallback().on_episode_end(episode=Episode(info), metrics_logger=logger)
    assert logger.peek(("safety", "b")) == pytest.approx(3.0)
    assert logger.peek(("safety", "gap")) == pytest.approx(1.0)
    assert logger.peek("episode_cost") == pytest.approx(4.0)
    row = summarize({"env_runners": logger.reduce()})
    assert row["safety"] == {"b": 3.0, "gap": 1.0} and row["episode_cost"] == 4.0


def test_eval_reports_and_prints_interventions(tmp_path, capsys):
    from vla_ray.cli import _print_eval
    from vla_ray.envs import LANGREACH_STATE_ID
    from vla_ray.evaluate import Policy, evaluate

    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - {id: slow, kind: speed_limit, max: 0.5}\n")
    policy = Policy(lambda obs: np.ones((len(obs["state"]), 2), np.float32), {}, "test")
    cfg = {"max_episode_steps": 3, "safety": str(path)}
    result = evaluate(policy, LANGREACH_STATE_ID, cfg, episodes=2, progress=False)
    # every step's (1, 1) command is above speed 0.5: 3 interventions per episode
    assert result["safety_interventions"] == {"slow": 6}
    assert result["safety_per_episode"] == {"slow": 3.0} and result["mean_episode_cost"] == 3.0
    _print_eval(result)
    assert (
        "safety interventions: slow 6 (3.00/ep)  mean episode cost 3.00" in capsys.readouterr().out
    )


def test_collect_applies_env_safety_and_records_the_action_sent(tmp_path, capsys):
    from vla_ray.cli import main
    from vla_ray.data import read_episodes
    from vla_ray.envs import LANGREACH_STATE_ID

    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - {id: slow, kind: speed_limit, max: 0.5}\n")
    out = tmp_path / "data"
    args = ["collect", "--env", LANGREACH_STATE_ID, "--policy", "random", "--episodes", "2",
            "--env-config", '{"max_episode_steps": 3}', "--safety", str(path), "--quiet",
            "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    actions = np.concatenate([np.asarray(ep.get_actions()) for ep in read_episodes(out)])
    assert actions.shape == (6, 2)
    # the dataset holds what the env was sent: the speed limit held on every step
    assert np.linalg.norm(actions, axis=1).max() <= 0.5 + 1e-6
    slowed = int(np.sum(np.linalg.norm(actions, axis=1) > 0.5 - 1e-6))
    assert summary["safety_interventions"] == {"slow": slowed} and slowed > 0
    assert summary["mean_episode_cost"] == pytest.approx(slowed / 2)


# ---- Serve: the app in process ----------------------------------------------------------------
KEY = "k3y"


@pytest.fixture(scope="module")
def onnx_export(tiny_vla_dir, tmp_path_factory):
    from vla_ray.export import export

    out = tmp_path_factory.mktemp("safety-export") / "export"
    export(tiny_vla_dir, ["onnx"], out, prefix_cache=False, progress=None)
    return out


@pytest.fixture(scope="module")
def client(onnx_export):
    """The FastAPI app over one in-process replica (no Ray Serve): Serve's class-based routes
    find their instance through ``serve.get_replica_context``, patched here."""
    from fastapi.testclient import TestClient
    from ray import serve

    from vla_ray.serve import app as app_module

    wrapper = app_module.VLAPolicy.func_or_class
    cls = next(c for c in wrapper.__mro__ if "_batched" in c.__dict__)
    replica = cls.__new__(cls)
    settings = {
        "model": str(onnx_export),
        "backend": "onnx",
        "api_key": KEY,
        "shield": {
            "rules": {
                "rules": [{"id": "slow", "kind": "speed_limit", "max": 0.1}],
                "stop_action": [0.0, 0.0],
            }
        },
        # generous: an in-process request on a loaded 2-core machine can take a second
        "watchdog": {"max_age_s": 5.0, "stop_on_model_error": True},
    }
    from PIL import Image

    pixel_limit = Image.MAX_IMAGE_PIXELS  # the replica lowers the process-wide limit: restored
    cls.__init__(replica, settings)

    # each request alone, not through @serve.batch: its queue would be created in this test's
    # event loop, inside the class's closure, and the class could no longer be pickled for Serve
    async def one_at_a_time(inputs):
        return app_module.predict_each(replica.backend.predict, [inputs])[0]

    replica._batched = one_at_a_time
    original = serve.get_replica_context
    context = types.SimpleNamespace(
        servable_object=replica,
        # read by @serve.batch when its queue is created
        _deployment_config=types.SimpleNamespace(max_ongoing_requests=64),
    )
    serve.get_replica_context = lambda: context
    with TestClient(app_module.app) as test_client:
        test_client.replica = replica
        yield test_client
    serve.get_replica_context = original
    Image.MAX_IMAGE_PIXELS = pixel_limit


@pytest.fixture(scope="module")
def body():
    from vla_ray.serve.client import act_body

    env = gym.make("vla_ray/LangReach-v0")
    obs, info = env.reset(seed=0)
    env.close()
    return act_body(obs["image"], info["instruction"], obs["state"])


def headers(session=None, age=0.0, key=KEY):
    out = {"X-API-Key": key, "X-Obs-Timestamp": str(time.time() - age)}
    if session is not None:
        out["X-Session-Id"] = session
    return out


def test_serve_answer_carries_the_interventions(client, body):
    r = client.post("/v1/act", json=body, headers=headers("a"))
    assert r.status_code == 200, r.text
    answer = r.json()
    # the untrained model's actions are O(1): the commanded speed is cut to 0.1
    assert answer["safety"] == {"session": "a", "interventions": {"slow": 1, "bounds": 0},
                                "stopped_by": None}  # fmt: skip
    assert np.linalg.norm(answer["action"]) == pytest.approx(0.1, abs=1e-6)
    spec = client.get("/v1/spec", headers={"X-API-Key": KEY}).json()
    assert [r["id"] for r in spec["shield"]["rules"]] == ["slow", "bounds"]
    assert spec["serving"]["watchdog"]["max_age_s"] == 5.0


def test_serve_estop_and_resume_per_session(client, body):
    assert client.post("/v1/estop", headers={"X-Session-Id": "b"}).status_code == 401
    r = client.post("/v1/estop", headers={"X-API-Key": KEY, "X-Session-Id": "b"})
    assert r.status_code == 200 and r.json() == {"session": "b", "stopped": True}
    stopped = client.post("/v1/act", json=body, headers=headers("b")).json()
    assert stopped["action"] == [0.0, 0.0] and stopped["safety"]["stopped_by"] == "estop"
    other = client.post("/v1/act", json=body, headers=headers("c")).json()
    assert other["safety"]["stopped_by"] is None and other["action"] != [0.0, 0.0]
    r = client.post("/v1/resume", headers={"X-API-Key": KEY, "X-Session-Id": "b"})
    assert r.json() == {"session": "b", "stopped": False}
    assert (
        client.post("/v1/act", json=body, headers=headers("b")).json()["safety"]["stopped_by"]
        is None
    )
    # without a session header: every session, until a global resume
    client.post("/v1/estop", headers={"X-API-Key": KEY})
    assert client.post("/v1/act", json=body, headers=headers("c")).json()["action"] == [0.0, 0.0]
    assert client.post("/v1/resume", headers={"X-API-Key": KEY}).json()["stopped"] is False
    assert client.post("/v1/act", json=body, headers=headers("c")).json()["action"] != [0.0, 0.0]


def _let_overflowing_states_through(client, monkeypatch) -> None:
    """The replica rejects states beyond the range it probed at start-up (422); lifted to
    float32's range, so that a huge state reaches the model and its output is NaN: the model
    error that a state pattern the probe missed would cause."""
    from vla_ray.serve.schema import FLOAT32_MAX

    monkeypatch.setattr(client.replica.parser, "state_limit", FLOAT32_MAX)


def test_serve_batch_rows_get_the_rules_the_stop_and_their_own_errors(client, body, monkeypatch):
    """/v1/act_batch: each row is shielded and counted as /v1/act does; the session's e-stop and
    a stale timestamp stop every row; a bad row is a 422 in its slot; a row the model fails on
    gets the stop action (stop_on_model_error)."""
    _let_overflowing_states_through(client, monkeypatch)
    nan_row = {**body, "state": [3e38] * 4}
    batch = {"observations": [body, {**body, "state": [1e39, 0, 0, 0]}, nan_row, body]}
    r = client.post("/v1/act_batch", json=batch, headers=headers("e"))
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    assert [x["status"] for x in rows] == [200, 422, 200, 200]
    assert rows[0]["safety"] == {"session": "e", "interventions": {"slow": 1, "bounds": 0},
                                 "stopped_by": None}  # fmt: skip
    assert np.linalg.norm(rows[0]["action"]) == pytest.approx(0.1, abs=1e-6)
    assert rows[3]["action"] == rows[0]["action"]
    assert rows[1]["field"] == "state" and "float32" in rows[1]["detail"]
    assert rows[2]["action"] == [0.0, 0.0] and rows[2]["safety"]["stopped_by"] == "model_error"
    client.post("/v1/estop", headers={"X-API-Key": KEY, "X-Session-Id": "e"})
    rows = client.post("/v1/act_batch", json=batch, headers=headers("e")).json()["results"]
    assert [x["status"] for x in rows] == [200, 422, 200, 200]
    assert all(rows[i]["safety"]["stopped_by"] == "estop" for i in (0, 2, 3))
    assert all(rows[i]["action"] == [0.0, 0.0] for i in (0, 2, 3))
    client.post("/v1/resume", headers={"X-API-Key": KEY, "X-Session-Id": "e"})
    rows = client.post("/v1/act_batch", json=batch, headers=headers("e", age=60.0)).json()
    assert rows["results"][0]["safety"]["stopped_by"] == "stale_observation"
    r = client.post("/v1/act_batch", json=batch, headers={"X-API-Key": KEY})
    assert r.status_code == 422 and r.json()["field"] == "X-Obs-Timestamp"
    r = client.post("/v1/act_batch", json=batch, headers=headers("e", key="wrong"))
    assert r.status_code == 401


def test_serve_watchdog_stale_observation_and_timestamp_errors(client, body):
    answer = client.post("/v1/act", json=body, headers=headers("d", age=60.0)).json()
    assert answer["action"] == [0.0, 0.0]
    assert answer["safety"]["stopped_by"] == "stale_observation"
    no_ts = {"X-API-Key": KEY}
    r = client.post("/v1/act", json=body, headers=no_ts)
    assert r.status_code == 422 and r.json()["field"] == "X-Obs-Timestamp"
    r = client.post("/v1/act", json=body, headers={**no_ts, "X-Obs-Timestamp": "soon"})
    assert r.status_code == 422 and "Unix seconds" in r.json()["detail"]


def test_serve_watchdog_answers_stop_on_a_model_error(client, body, monkeypatch):
    _let_overflowing_states_through(client, monkeypatch)
    # a state within float32 that drives the model to NaN
    bad = {**body, "state": [3e38] * 4}
    r = client.post("/v1/act", json=bad, headers=headers("e"))
    assert r.status_code == 200, r.text
    assert r.json()["action"] == [0.0, 0.0] and r.json()["safety"]["stopped_by"] == "model_error"


def test_serve_reject_rule_answers_409_naming_it(client, body, monkeypatch):
    from vla_ray.serve.shield import Shield, ShieldConfigError

    replica = client.replica
    tight = {"id": "tight", "kind": "action_bounds", "low": -0.01, "high": 0.01, "mode": "reject"}
    monkeypatch.setattr(replica, "shield", Shield({"rules": {"rules": [tight]}}, replica.spec))
    r = client.post("/v1/act", json=body, headers=headers("f"))
    assert r.status_code == 409, r.text
    assert r.json() == {
        "detail": "safety.tight: action_bounds broken",
        "field": "safety.tight",
    }
    # Serve has no env info: a rule reading one is refused when the shield is built
    gap = {"id": "gap", "kind": "min_distance", "source": "info.gap", "min": 1}
    with pytest.raises(ShieldConfigError, match="'gap': source: expected state"):
        Shield({"rules": {"rules": [gap]}}, replica.spec)


# ---- constrained RL: PPO-Lagrangian's multiplier and penalty ------------------------------------
def _episode(rewards, costs, done=True):
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    n = len(rewards)
    infos = [{"cost": 0.0, "episode_cost": 0.0}]
    for c in costs:
        infos.append({"cost": c, "episode_cost": infos[-1]["episode_cost"] + c})
    ep = SingleAgentEpisode(
        observations=[np.zeros(2, np.float32)] * (n + 1),
        actions=[np.zeros(2, np.float32)] * n,
        rewards=list(rewards),
        infos=infos,
        terminated=done,
        len_lookback_buffer=0,
    )
    return ep.to_numpy()


def test_lagrange_multiplier_rises_above_the_cost_limit_and_falls_to_zero_below():
    from vla_ray.algorithms.ppo_lag import lagrange_update

    assert lagrange_update(0.0, mean_cost=3.0, cost_limit=1.0, lr=0.1) == pytest.approx(0.2)
    assert lagrange_update(0.5, mean_cost=0.0, cost_limit=1.0, lr=0.1) == pytest.approx(0.4)
    assert lagrange_update(0.05, mean_cost=0.0, cost_limit=1.0, lr=0.1) == 0.0  # projected


def test_cost_penalty_connector_updates_the_multiplier_and_penalises_rewards():
    from vla_ray.algorithms.ppo_lag import CostPenalty

    piece = CostPenalty(cost_limit=1.0, lagrangian_lr=0.5, lagrangian_init=0.0)
    # two ended episodes of episode cost 3 and 1 (mean 2 > limit 1): lambda 0 -> 0.5
    eps = [_episode([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]), _episode([2.0, 0.0], [0.0, 1.0])]
    piece(rl_module=None, batch={}, episodes=eps)
    assert piece.multiplier == pytest.approx(0.5) and piece.last_mean_cost == pytest.approx(2.0)
    # (r - 0.5 c) / 1.5
    np.testing.assert_allclose(eps[0].get_rewards(), [1 / 3] * 3, rtol=1e-6)
    np.testing.assert_allclose(eps[1].get_rewards(), [2 / 1.5, -1 / 3], rtol=1e-6)
    # a second batch over the limit raises it again; the state round-trips
    piece(rl_module=None, batch={}, episodes=[_episode([0.0] * 4, [1.0] * 4)])
    assert piece.multiplier == pytest.approx(2.0)
    other = CostPenalty()
    other.set_state(piece.get_state())
    assert other.multiplier == pytest.approx(2.0)
    # an unfinished episode chunk is penalised but does not move the multiplier
    piece(rl_module=None, batch={}, episodes=[_episode([0.0], [0.0], done=False)])
    assert piece.multiplier == pytest.approx(2.0)


def test_cost_penalty_rewrites_read_only_rewards():
    """Episodes from remote EnvRunners come out of Ray's object store with read-only arrays."""
    from vla_ray.algorithms.ppo_lag import CostPenalty

    ep = _episode([1.0, 1.0], [1.0, 0.0])
    ep.rewards.data.setflags(write=False)
    CostPenalty(cost_limit=0.0, lagrangian_lr=1.0)(rl_module=None, batch={}, episodes=[ep])
    np.testing.assert_allclose(ep.get_rewards(), [0.0, 0.5], rtol=1e-6)  # lambda 1: (r - c) / 2


def test_cost_penalty_needs_the_safety_cost_in_info():
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    from vla_ray.algorithms.ppo_lag import CostPenalty

    ep = SingleAgentEpisode(
        observations=[np.zeros(2, np.float32)] * 2,
        actions=[np.zeros(2, np.float32)],
        rewards=[1.0],
        infos=[{}, {}],
        terminated=True,
        len_lookback_buffer=0,
    ).to_numpy()
    with pytest.raises(ValueError, match="env.safety=RULES.yaml"):
        CostPenalty()(rl_module=None, batch={}, episodes=[ep])


def test_ppo_lag_preset_resolves_with_the_rules_inline():
    from vla_ray.train import resolve

    spec = resolve("langreach-state-ppo-lag", {"training": {"cost_limit": 0.5}}, local=True)
    assert spec.algorithm == "ppo_lag" and spec.settings["training"]["cost_limit"] == 0.5
    rules = spec.settings["env_config"]["safety"]["rules"]
    assert [r["id"] for r in rules] == ["keep_out_centre"] and rules[0]["mode"] == "monitor"


def test_highway_near_miss_cost_counts_ttc_under_1_5_s_and_leaves_the_action():
    """envs/safety/highway_cost.yaml: TTC = x / closing speed in highway-env's normalised units
    (x / 200 m, vx / 80 m/s), so 0.6 is 1.5 s; monitor mode never changes the action."""
    from vla_ray.train import resolve

    rules = RuleSet.from_config(
        "envs/safety/highway_cost.yaml", gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    )
    action = np.array([[0.7, 0.1]], np.float32)

    def cost(x_m: float, closing_m_s: float) -> int:
        state = np.zeros(38, np.float32)
        state[11], state[13] = x_m / 200.0, -closing_m_s / 80.0
        result = rules.apply(action, state)
        np.testing.assert_array_equal(result.actions, action)
        return result.counts["near_miss"]

    assert cost(10.0, 10.0) == 1  # 1.0 s
    assert cost(20.0, 10.0) == 0  # 2.0 s
    assert cost(-5.0, 10.0) == 0  # behind
    assert cost(10.0, -3.0) == 0  # pulling away
    spec = resolve("highway-state-ppo-lag", {}, local=True)
    assert spec.algorithm == "ppo_lag" and spec.env == "vla_ray/HighwayState-v0"
    assert spec.settings["env_config"]["safety"]["rules"][0]["id"] == "near_miss"


def test_ppo_lag_learner_pipeline_starts_with_the_cost_penalty(langreach_spaces):
    from vla_ray.algorithms.ppo_lag import CostPenalty, PPOLagConfig, PPOLagLearner

    cfg = PPOLagConfig().training(cost_limit=0.5, lagrangian_lr=0.2, lagrangian_init=0.1)
    obs_space, act_space = langreach_spaces
    pipeline = cfg.build_learner_connector(obs_space, act_space)
    first = pipeline.connectors[0]
    assert isinstance(first, CostPenalty)
    assert (first.cost_limit, first.lr, first.multiplier) == (0.5, 0.2, 0.1)
    assert cfg.get_default_learner_class() is PPOLagLearner
    with pytest.raises(ValueError, match="cost_limit: expected >= 0"):
        PPOLagConfig().training(cost_limit=-1.0).validate()


def test_serve_session_rate_limits_from_its_last_answer(client, body, monkeypatch):
    from vla_ray.serve.shield import Shield

    replica = client.replica
    monkeypatch.setattr(replica, "shield", Shield({"max_delta": 0.05}, replica.spec))
    first = np.asarray(client.post("/v1/act", json=body, headers=headers("g")).json()["action"])
    second = np.asarray(client.post("/v1/act", json=body, headers=headers("g")).json()["action"])
    # the untrained model wants O(1) actions: each answer moves 0.05 further, from the neutral
    # action, then from the session's last answer
    np.testing.assert_allclose(np.abs(first), 0.05, atol=1e-6)
    np.testing.assert_allclose(np.abs(second - first), 0.05, atol=1e-6)
    np.testing.assert_allclose(np.abs(second), 0.1, atol=1e-6)
    # without a session header every request starts from the neutral action
    anon = [client.post("/v1/act", json=body, headers=headers()).json()["action"] for _ in "ab"]
    np.testing.assert_allclose(anon[0], first, atol=1e-6)
    np.testing.assert_allclose(anon[1], first, atol=1e-6)


def test_cli_serve_safety_file_errors_name_the_rule(onnx_export, tmp_path, capsys):
    from vla_ray.cli import main

    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - {id: smooth, kind: max_delta, max_delta: -1}\n")
    assert main(["serve", "--model", str(onnx_export), "--safety", str(bad)]) == 2
    assert (
        "safety rule 'smooth': max_delta: expected a number > 0, got -1" in capsys.readouterr().err
    )
    wide = tmp_path / "wide.yaml"  # a state index beyond the model's 4-dim state
    wide.write_text(
        "rules:\n  - {id: gap, kind: min_distance, source: 'state[0]', min: 1}\n"
        "  - {id: box, kind: workspace, state_indices: [7], low: [0], high: [1]}\n"
    )
    assert main(["serve", "--model", str(onnx_export), "--safety", str(wide)]) == 2
    assert "'box': state_indices: expected indices < 4" in capsys.readouterr().err
    far = tmp_path / "far.yaml"
    far.write_text("rules:\n  - {id: gap, kind: min_distance, source: 'state[9]', min: 1}\n")
    assert main(["serve", "--model", str(onnx_export), "--safety", str(far)]) == 2
    assert "'gap': source: expected state[i] with i < 4, got 'state[9]'" in capsys.readouterr().err
    assert main(["serve", "--model", str(onnx_export), "--stale-after", "-1"]) == 2
    assert "watchdog.max_age_s: expected a number > 0" in capsys.readouterr().err


def test_shared_sessions_hold_an_estop_across_replicas(ray_session):
    """Two replicas' session state over one store (no Serve): an e-stop taken by one is applied
    by the other before ``set_stop`` returns; a replica started later (a restart) sees it; last
    actions are shared; a replica that stops answering is dropped after the ack timeout; a lost
    store makes every session answer the stop action (fail closed)."""
    import asyncio

    from vla_ray.serve.sessions import (
        SharedSessions,
        WatchdogSettings,
        new_store_name,
        session_store,
    )

    store = session_store(new_store_name())
    watchdog = WatchdogSettings()

    async def scenario() -> None:
        a, b = (SharedSessions(watchdog, store, True) for _ in range(2))
        a.start(), b.start()
        assert (await a.set_stop("s1", True))["replicas"] == 2
        assert b.stop_reason("s1") == "estop" and b.stop_reason("s2") is None
        later = SharedSessions(watchdog, store, True)  # not following: registered, never acks
        assert later.stop_reason("s1") == "estop"
        answer = await store.set_stop.remote(None, True, ack_timeout=0.3)  # global stop
        assert answer["replicas"] == 2  # `later` did not acknowledge: dropped
        assert a.stop_reason("s2") == "estop" and b.stop_reason("s3") == "estop"
        await b.set_stop(None, False)  # resume all: the global stop and every session
        assert a.stop_reason("s1") is None and b.stop_reason("s1") is None
        await a.set_last_action("s1", np.array([0.25, -0.5], np.float32))
        np.testing.assert_array_equal(await b.last_action("s1"), [0.25, -0.5])
        assert await b.last_action("nobody") is None
        ray_session.kill(store)
        for _ in range(50):
            if a.stop_reason("s1") is not None:
                break
            await asyncio.sleep(0.1)
        assert a.stop_reason("s1") == "session_store_unreachable" and a.stopped("any")
        for s in (a, b):
            s._task.cancel()

    asyncio.run(scenario())
