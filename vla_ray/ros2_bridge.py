"""The ROS 2 bridge without ROS: topic mapping, message conversion, rate, smoothing, staleness.

``vla-ray ros2-bridge --model DIR --config topics.yaml`` runs a node (``vla_ray.ros2_node``,
rclpy) whose every decision is made here, so that it is tested without a ROS install:

- :class:`BridgeConfig`: the topics file, validated (:class:`BridgeConfigError` names the field,
  what was expected and what was given);
- ``image_from_msg`` / ``vector_from_msg`` / ``text_from_msg``: ``sensor_msgs/Image``,
  ``sensor_msgs/JointState``, ``std_msgs/Float32MultiArray`` (or ``Float64MultiArray``) and
  ``std_msgs/String`` messages (any object with those fields) to observation arrays
  (:class:`MessageError` names the topic and field of a bad message);
- :class:`ControlRate`: a fixed control rate over an injected clock (late ticks are counted
  and skipped, never bunched);
- :class:`ActionSmoother`: exponential smoothing of the published actions;
- :class:`BridgeCore`: the latest message of each topic, the policy call, the action chunk
  executed row by row, and the safety shield (``vla_ray.safety``'s rules, plus the model's
  action bounds) on every action published. An observation older than ``max_age_s``, a model
  error or a ``reject`` rule publishes the stop action instead.

The policy is an exported ``vla/`` model run in-process (:class:`ExportedPolicy`, ONNX or
OpenVINO through ``vla_ray.runtime``) or a ``vla-ray serve`` endpoint (:class:`ServePolicy`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vla_ray.config import ConfigError
from vla_ray.safety import RuleSet, SafetyRejected, load_rules_file

# message types each role accepts (``pkg/Type`` is read as ``pkg/msg/Type``)
IMAGE_TYPES = ("sensor_msgs/msg/Image",)
STATE_TYPES = (
    "sensor_msgs/msg/JointState",
    "std_msgs/msg/Float32MultiArray",
    "std_msgs/msg/Float64MultiArray",
)
TEXT_TYPES = ("std_msgs/msg/String",)
ACTION_TYPES = ("std_msgs/msg/Float32MultiArray", "std_msgs/msg/Float64MultiArray")
JOINT_FIELDS = ("position", "velocity", "effort")
# sensor_msgs/Image encodings read: channels and their order
ENCODINGS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
_TOPIC = re.compile(r"^[~/]?[A-Za-z_][\w/]*$")
BOUNDS_RULE = "model_bounds"  # the rule appended to every rule set: the model's action bounds


class BridgeConfigError(ConfigError):
    """The topics file is invalid: ``field``, ``expected`` and ``given`` are in the message."""

    def __init__(self, field: str, expected: str, given: Any):
        super().__init__(f"topics: {field}: expected {expected}, got {given!r}")
        self.field, self.expected, self.given = field, expected, given


class MessageError(ValueError):
    """A received message cannot become an observation (topic, field, expected, given)."""

    def __init__(self, topic: str, field: str, expected: str, given: Any):
        super().__init__(f"message on {topic}: {field}: expected {expected}, got {given}")
        self.topic, self.field, self.expected, self.given = topic, field, expected, given


# ---- the topics file -----------------------------------------------------------------------------
def _msg_type(value: Any, allowed: tuple[str, ...], where: str) -> str:
    if isinstance(value, str) and value.count("/") == 1:
        pkg, name = value.split("/")
        value = f"{pkg}/msg/{name}"
    if value not in allowed:
        raise BridgeConfigError(where, f"one of {', '.join(allowed)}", value)
    return value


def _check_keys(data: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise BridgeConfigError(where, f"a mapping with keys {', '.join(allowed)}", data)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise BridgeConfigError(f"{where}.{unknown[0]}", f"one of {', '.join(allowed)}", "unknown")
    return data


def _number(data: dict[str, Any], key: str, where: str, default: float, low: float = 0.0) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > low:
        raise BridgeConfigError(f"{where}.{key}" if where else key, f"a number > {low}", value)
    if not math.isfinite(value):
        raise BridgeConfigError(f"{where}.{key}" if where else key, "a finite number", value)
    return float(value)


@dataclass(frozen=True)
class TopicSpec:
    """One subscribed or published topic: its name and message type; for state topics the
    JointState field and joint order (``names``) or the array elements (``indices``) read."""

    topic: str
    type: str
    field: str = "position"
    names: tuple[str, ...] | None = None
    indices: tuple[int, ...] | None = None

    @classmethod
    def from_dict(cls, data: Any, allowed: tuple[str, ...], where: str) -> TopicSpec:
        if isinstance(data, str):
            data = {"topic": data}
        data = _check_keys(data, ("topic", "type", "field", "names", "indices"), where)
        topic = data.get("topic")
        if not isinstance(topic, str) or not _TOPIC.match(topic):
            raise BridgeConfigError(
                f"{where}.topic", "a ROS topic name such as /joint_states", topic
            )
        msg_type = _msg_type(data.get("type", allowed[0]), allowed, f"{where}.type")
        joint = msg_type.endswith("/JointState")
        fld = data.get("field", "position")
        if fld not in JOINT_FIELDS:
            raise BridgeConfigError(f"{where}.field", f"one of {', '.join(JOINT_FIELDS)}", fld)
        names = data.get("names")
        if names is not None:
            if not joint:
                raise BridgeConfigError(f"{where}.names", "names only on a JointState", names)
            if (
                not isinstance(names, list)
                or not names
                or not all(isinstance(n, str) for n in names)
            ):
                raise BridgeConfigError(f"{where}.names", "a non-empty list of joint names", names)
            names = tuple(names)
        indices = data.get("indices")
        if indices is not None:
            ok = (
                isinstance(indices, list)
                and indices
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)
            )
            if not ok:
                raise BridgeConfigError(
                    f"{where}.indices", "a non-empty list of integers >= 0", indices
                )
            indices = tuple(indices)
        return cls(topic, msg_type, fld, names, indices)


@dataclass(frozen=True)
class BridgeConfig:
    """The topics file of ``vla-ray ros2-bridge`` (YAML or JSON)::

    rate_hz: 10                    # actions published per second
    image: /camera/color/image_raw # sensor_msgs/Image (the model's one camera)
    state:                         # concatenated in this order into the model's state
      - {topic: /joint_states, type: sensor_msgs/JointState, field: position,
         names: [shoulder, elbow]}
      - {topic: /gripper, type: std_msgs/Float32MultiArray, indices: [0]}
    instruction: pick up the red cube   # a fixed instruction, or
    # instruction_topic: /vla/instruction  (std_msgs/String; its latest message)
    action: {topic: /vla/action, type: std_msgs/Float32MultiArray}
    max_age_s: 0.5        # an older observation is stale: the stop action is sent
    execute_steps: 1      # rows of each action chunk sent before the next model call
    smoothing: 0.5        # weight of the new action (1: none)
    resize: true          # resize camera images to the model's size (else: an error)
    safety: envs/safety/langreach.yaml   # a rules file or its mapping (vla_ray.safety)
    serve: {url: http://127.0.0.1:8000, api_key_env: VLA_API_KEY}   # instead of --model
    """

    action: TopicSpec
    rate_hz: float = 10.0
    image: TopicSpec | None = None
    state: tuple[TopicSpec, ...] = ()
    instruction: str | None = None
    instruction_topic: TopicSpec | None = None
    max_age_s: float = 0.5
    execute_steps: int = 1
    smoothing: float = 1.0
    resize: bool = True
    safety: dict[str, Any] | None = None
    serve: dict[str, Any] | None = None

    KEYS = (
        "rate_hz",
        "image",
        "state",
        "instruction",
        "instruction_topic",
        "action",
        "max_age_s",
        "execute_steps",
        "smoothing",
        "resize",
        "safety",
        "serve",
    )

    @classmethod
    def from_dict(cls, data: Any, base: Path | None = None) -> BridgeConfig:
        """Validated settings; ``base``: the folder relative rules files are read from."""
        data = _check_keys(data, cls.KEYS, "<file>")
        if "action" not in data:
            raise BridgeConfigError("action", "the topic actions are published on", None)
        action = TopicSpec.from_dict(data["action"], ACTION_TYPES, "action")
        image = None
        if data.get("image") is not None:
            image = TopicSpec.from_dict(data["image"], IMAGE_TYPES, "image")
        states = data.get("state") or []
        if not isinstance(states, list):
            states = [states]
        state = tuple(
            TopicSpec.from_dict(s, STATE_TYPES, f"state[{i}]") for i, s in enumerate(states)
        )
        instruction, topic = data.get("instruction"), data.get("instruction_topic")
        if (instruction is None) == (topic is None):
            raise BridgeConfigError(
                "instruction",
                "exactly one of instruction (text) or instruction_topic",
                data.get("instruction", data.get("instruction_topic")),
            )
        if instruction is not None and (
            not isinstance(instruction, str) or not instruction.strip()
        ):
            raise BridgeConfigError("instruction", "the task in words", instruction)
        itopic = (
            None if topic is None else TopicSpec.from_dict(topic, TEXT_TYPES, "instruction_topic")
        )
        if image is None and not state:
            raise BridgeConfigError("image/state", "at least one observation topic", None)
        steps = data.get("execute_steps", 1)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise BridgeConfigError("execute_steps", "an integer >= 1", steps)
        smoothing = _number(data, "smoothing", "", 1.0)
        if smoothing > 1:
            raise BridgeConfigError("smoothing", "a weight in (0, 1] (1: no smoothing)", smoothing)
        resize = data.get("resize", True)
        if not isinstance(resize, bool):
            raise BridgeConfigError("resize", "true or false", resize)
        safety = data.get("safety")
        if isinstance(safety, str):
            path = Path(safety)
            if base is not None and not path.is_absolute() and (base / path).is_file():
                path = base / path
            safety = load_rules_file(path)
        if safety is not None and not isinstance(safety, dict):
            raise BridgeConfigError("safety", "a rules file path or its mapping", safety)
        serve = data.get("serve")
        if serve is not None:
            serve = _check_keys(serve, ("url", "api_key_env", "timeout_s"), "serve")
            if not isinstance(serve.get("url"), str) or not serve["url"].startswith("http"):
                raise BridgeConfigError("serve.url", "an http(s) URL", serve.get("url"))
            _number(serve, "timeout_s", "serve", 5.0)
        return cls(
            action=action,
            rate_hz=_number(data, "rate_hz", "", 10.0),
            image=image,
            state=state,
            instruction=instruction,
            instruction_topic=itopic,
            max_age_s=_number(data, "max_age_s", "", 0.5),
            execute_steps=steps,
            smoothing=smoothing,
            resize=resize,
            safety=safety,
            serve=serve,
        )

    @classmethod
    def load(cls, path: str | Path) -> BridgeConfig:
        """The topics file at ``path`` (``.yaml``/``.yml``/``.json``)."""
        path = Path(path)
        if not path.is_file():
            raise BridgeConfigError("path", "an existing topics file", str(path))
        text = path.read_text()
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as err:
            raise BridgeConfigError(str(path), "valid YAML/JSON", type(err).__name__) from None
        return cls.from_dict(data, base=path.parent)

    def subscriptions(self) -> list[tuple[str, TopicSpec]]:
        """(role, topic) of every subscription: ``image``, ``state``, ``instruction``."""
        out = [("image", self.image)] if self.image else []
        out += [("state", s) for s in self.state]
        if self.instruction_topic is not None:
            out.append(("instruction", self.instruction_topic))
        return out

    def check_model(self, spec: dict[str, Any]) -> None:
        """The model (an export ``spec.json``) takes the observations the topics provide."""
        names = {i["name"]: i["shape"] for i in spec["inputs"]}
        if ("image" in names) != (self.image is not None):
            want = "an image topic" if "image" in names else "no image topic (state-only model)"
            raise BridgeConfigError("image", want, self.image and self.image.topic)
        if ("state" in names) != bool(self.state):
            want = "state topics" if "state" in names else "no state topics (the model takes none)"
            raise BridgeConfigError("state", want, [s.topic for s in self.state])
        dim = int(names["state"][1]) if "state" in names else 0
        fixed = [len(s.names or s.indices or ()) for s in self.state]
        if self.state and all(fixed) and sum(fixed) != dim:
            raise BridgeConfigError(
                "state", f"{dim} values in all (the model's state_dim)", f"{sum(fixed)} selected"
            )


# ---- messages -> observations --------------------------------------------------------------------
def image_from_msg(msg: Any, topic: str = "image") -> np.ndarray:
    """A ``sensor_msgs/Image`` as uint8 RGB (H, W, 3); ``mono8`` is repeated over 3 channels."""
    enc = str(getattr(msg, "encoding", "")).lower()
    if enc not in ENCODINGS:
        raise MessageError(topic, "encoding", f"one of {', '.join(ENCODINGS)}", repr(enc))
    c, h, w = ENCODINGS[enc], int(msg.height), int(msg.width)
    step = int(getattr(msg, "step", 0) or w * c)
    raw = np.frombuffer(bytes(msg.data), dtype=np.uint8)
    if h <= 0 or w <= 0 or step < w * c or raw.size < step * h:
        raise MessageError(
            topic, "data", f"{h} rows of {step} bytes ({w}x{c} used)", f"{raw.size} bytes"
        )
    img = raw[: step * h].reshape(h, step)[:, : w * c].reshape(h, w, c)
    if enc.startswith("bgr"):
        img = img[..., [2, 1, 0]]
    elif c == 4:
        img = img[..., :3]
    elif c == 1:
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def fit_image(img: np.ndarray, size: tuple[int, int], resize: bool, topic: str) -> np.ndarray:
    """``img`` at the model's (H, W): resized (bilinear) when ``resize``, else checked."""
    if img.shape[:2] == tuple(size):
        return img
    if not resize:
        got = f"{img.shape[0]}x{img.shape[1]}"
        raise MessageError(topic, "height/width", f"{size[0]}x{size[1]} (resize: false)", got)
    from PIL import Image

    out = Image.fromarray(img).resize((int(size[1]), int(size[0])), Image.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


def vector_from_msg(msg: Any, spec: TopicSpec) -> np.ndarray:
    """The float32 values a state topic contributes (see :class:`TopicSpec`); NaN is refused."""
    if spec.type.endswith("/JointState"):
        values = list(getattr(msg, spec.field))
        if spec.names is not None:
            have = list(msg.name)
            missing = [n for n in spec.names if n not in have]
            if missing:
                raise MessageError(spec.topic, "name", f"joints {list(spec.names)}", have)
            if len(values) != len(have):
                raise MessageError(
                    spec.topic, spec.field, f"{len(have)} values (one per name)", len(values)
                )
            values = [values[have.index(n)] for n in spec.names]
        out = np.asarray(values, dtype=np.float32)
        where = spec.field
    else:
        out, where = np.asarray(list(msg.data), dtype=np.float32), "data"
    if spec.indices is not None:
        if max(spec.indices) >= out.size:
            raise MessageError(spec.topic, where, f"more than {max(spec.indices)} values", out.size)
        out = out[list(spec.indices)]
    if not np.all(np.isfinite(out)):
        raise MessageError(spec.topic, where, "finite values", out.tolist())
    return out


def text_from_msg(msg: Any, topic: str = "instruction") -> str:
    """A ``std_msgs/String``'s text; an empty one is refused."""
    text = str(getattr(msg, "data", ""))
    if not text.strip():
        raise MessageError(topic, "data", "the task in words", repr(text))
    return text


# ---- rate and smoothing --------------------------------------------------------------------------
class ControlRate:
    """Ticks every ``1 / rate_hz`` seconds of ``clock``. A tick that comes more than a period
    late is counted in ``overruns`` and the schedule restarts from it (no burst of catch-up
    ticks)."""

    def __init__(self, rate_hz: float, clock: Callable[[], float]):
        self.period, self.clock = 1.0 / float(rate_hz), clock
        self.next_at: float | None = None
        self.ticks = self.overruns = 0

    def remaining(self) -> float:
        """Seconds until the next tick is due (0 when it is)."""
        return 0.0 if self.next_at is None else max(0.0, self.next_at - self.clock())

    def tick(self) -> bool:
        """Take the tick if it is due (True); call again after ``remaining()`` seconds."""
        now = self.clock()
        if self.next_at is not None and now < self.next_at:
            return False
        if self.next_at is None or now - self.next_at >= self.period:
            if self.next_at is not None:
                self.overruns += 1
            self.next_at = now + self.period
        else:
            self.next_at += self.period
        self.ticks += 1
        return True


class ActionSmoother:
    """``out = alpha * action + (1 - alpha) * previous out`` (``alpha = 1``: unchanged)."""

    def __init__(self, alpha: float):
        self.alpha, self.last = float(alpha), None

    def __call__(self, action: np.ndarray) -> np.ndarray:
        action = np.asarray(action, np.float32)
        if self.last is not None and self.alpha < 1.0:
            action = (self.alpha * action + (1.0 - self.alpha) * self.last).astype(np.float32)
        self.last = action
        return action

    def reset(self) -> None:
        self.last = None


# ---- policies ------------------------------------------------------------------------------------
class Policy(Protocol):
    """An action chunk (K, A) for one observation; ``spec``: the model's export spec."""

    spec: dict[str, Any]

    def __call__(
        self, image: np.ndarray | None, state: np.ndarray | None, instruction: str
    ) -> np.ndarray: ...


class ExportedPolicy:
    """An exported model run in this process: an export root (its ``onnx/`` or ``openvino/``
    folder) or one ONNX-family / OpenVINO format folder."""

    def __init__(self, model: str | Path, backend: str = "onnx", threads: int = 1):
        from vla_ray.runtime import (
            ONNX_FAMILY,
            SPEC_NAME,
            SUMMARY_NAME,
            OpenVINORunner,
            load_export_tokenizer,
            onnx_runner,
            read_spec,
        )

        if backend not in ("onnx", "openvino"):
            raise BridgeConfigError("backend", "onnx or openvino", backend)
        folder = Path(model)
        if (folder / SUMMARY_NAME).is_file():
            folder = folder / backend
        if not (folder / SPEC_NAME).is_file():
            raise BridgeConfigError(
                "model", f"an export folder with {backend}/{SPEC_NAME} (vla-ray export)", str(model)
            )
        self.spec = read_spec(folder)
        fmt = self.spec["format"]
        want = ONNX_FAMILY if backend == "onnx" else ("openvino",)
        if fmt not in want:
            raise BridgeConfigError("model", f"a {' or '.join(want)} export", fmt)
        if fmt == "openvino":
            self.runner = OpenVINORunner(folder / self.spec["model_file"], threads=threads)
        else:
            self.runner = onnx_runner(folder, self.spec, threads=threads)
        self.tokenizer = load_export_tokenizer(folder / self.spec["instruction"]["tokenizer"])
        self.max_tokens = int(self.spec["instruction"]["max_tokens"])
        shapes = {i["name"]: i["shape"] for i in self.spec["inputs"]}
        self.noise = int(shapes["noise"][1]) if "noise" in shapes else None
        self._tokens: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _instruction(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        if text not in self._tokens:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > self.max_tokens:
                raise MessageError(
                    "instruction", "data", f"at most {self.max_tokens} tokens", len(ids)
                )
            row = np.zeros((1, self.max_tokens), np.int64)
            mask = np.zeros((1, self.max_tokens), np.int64)
            row[0, : len(ids)], mask[0, : len(ids)] = ids, 1
            self._tokens = {text: (row, mask)}  # the instruction rarely changes: keep the last
        return self._tokens[text]

    def __call__(
        self, image: np.ndarray | None, state: np.ndarray | None, instruction: str
    ) -> np.ndarray:
        ids, mask = self._instruction(instruction)
        inputs = {"instruction": ids, "instruction_mask": mask}
        if image is not None:
            inputs["image"] = np.ascontiguousarray(image, np.uint8)[None]
        if state is not None:
            inputs["state"] = np.asarray(state, np.float32)[None]
        if self.noise is not None:
            inputs["noise"] = np.zeros((1, self.noise), np.float32)
        return np.asarray(self.runner(inputs))[0]


class ServePolicy:
    """A ``vla-ray serve`` endpoint: ``POST /v1/act`` per observation (the server's own shield
    applies too); the spec comes from ``GET /v1/spec``."""

    def __init__(self, url: str, api_key_env: str | None = None, timeout_s: float = 5.0):
        from vla_ray.serve.client import request

        self.url, self.timeout = url.rstrip("/"), float(timeout_s)
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self._request = request
        status, spec = request(f"{self.url}/v1/spec", api_key=self.api_key, timeout=self.timeout)
        if status != 200:
            raise BridgeConfigError("serve.url", "an endpoint answering GET /v1/spec", status)
        self.spec = spec

    def __call__(
        self, image: np.ndarray | None, state: np.ndarray | None, instruction: str
    ) -> np.ndarray:
        from vla_ray.serve.client import encode_image

        body: dict[str, Any] = {"instruction": instruction}
        if image is not None:
            body["image"] = encode_image(image)
        if state is not None:
            body["state"] = [float(x) for x in state]
        status, answer = self._request(
            f"{self.url}/v1/act", body, api_key=self.api_key, timeout=self.timeout
        )
        if status != 200:
            raise RuntimeError(f"serve: /v1/act answered {status}: {answer.get('detail')}")
        return np.asarray(answer["actions"], np.float32)


# ---- the bridge ----------------------------------------------------------------------------------
@dataclass
class Step:
    """One control tick's outcome: the action to publish (None: publish nothing) and why."""

    action: np.ndarray | None
    status: str  # ok | waiting | stale | message_error | model_error | rejected
    detail: str = ""


@dataclass
class BridgeStats:
    """Counts since the bridge started (``status`` of every tick, model calls, interventions)."""

    ticks: dict[str, int] = field(default_factory=dict)
    model_calls: int = 0
    interventions: dict[str, int] = field(default_factory=dict)


class BridgeCore:
    """Latest messages in, one shielded action out per control tick (see the module docstring).

    ``clock``: seconds (the node passes its ROS clock; tests a fake one)."""

    def __init__(self, config: BridgeConfig, policy: Policy, clock: Callable[[], float]):
        self.config, self.policy, self.clock = config, policy, clock
        spec = policy.spec
        config.check_model(spec)
        shapes = {i["name"]: i["shape"] for i in spec["inputs"]}
        self.image_size = tuple(shapes["image"][1:3]) if "image" in shapes else None
        self.state_dim = int(shapes["state"][1]) if "state" in shapes else 0
        act = spec["action"]
        self.action_dim = int(act["dim"])
        low, high = np.asarray(act["low"], np.float64), np.asarray(act["high"], np.float64)
        rules = dict(config.safety or {"rules": []})
        rules["rules"] = [
            *(rules.get("rules") or []),
            {"id": BOUNDS_RULE, "kind": "action_bounds", "mode": "clamp"},
        ]
        self.shield = RuleSet.from_dict(rules, self.action_dim, low, high)
        self.smoother = ActionSmoother(config.smoothing)
        self.stats = BridgeStats()
        self._latest: dict[str, tuple[Any, float]] = {}  # topic -> (converted value, time)
        self._instruction: str | None = config.instruction
        self._queue: list[np.ndarray] = []
        self._previous: np.ndarray | None = None
        self._error: MessageError | None = None

    # -- messages --
    def on_message(self, role: str, spec: TopicSpec, msg: Any) -> None:
        """Convert and keep ``msg`` (a bad one is remembered: the next tick sends the stop
        action and names it)."""
        try:
            if role == "image":
                img = image_from_msg(msg, spec.topic)
                value: Any = fit_image(img, self.image_size, self.config.resize, spec.topic)
            elif role == "state":
                value = vector_from_msg(msg, spec)
            elif role == "instruction":
                self._instruction = text_from_msg(msg, spec.topic)
                value = self._instruction
            else:
                raise ValueError(f"role: expected image, state or instruction, got {role!r}")
        except MessageError as err:
            self._error = err
            return
        self._latest[spec.topic] = (value, self.clock())

    def observation(self) -> tuple[np.ndarray | None, np.ndarray | None] | Step:
        """(image, state) of the latest messages, or the Step to take instead."""
        now, missing, stale = self.clock(), [], []
        for role, spec in self.config.subscriptions():
            if spec.topic not in self._latest:
                missing.append(spec.topic)
            # an instruction holds until the next one; sensors go stale
            elif (
                role != "instruction" and now - self._latest[spec.topic][1] > self.config.max_age_s
            ):
                stale.append(f"{spec.topic} ({now - self._latest[spec.topic][1]:.3f} s old)")
        if missing:
            if self._previous is None:  # nothing sent yet: wait for the first messages
                return Step(None, "waiting", f"no message yet on {', '.join(missing)}")
            stale += [f"{t} (none)" for t in missing]
        if stale:
            return self._stop(
                "stale", f"older than max_age_s={self.config.max_age_s}: " + ", ".join(stale)
            )
        image = self._latest[self.config.image.topic][0] if self.config.image else None
        state = None
        if self.config.state:
            state = np.concatenate([self._latest[s.topic][0] for s in self.config.state])
            if state.size != self.state_dim:
                err = MessageError(
                    "+".join(s.topic for s in self.config.state),
                    "state",
                    f"{self.state_dim} values in all (the model's state_dim)",
                    state.size,
                )
                return self._stop("message_error", str(err))
        return image, state

    # -- ticks --
    def _stop(self, status: str, detail: str) -> Step:
        self._queue.clear()
        self.smoother.reset()
        action = self.shield.stop_action.copy()
        self._previous = action
        return self._count(Step(action, status, detail))

    def _count(self, step: Step) -> Step:
        self.stats.ticks[step.status] = self.stats.ticks.get(step.status, 0) + 1
        return step

    def step(self) -> Step:
        """The action for this control tick."""
        if self._error is not None:
            err, self._error = self._error, None
            return self._stop("message_error", str(err))
        obs = self.observation()
        if isinstance(obs, Step):
            return obs if obs.status != "waiting" else self._count(obs)
        image, state = obs
        if not self._queue:
            try:
                chunk = np.asarray(self.policy(image, state, self._instruction), np.float32)
                chunk = chunk.reshape(-1, self.action_dim)
            except Exception as err:
                return self._stop("model_error", f"{type(err).__name__}: {err}")
            self.stats.model_calls += 1
            if not np.all(np.isfinite(chunk)):
                return self._stop("model_error", "the model returned non-finite actions")
            self._queue = list(chunk[: self.config.execute_steps])
        action = self.smoother(self._queue.pop(0))
        try:
            result = self.shield.apply(action[None], state, None, self._previous)
        except SafetyRejected as err:
            self.stats.interventions[err.rule] = self.stats.interventions.get(err.rule, 0) + 1
            return self._stop("rejected", str(err))
        for rule, n in result.counts.items():
            if n:
                self.stats.interventions[rule] = self.stats.interventions.get(rule, 0) + n
        self._previous = result.actions[0]
        return self._count(Step(result.actions[0].copy(), "ok"))


def run_loop(
    core: BridgeCore,
    rate: ControlRate,
    publish: Callable[[np.ndarray], None],
    wait: Callable[[float], None],
    running: Callable[[], bool],
) -> None:
    """The control loop: ``wait(seconds)`` until each tick (the node spins ROS callbacks
    meanwhile), then publish the tick's action (when there is one)."""
    while running():
        if not rate.tick():
            wait(rate.remaining())
            continue
        step = core.step()
        if step.action is not None:
            publish(step.action)


def config_summary(config: BridgeConfig) -> dict[str, Any]:
    """The settings as plain data (printed by the CLI at start)."""
    return dataclasses.asdict(config)
