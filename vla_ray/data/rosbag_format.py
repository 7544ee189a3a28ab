"""ROS bags (ROS 2 folders with ``metadata.yaml`` + ``.db3``/``.mcap``, ROS 1 ``.bag`` files) read
through ``rosbags`` (pure Python, no ROS install), mapped by a *mapping file* and sampled at a
control rate.

The mapping file (JSON or YAML, ``format: rosbag``) names the bags (one episode each, paths
relative to the file), the rate and, per observation key and for the action, a topic and which
message fields to take::

    {"format": "rosbag", "bags": ["run1", "run2"], "rate": 10, "max_age": 0.5,
     "instruction": "pick up the cube",
     "observations": {"image": {"topic": "/camera/image_raw"},
                      "state": {"topic": "/joint_states", "fields": ["position"]}},
     "action": {"topic": "/arm/command", "fields": ["data"]}}

Messages become arrays by type: ``sensor_msgs/msg/Image`` (rgb8, bgr8, rgba8, bgra8, mono8) and
``CompressedImage`` (JPEG/PNG) -> uint8 (H, W, 3); any other message -> the float32
concatenation of its ``fields`` (dotted paths to numbers or numeric arrays, e.g.
``twist.linear.x``; ``geometry_msgs/msg/Twist`` without fields: linear + angular).

Time synchronisation: control ticks every ``1 / rate`` s from the first time every mapped topic
has a message to the last message of the topic that ends first; at each tick each key takes the
topic's latest message at or before it (zero-order hold), and a message older than ``max_age`` s
(default 3 ticks) there is a :class:`DataError` naming the bag, topic and time (a dropped
topic). The observation at tick t and the action in effect at tick t form step t; the episode's
final observation is the last tick's. Episodes end truncated (a recording has no termination);
rewards are 0.

Tested on: ROS 2 bags (sqlite3, rosbag2 version 9, ROS 2 Humble message definitions) and a
ROS 1 ``.bag`` (Noetic definitions) written in tests with ``rosbags``' writers.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vla_ray.data.contract import RawEpisode
from vla_ray.data.rllib_format import DataError, require

FORMAT = "rosbag"
SPEC_KEYS = ("format", "bags", "rate", "max_age", "instruction", "observations", "action")


@dataclass(frozen=True)
class Stream:
    """One mapped key: its topic and fields."""

    key: str
    topic: str
    fields: tuple[str, ...] = ()


def _load(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    import yaml

    return yaml.safe_load(text)


def is_spec_file(path: Path) -> bool:
    if path.suffix not in (".json", ".yaml", ".yml") or not path.is_file():
        return False
    try:
        spec = _load(path)
    except Exception:  # not JSON/YAML: not ours
        return False
    return isinstance(spec, dict) and spec.get("format") == FORMAT


def load_spec(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping file, checked (bags resolved relative to it)."""
    p = Path(path)
    try:
        spec = _load(p)
    except FileNotFoundError as err:
        raise DataError(f"data: {p} does not exist") from err
    except Exception as err:
        raise DataError(f"{p}: not valid JSON/YAML ({err})") from err
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise DataError(f"{p}: unknown field(s) {unknown} (known: {list(SPEC_KEYS)})")
    for key in ("bags", "rate", "observations", "action"):
        if key not in spec:
            raise DataError(f"{p}: field {key!r} missing")
    rate = spec["rate"]
    if not isinstance(rate, (int, float)) or rate <= 0:
        raise DataError(f"{p}: field 'rate' must be a positive number of Hz, got {rate!r}")
    bags = spec["bags"] if isinstance(spec["bags"], list) else [spec["bags"]]
    spec["bags"] = [str((p.parent / b).resolve()) for b in bags]
    streams = [_stream(k, v, p) for k, v in dict(spec["observations"]).items()]
    streams.append(_stream("action", spec["action"], p))
    spec["streams"] = streams
    spec["max_age"] = float(spec.get("max_age", 3.0 / rate))
    return spec


def _stream(key: str, entry: Any, where: Path) -> Stream:
    if isinstance(entry, str):
        return Stream(key, entry)
    if not isinstance(entry, dict) or "topic" not in entry:
        raise DataError(f"{where}: {key!r} must be a topic or {{topic, fields}}, got {entry!r}")
    fields = entry.get("fields", ())
    return Stream(key, str(entry["topic"]), tuple([fields] if isinstance(fields, str) else fields))


def episode_refs(path: str | os.PathLike) -> list[dict[str, Any]]:
    spec = load_spec(path)
    for bag in spec["bags"]:
        if not Path(bag).exists():
            raise DataError(f"{path}: bag {bag} does not exist")
    return [{"spec": str(path), "bag": b, "index": i} for i, b in enumerate(spec["bags"])]


# ----------------------------------------------------------------------------- messages
def _field(msg: Any, dotted: str, where: str) -> np.ndarray:
    value = msg
    for part in dotted.split("."):
        if not hasattr(value, part):
            names = [n for n in dir(value) if not n.startswith("_")]
            raise DataError(f"{where}: message has no field {dotted!r} (fields: {names})")
        value = getattr(value, part)
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    return arr


