"""The ROS 2 bridge: its ROS-free logic (topics file, message conversion, rate, smoothing,
staleness, shield) with fake messages and a fake clock; the rclpy node where rclpy imports."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest

from vla_ray.ros2_bridge import (
    BOUNDS_RULE,
    ActionSmoother,
    BridgeConfig,
    BridgeConfigError,
    BridgeCore,
    ControlRate,
    MessageError,
    TopicSpec,
    image_from_msg,
    run_loop,
    vector_from_msg,
)

H, W, S, A, K = 8, 10, 3, 2, 4

SPEC = {
    "inputs": [
        {"name": "image", "shape": ["batch", H, W, 3]},
        {"name": "state", "shape": ["batch", S]},
        {"name": "instruction", "shape": ["batch", 16]},
        {"name": "instruction_mask", "shape": ["batch", 16]},
    ],
    "action": {"dim": A, "chunk_size": K, "low": [-1.0] * A, "high": [1.0] * A},
}

TOPICS = {
    "rate_hz": 10,
    "image": {"topic": "/camera/image_raw", "type": "sensor_msgs/Image"},
    "state": [
        {"topic": "/joint_states", "type": "sensor_msgs/JointState", "names": ["b", "a"]},
        {"topic": "/gripper", "type": "std_msgs/Float32MultiArray", "indices": [1]},
    ],
    "instruction": "reach the red target",
    "action": "/vla/action",
    "max_age_s": 0.25,
}


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakePolicy:
    """Chunk rows k * 0.1 + first state value; records its calls."""

    spec = SPEC

    def __init__(self, value: float | None = None, fail: bool = False) -> None:
        self.calls: list[tuple] = []
        self.value, self.fail = value, fail

    def __call__(self, image, state, instruction):
        self.calls.append((image, state, instruction))
        if self.fail:
            raise RuntimeError("runtime crashed")
        base = float(state[0]) if self.value is None else self.value
        return np.stack([np.full(A, base + 0.1 * k, np.float32) for k in range(K)])


def image_msg(h=H, w=W, encoding="rgb8", step=None, pad=0, fill=None):
    c = {"rgb8": 3, "bgr8": 3, "mono8": 1, "rgba8": 4}[encoding]
    step = step or w * c + pad
    rows = np.zeros((h, step), np.uint8)
    pix = np.arange(h * w * c, dtype=np.uint8).reshape(h, w * c) if fill is None else fill
    rows[:, : w * c] = pix
    return SimpleNamespace(height=h, width=w, encoding=encoding, step=step, data=rows.tobytes())


def joints(**values):
    return SimpleNamespace(
        name=list(values), position=list(values.values()), velocity=[], effort=[]
    )


def feed(core, cfg, a=0.5, b=0.2, grip=(9.0, 0.7)):
    core.on_message("image", cfg.image, image_msg())
    core.on_message("state", cfg.state[0], joints(a=a, b=b))
    core.on_message("state", cfg.state[1], SimpleNamespace(data=list(grip)))


# ---- the topics file ---------------------------------------------------------------------------
def test_topics_file_parses_types_and_defaults(tmp_path):
    path = tmp_path / "topics.yaml"
    import yaml

    path.write_text(yaml.safe_dump(TOPICS))
    cfg = BridgeConfig.load(path)
    assert cfg.image.type == "sensor_msgs/msg/Image"
    assert cfg.state[0] == TopicSpec(
        "/joint_states", "sensor_msgs/msg/JointState", "position", ("b", "a"), None
    )
    assert cfg.state[1].indices == (1,)
    assert cfg.action.type == "std_msgs/msg/Float32MultiArray"  # the default action type
    assert (cfg.rate_hz, cfg.max_age_s, cfg.execute_steps, cfg.smoothing) == (10.0, 0.25, 1, 1.0)
    assert [r for r, _ in cfg.subscriptions()] == ["image", "state", "state"]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"rate_hz": 0}, "rate_hz"),
        ({"image": {"topic": "/c", "type": "sensor_msgs/CompressedImage"}}, "image.type"),
        ({"image": {"topic": "no spaces allowed"}}, "image.topic"),
        (
            {"state": [{"topic": "/j", "type": "sensor_msgs/JointState", "field": "pos"}]},
            "state[0].field",
        ),
        (
            {"state": [{"topic": "/g", "type": "std_msgs/Float32MultiArray", "names": ["a"]}]},
            "state[0].names",
        ),
        (
            {"state": [{"topic": "/g", "type": "std_msgs/Float32MultiArray", "indices": [-1]}]},
            "state[0].indices",
        ),
        ({"instruction_topic": "/vla/instruction"}, "instruction"),
        ({"execute_steps": 0}, "execute_steps"),
        ({"smoothing": 1.5}, "smoothing"),
        ({"serve": {"url": "localhost:8000"}}, "serve.url"),
        ({"colour": "red"}, "<file>.colour"),
        ({"action": {"topic": "/a", "type": "sensor_msgs/JointState"}}, "action.type"),
    ],
)
def test_bad_topics_file_names_the_field(change, field):
    with pytest.raises(BridgeConfigError) as err:
        BridgeConfig.from_dict({**TOPICS, **change})
    assert err.value.field == field
    assert f"topics: {field}: expected" in str(err.value)


def test_topics_must_fit_the_model():
    with pytest.raises(BridgeConfigError, match="state: expected 3 values in all"):
        BridgeConfig.from_dict(
            {**TOPICS, "state": [{"topic": "/j", "type": "sensor_msgs/JointState", "names": ["a"]}]}
        ).check_model(SPEC)
    state_only = {**SPEC, "inputs": [i for i in SPEC["inputs"] if i["name"] != "image"]}
    with pytest.raises(BridgeConfigError, match="image: expected no image topic"):
        BridgeConfig.from_dict(TOPICS).check_model(state_only)


# ---- messages --------------------------------------------------------------------------------
def test_image_encodings_and_row_padding():
    rgb = image_from_msg(image_msg(pad=5))
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    assert rgb[0, 1].tolist() == [3, 4, 5]  # row padding (step > width * 3) dropped
    bgr = image_from_msg(image_msg(encoding="bgr8"))
    assert bgr[0, 1].tolist() == [5, 4, 3]
    mono = image_from_msg(image_msg(encoding="mono8"))
    assert mono[0, 2].tolist() == [2, 2, 2]
    rgba = image_from_msg(image_msg(encoding="rgba8"))
    assert rgba[0, 1].tolist() == [4, 5, 6]


def test_bad_image_messages_name_topic_and_field():
    with pytest.raises(MessageError) as err:
        image_from_msg(_with(image_msg(), encoding="16UC1"), "/cam")
    assert (err.value.topic, err.value.field) == ("/cam", "encoding")
    short = _with(image_msg(), data=b"\0" * 10)
    with pytest.raises(MessageError, match=r"message on /cam: data: expected 8 rows of 30 bytes"):
        image_from_msg(short, "/cam")


def _with(msg, **changes):
    return SimpleNamespace(**{**vars(msg), **changes})


def test_joint_state_order_indices_and_nan():
    spec = TopicSpec("/joint_states", "sensor_msgs/msg/JointState", "position", ("b", "a"))
    assert vector_from_msg(joints(a=1.0, b=2.0, c=3.0), spec).tolist() == [2.0, 1.0]
    with pytest.raises(MessageError) as err:
        vector_from_msg(joints(a=1.0), spec)
    assert (err.value.topic, err.value.field) == ("/joint_states", "name")
    with pytest.raises(MessageError, match="position: expected finite values"):
        vector_from_msg(joints(a=float("nan"), b=0.0), spec)
    arr = TopicSpec("/g", "std_msgs/msg/Float32MultiArray", indices=(2, 0))
    assert vector_from_msg(SimpleNamespace(data=[1.0, 2.0, 3.0]), arr).tolist() == [3.0, 1.0]
    with pytest.raises(MessageError, match="data: expected more than 2 values, got 2"):
        vector_from_msg(SimpleNamespace(data=[1.0, 2.0]), arr)


# ---- rate and smoothing ----------------------------------------------------------------------
def test_control_rate_ticks_on_schedule_and_skips_late_ticks():
    clock = FakeClock()
    rate = ControlRate(10.0, clock)
    assert rate.tick() and not rate.tick()
    assert rate.remaining() == pytest.approx(0.1)
    clock.t += 0.1
    assert rate.tick() and rate.remaining() == pytest.approx(0.1)
    clock.t += 0.15  # a little late: the schedule holds (next tick 0.05 s later)
    assert rate.tick() and rate.remaining() == pytest.approx(0.05)
    clock.t += 0.5  # far behind: one tick, counted as an overrun, no catch-up burst
    assert rate.tick() and not rate.tick()
    assert (rate.ticks, rate.overruns) == (4, 1)


def test_smoother_is_an_exponential_average():
    s = ActionSmoother(0.25)
    assert s(np.array([1.0, -1.0])).tolist() == [1.0, -1.0]
    assert s(np.array([0.0, 1.0])).tolist() == pytest.approx([0.75, -0.5])
    s.reset()
    assert s(np.array([0.0, 1.0])).tolist() == [0.0, 1.0]
    assert ActionSmoother(1.0)(np.array([0.3])).tolist() == pytest.approx([0.3])


# ---- the core --------------------------------------------------------------------------------
def test_core_maps_topics_to_the_model_and_executes_the_chunk():
    clock, policy = FakeClock(), FakePolicy()
    cfg = BridgeConfig.from_dict({**TOPICS, "execute_steps": 2})
    core = BridgeCore(cfg, policy, clock)
    assert core.step().status == "waiting" and not policy.calls
    feed(core, cfg, a=0.5, b=0.2)
    first = core.step()
    image, state, text = policy.calls[0]
    assert image.shape == (H, W, 3) and state.tolist() == pytest.approx([0.2, 0.5, 0.7])
    assert text == "reach the red target"
    assert first.status == "ok" and first.action.tolist() == pytest.approx([0.2, 0.2])
    second = core.step()  # the chunk's second row, no model call
    assert second.action.tolist() == pytest.approx([0.3, 0.3]) and len(policy.calls) == 1
    core.step()
    assert len(policy.calls) == 2


def test_core_resizes_images_to_the_model():
    clock, policy = FakeClock(), FakePolicy()
    cfg = BridgeConfig.from_dict(TOPICS)
    core = BridgeCore(cfg, policy, clock)
    feed(core, cfg)
    core.on_message("image", cfg.image, image_msg(h=16, w=20))
    core.step()
    assert policy.calls[0][0].shape == (H, W, 3)
    strict = BridgeCore(BridgeConfig.from_dict({**TOPICS, "resize": False}), FakePolicy(), clock)
    feed(strict, cfg)
    strict.on_message("image", cfg.image, image_msg(h=16, w=20))
    step = strict.step()
    assert step.status == "message_error" and "height/width: expected 8x10" in step.detail
    assert step.action.tolist() == [0.0, 0.0]


def test_stale_observation_sends_the_stop_action_until_fresh_again():
    clock = FakeClock()
    cfg = BridgeConfig.from_dict({**TOPICS, "safety": {"rules": [], "stop_action": [0.0, -0.5]}})
    core = BridgeCore(cfg, FakePolicy(), clock)
    feed(core, cfg)
    assert core.step().status == "ok"
    clock.t += 0.2
    core.on_message("image", cfg.image, image_msg())
    core.on_message("state", cfg.state[1], SimpleNamespace(data=[0.0, 0.1]))
    clock.t += 0.1  # the joint states are now 0.3 s old
    step = core.step()
    assert step.status == "stale" and "/joint_states" in step.detail
    assert "/camera/image_raw" not in step.detail
    assert step.action.tolist() == [0.0, -0.5]
    feed(core, cfg)
    assert core.step().status == "ok"
    assert core.stats.ticks == {"ok": 2, "stale": 1}


def test_every_action_passes_the_shield_and_the_smoother():
    clock = FakeClock()
    rules = {"rules": [{"id": "slow", "kind": "max_delta", "mode": "clamp", "max_delta": 0.3}]}
    cfg = BridgeConfig.from_dict({**TOPICS, "safety": rules, "smoothing": 0.5})
    core = BridgeCore(cfg, FakePolicy(value=5.0), clock)
    feed(core, cfg)
    out = [core.step().action.tolist() for _ in range(3)]
    # smoothed 5.0 -> shield: rate limit 0.3 from the neutral 0, then the model's bounds
    assert out[0] == pytest.approx([0.3, 0.3])
    assert out[1] == pytest.approx([0.6, 0.6]) and out[2] == pytest.approx([0.9, 0.9])
    assert core.stats.interventions["slow"] == 3
    clock.t += 0.05
    out = [core.step().action.tolist() for _ in range(2)]
    assert out[-1] == pytest.approx([1.0, 1.0])  # the bounds always hold
    assert core.stats.interventions[BOUNDS_RULE] >= 1


def test_model_error_and_reject_rule_send_the_stop_action():
    clock = FakeClock()
    cfg = BridgeConfig.from_dict(TOPICS)
    core = BridgeCore(cfg, FakePolicy(fail=True), clock)
    feed(core, cfg)
    step = core.step()
    assert step.status == "model_error" and "runtime crashed" in step.detail
    assert step.action.tolist() == [0.0, 0.0]
    reject = {
        "rules": [
            {"id": "box", "kind": "action_bounds", "mode": "reject", "low": -0.1, "high": 0.1}
        ]
    }
    core = BridgeCore(BridgeConfig.from_dict({**TOPICS, "safety": reject}), FakePolicy(0.5), clock)
    feed(core, cfg)
    step = core.step()
    assert step.status == "rejected" and "'box'" in step.detail
    assert core.stats.interventions == {"box": 1}


def test_instruction_topic_waits_for_an_instruction_and_never_goes_stale():
    clock, policy = FakeClock(), FakePolicy()
    cfg = BridgeConfig.from_dict(
        {**{k: v for k, v in TOPICS.items() if k != "instruction"}, "instruction_topic": "/task"}
    )
    core = BridgeCore(cfg, policy, clock)
    feed(core, cfg)
    assert core.step().status == "waiting"
    core.on_message("instruction", cfg.instruction_topic, SimpleNamespace(data="open the drawer"))
    clock.t += 1.0
    feed(core, cfg)
    assert core.step().status == "ok" and policy.calls[-1][2] == "open the drawer"


def test_run_loop_publishes_at_the_control_rate_with_a_fake_clock():
    clock = FakeClock()
    cfg = BridgeConfig.from_dict({**TOPICS, "rate_hz": 20, "max_age_s": 10.0})
    core = BridgeCore(cfg, FakePolicy(0.1), clock)
    feed(core, cfg)
    rate, sent, start = ControlRate(cfg.rate_hz, clock), [], clock.t

    def wait(seconds):
        clock.t += seconds

    run_loop(core, rate, lambda a: sent.append(clock.t), wait, lambda: clock.t - start < 0.975)
    assert len(sent) == 20
    assert np.diff(sent) == pytest.approx([0.05] * 19)


# ---- the node --------------------------------------------------------------------------------
@pytest.mark.skipif(
    importlib.util.find_spec("rclpy") is None, reason="rclpy does not import (no ROS 2 install)"
)
def test_node_subscribes_and_publishes_shielded_actions():  # pragma: no cover - needs ROS 2
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import Float32MultiArray

    from vla_ray.ros2_node import make_node

    rclpy.init()
    try:
        cfg = BridgeConfig.from_dict({**TOPICS, "max_age_s": 5.0})
        node = make_node(cfg, FakePolicy(value=3.0))
        peer = rclpy.create_node("peer")
        got = []
        peer.create_subscription(Float32MultiArray, "/vla/action", lambda m: got.append(m), 10)
        img_pub = peer.create_publisher(Image, "/camera/image_raw", 10)
        joint_pub = peer.create_publisher(JointState, "/joint_states", 10)
        grip_pub = peer.create_publisher(Float32MultiArray, "/gripper", 10)
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.add_node(peer)
        raw = image_msg()
        img = Image(height=H, width=W, encoding="rgb8", step=raw.step, data=raw.data)
        for _ in range(50):
            img_pub.publish(img)
            joint_pub.publish(JointState(name=["a", "b"], position=[0.1, 0.2]))
            grip_pub.publish(Float32MultiArray(data=[0.0, 0.3]))
            executor.spin_once(timeout_sec=0.02)
            step = node.core.step()
            if step.action is not None:
                node.publish_action(step.action)
            executor.spin_once(timeout_sec=0.02)
            if got:
                break
        assert got and list(got[0].data) == pytest.approx([1.0, 1.0])  # 3.0 clamped
    finally:
        rclpy.shutdown()


def test_exported_onnx_policy_drives_the_core(tiny_export):
    """The bridge's in-process policy on a real ONNX export: its chunk equals the export's own
    runner on the same inputs, and the published action is that chunk's first row, shielded.
    (``tiny_export`` is the session's export, shared with the Serve and export tests.)"""
    from vla_ray.ros2_bridge import ExportedPolicy
    from vla_ray.runtime import load_export_tokenizer, onnx_runner, read_spec

    out = tiny_export
    policy = ExportedPolicy(out)
    shapes = {i["name"]: i["shape"] for i in policy.spec["inputs"]}
    h, w = shapes["image"][1:3]
    s = int(shapes["state"][1])
    cfg = BridgeConfig.from_dict(
        {
            "image": "/cam",
            "state": {"topic": "/s", "type": "std_msgs/Float32MultiArray"},
            "instruction": "reach the red target",
            "action": "/a",
        }
    )
    core = BridgeCore(cfg, policy, FakeClock())
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    state = rng.normal(size=s).astype(np.float32)
    core.on_message("image", cfg.image, image_msg(h, w, fill=pixels.reshape(h, w * 3)))
    core.on_message("state", cfg.state[0], SimpleNamespace(data=state.tolist()))
    step = core.step()

    folder = out / "onnx"
    spec = read_spec(folder)
    ids = load_export_tokenizer(folder / "tokenizer")(
        "reach the red target", add_special_tokens=False
    )
    L = spec["instruction"]["max_tokens"]
    row, mask = np.zeros((1, L), np.int64), np.zeros((1, L), np.int64)
    row[0, : len(ids["input_ids"])], mask[0, : len(ids["input_ids"])] = ids["input_ids"], 1
    chunk = onnx_runner(folder, spec)(
        {"image": pixels[None], "state": state[None], "instruction": row, "instruction_mask": mask}
    )[0]
    low, high = np.array(spec["action"]["low"]), np.array(spec["action"]["high"])
    assert step.status == "ok"
    assert step.action == pytest.approx(np.clip(chunk[0], low, high), abs=1e-6)
    assert np.abs(chunk[0]).max() > 1.0  # tiny_vla's first dim is past the bound: clamped


def test_cli_checks_the_topics_file_and_the_policy_source(tmp_path, capsys):
    import json

    from vla_ray.cli import main

    path = tmp_path / "topics.json"
    path.write_text(json.dumps({**TOPICS, "rate_hz": -1}))
    assert main(["ros2-bridge", "--model", str(tmp_path), "--config", str(path)]) == 2
    assert "topics: rate_hz: expected a number > 0.0, got -1" in capsys.readouterr().err
    path.write_text(json.dumps(TOPICS))
    assert main(["ros2-bridge", "--config", str(path)]) == 2
    assert "--model / serve: expected exactly one policy" in capsys.readouterr().err
    if importlib.util.find_spec("rclpy") is None:
        assert main(["ros2-bridge", "--model", str(tmp_path), "--config", str(path)]) == 2
        assert "rclpy does not import" in capsys.readouterr().err


def test_serve_policy_posts_each_observation(monkeypatch):
    """``serve: {url}``: the spec from GET /v1/spec, one POST /v1/act per model call (a PNG
    image, the state, the instruction, the API key from the named variable); an error answer
    is a model error (stop action)."""
    import base64
    import io

    from PIL import Image

    import vla_ray.serve.client as client
    from vla_ray.ros2_bridge import ServePolicy

    calls = []

    def fake_request(url, body=None, api_key=None, timeout=30.0):
        calls.append((url, body, api_key))
        if url.endswith("/v1/spec"):
            return 200, SPEC
        if body["instruction"] == "fail":
            return 503, {"detail": "overloaded"}
        return 200, {"actions": [[0.25, -0.5]] * K}

    monkeypatch.setattr(client, "request", fake_request)
    monkeypatch.setenv("VLA_KEY", "secret")
    policy = ServePolicy("http://robot:8000/", api_key_env="VLA_KEY")
    cfg = BridgeConfig.from_dict(TOPICS)
    core = BridgeCore(cfg, policy, FakeClock())
    feed(core, cfg)
    assert core.step().action.tolist() == [0.25, -0.5]
    url, body, key = calls[-1]
    assert (url, key) == ("http://robot:8000/v1/act", "secret")
    assert body["state"] == pytest.approx([0.2, 0.5, 0.7])
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image"]))))
    np.testing.assert_array_equal(img, image_from_msg(image_msg()))
    failing = BridgeCore(
        BridgeConfig.from_dict({**TOPICS, "instruction": "fail"}), policy, FakeClock()
    )
    feed(failing, cfg)
    step = failing.step()
    assert step.status == "model_error" and "answered 503: overloaded" in step.detail