def to_array(msg: Any, msgtype: str, fields: tuple[str, ...], where: str) -> np.ndarray:
    """One message as an array (see the module doc)."""
    if msgtype.endswith("/Image") and not fields:
        return _raw_image(msg, where)
    if msgtype.endswith("/CompressedImage") and not fields:
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(bytes(msg.data))).convert("RGB")
        except Exception as err:
            raise DataError(f"{where}: not a readable compressed image ({err})") from err
        return np.asarray(img, np.uint8)
    if not fields:
        if msgtype.endswith("/Twist"):
            fields = ("linear.x", "linear.y", "linear.z", "angular.x", "angular.y", "angular.z")
        elif hasattr(msg, "data"):
            fields = ("data",)
        else:
            raise DataError(f"{where}: give 'fields' for messages of type {msgtype}")
    try:
        return np.concatenate([_field(msg, f, where) for f in fields]).astype(np.float32)
    except (TypeError, ValueError) as err:
        raise DataError(f"{where}: fields {list(fields)} are not numeric ({err})") from err


def _raw_image(msg: Any, where: str) -> np.ndarray:
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
    enc = str(msg.encoding)
    if enc not in channels:
        raise DataError(
            f"{where}: image encoding {enc!r} not supported (supported: {list(channels)})"
        )
    c, h, w = channels[enc], int(msg.height), int(msg.width)
    data = np.frombuffer(bytes(msg.data), np.uint8)
    if int(msg.step) < w * c or data.size < int(msg.step) * h:
        raise DataError(
            f"{where}: image of {data.size} bytes, expected {h} rows of step {msg.step} for "
            f"{h}x{w} {enc}"
        )
    img = data[: int(msg.step) * h].reshape(h, int(msg.step))[:, : w * c].reshape(h, w, c)
    if enc.startswith("bgr"):
        img = img[..., [2, 1, 0]]
    elif enc == "mono8":
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


# ----------------------------------------------------------------------------- episodes
def read_episode(path: str | os.PathLike, ref: dict[str, Any]) -> RawEpisode:
    """One bag, synchronised at the mapping's rate (see the module doc)."""
    require("rosbags", "rosbag")
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    spec = load_spec(ref.get("spec", path))
    bag = Path(ref["bag"])
    source = f"{bag} (episode {ref['index']})"
    streams: list[Stream] = spec["streams"]
    times: dict[str, list[int]] = {s.topic: [] for s in streams}
    values: dict[tuple[str, str], list[np.ndarray]] = {(s.topic, s.key): [] for s in streams}
    try:
        reader = AnyReader([bag], default_typestore=get_typestore(Stores.ROS2_HUMBLE))
        reader.open()
    except Exception as err:
        raise DataError(f"{source}: cannot open the bag ({err})") from err
    try:
        found = {c.topic for c in reader.connections}
        missing = sorted(set(times) - found)
        if missing:
            raise DataError(
                f"{source}: topic {missing[0]!r} not in the bag (topics: {sorted(found)})"
            )
        conns = [c for c in reader.connections if c.topic in times]
        for conn, stamp, raw in reader.messages(connections=conns):
            where = f"{source} topic {conn.topic} at {stamp * 1e-9:.3f}s"
            try:
                msg = reader.deserialize(raw, conn.msgtype)
            except Exception as err:
                raise DataError(f"{where}: cannot deserialise {conn.msgtype} ({err})") from err
            times[conn.topic].append(int(stamp))
            for s in streams:
                if s.topic == conn.topic:
                    values[(s.topic, s.key)].append(to_array(msg, conn.msgtype, s.fields, where))
    except DataError:
        raise
    except Exception as err:  # a truncated / corrupt storage file
        raise DataError(f"{source}: cannot read the bag (truncated or corrupt?): {err}") from err
    finally:
        reader.close()
    return _synchronise(spec, streams, times, values, source)


def _synchronise(
    spec: dict[str, Any],
    streams: list[Stream],
    times: dict[str, list[int]],
    values: dict[tuple[str, str], list[np.ndarray]],
    source: str,
) -> RawEpisode:
    for topic, ts in times.items():
        if not ts:
            raise DataError(f"{source}: topic {topic!r} has no messages")
    start = max(ts[0] for ts in times.values())
    end = min(ts[-1] for ts in times.values())
    period = int(round(1e9 / float(spec["rate"])))
    ticks = np.arange(start, end + 1, period, dtype=np.int64)
    if len(ticks) < 2:
        raise DataError(
            f"{source}: the topics overlap for {(end - start) * 1e-9:.3f}s, less than two ticks "
            f"at {spec['rate']} Hz"
        )
    max_age = int(spec["max_age"] * 1e9)
    out: dict[str, np.ndarray] = {}
    for s in streams:
        ts = np.asarray(times[s.topic], np.int64)
        idx = np.searchsorted(ts, ticks, side="right") - 1
        age = ticks - ts[idx]
        if np.any(age > max_age):
            bad = int(np.argmax(age > max_age))
            raise DataError(
                f"{source}: topic {s.topic!r} ({s.key}) has no message in the "
                f"{spec['max_age']:.3f}s before {ticks[bad] * 1e-9:.3f}s (dropped messages?)"
            )
        arrays = values[(s.topic, s.key)]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise DataError(
                f"{source}: topic {s.topic!r} ({s.key}) has messages of shapes {sorted(shapes)}"
            )
        out[s.key] = np.stack([arrays[i] for i in idx])
    actions = out.pop("action")[:-1]  # step t: obs at tick t, action in effect at tick t
    n = len(actions)
    return RawEpisode(
        observations=out,
        actions=actions,
        rewards=np.zeros(n),
        terminated=False,
        truncated=True,
        instruction=spec.get("instruction"),
        source=source,
    )
