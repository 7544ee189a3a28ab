"""ROS 2 bags written with ``rosbags`` (camera, joint states and commands at their own rates),
read through a mapping file and synchronised at a control rate; bad bags and mappings refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rosbags", reason="the rosbag format needs the 'rosbags' package")

from rosbags.rosbag2 import Writer  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402

from vla_ray.data import DataError  # noqa: E402
from vla_ray.data import rosbag_format as rb  # noqa: E402
from vla_ray.data.convert import detect_format  # noqa: E402

TS = get_typestore(Stores.ROS2_HUMBLE)
H, W = 4, 6
# topic -> (period s, first message s)
TIMING = {"/camera/image_raw": (1 / 30, 0.02), "/joint_states": (1 / 50, 0.0), "/cmd": (0.1, 0.05)}
DURATION = 1.0


def _header(t: float, ts=TS):
    Time = ts.types["builtin_interfaces/msg/Time"]
    Header = ts.types["std_msgs/msg/Header"]
    stamp = Time(sec=int(t), nanosec=int((t % 1) * 1e9))
    if ts is TS:
        return Header(stamp=stamp, frame_id="base")
    return Header(seq=0, stamp=stamp, frame_id="base")  # ROS 1's Header has a seq


def image(t: float) -> np.ndarray:
    k = int(round(t * 1000))
    return (np.arange(H * W * 3).reshape(H, W, 3) + k).astype(np.uint8)


def joints(t: float) -> np.ndarray:
    return np.array([t, 2 * t, -t], np.float64)


def command(t: float) -> np.ndarray:
    return np.array([t, 1 - t], np.float32)


def message(topic: str, t: float, encoding: str = "rgb8", ts=TS):
    if topic == "/camera/image_raw":
        img = image(t)
        if encoding == "bgr8":
            img = img[..., ::-1]
        return "sensor_msgs/msg/Image", ts.types["sensor_msgs/msg/Image"](
            header=_header(t, ts),
            height=H,
            width=W,
            encoding=encoding,
            is_bigendian=0,
            step=W * 3,
            data=np.ascontiguousarray(img).reshape(-1),
        )
    if topic == "/joint_states":
        z = np.zeros(3)
        return "sensor_msgs/msg/JointState", ts.types["sensor_msgs/msg/JointState"](
            header=_header(t, ts), name=["a", "b", "c"], position=joints(t), velocity=z, effort=z
        )
    layout = ts.types["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
    return "std_msgs/msg/Float32MultiArray", ts.types["std_msgs/msg/Float32MultiArray"](
        layout=layout, data=command(t)
    )


def write_bag(
    path: Path, skip: tuple[str, float, float] | None = None, ros1: bool = False, **kw
) -> Path:
    """A ROS 2 bag (sqlite3), or with ``ros1`` a ROS 1 ``.bag``, with every topic at its rate;
    ``skip``: (topic, from, to) dropped."""
    if ros1:
        from rosbags.rosbag1 import Writer as Writer1

        ts = get_typestore(Stores.ROS1_NOETIC)
        kw["ts"] = ts
        opened = Writer1(path)
    else:
        ts = TS
        opened = Writer(path, version=9)
    msgs = []
    for topic, (period, first) in TIMING.items():
        for t in np.arange(first, DURATION, period):
            if skip and topic == skip[0] and skip[1] <= t < skip[2]:
                continue
            msgs.append((int(round(t * 1e9)), topic, float(t)))
    serialize = ts.serialize_ros1 if ros1 else ts.serialize_cdr
    with opened as writer:
        conns = {}
        for topic in TIMING:
            conns[topic] = writer.add_connection(topic, message(topic, 0.0, **kw)[0], typestore=ts)
        for stamp, topic, t in sorted(msgs):
            msgtype, msg = message(topic, t, **kw)
            writer.write(conns[topic], stamp, serialize(msg, msgtype))
    return path


def mapping(folder: Path, bags: list[str], **extra) -> Path:
    spec = {
        "format": "rosbag",
        "bags": bags,
        "rate": 10,
        "instruction": "pick up the cube",
        "observations": {
            "image": {"topic": "/camera/image_raw"},
            "state": {"topic": "/joint_states", "fields": ["position"]},
        },
        "action": {"topic": "/cmd"},
        **extra,
    }
    path = folder / "topics.json"
    path.write_text(json.dumps(spec))
    return path


def expected_hold(topic: str, tick: float) -> float:
    """The time of the topic's latest message at or before ``tick``."""
    period, first = TIMING[topic]
    ts = np.arange(first, DURATION, period)
    return float(ts[ts <= tick + 1e-9][-1])


def read_all(spec: Path) -> list:
    return [rb.read_episode(spec, ref) for ref in rb.episode_refs(spec)]


def test_bag_synchronised_at_the_control_rate(tmp_path):
    write_bag(tmp_path / "run1")
    write_bag(tmp_path / "run2", encoding="bgr8")
    write_bag(tmp_path / "run3.bag", ros1=True)  # ROS 1
    spec = mapping(tmp_path, ["run1", "run2", "run3.bag"])
    assert detect_format(spec) == "rosbag"
    eps = read_all(spec)
    assert len(eps) == 3
    # ticks from 0.05 s (every topic has a message) every 0.1 s up to the earliest last message
    ends = [np.arange(first, DURATION, p)[-1] for p, first in TIMING.values()]
    ticks = np.arange(0.05, min(ends) + 1e-9, 0.1)
    for raw in eps:
        n = len(raw.actions)
        assert n == len(ticks) - 1 and raw.observations["image"].shape == (n + 1, H, W, 3)
        for i, tick in enumerate(ticks):
            want = image(expected_hold("/camera/image_raw", tick))
            np.testing.assert_array_equal(raw.observations["image"][i], want)  # bgr8 -> RGB
            np.testing.assert_allclose(
                raw.observations["state"][i], joints(expected_hold("/joint_states", tick))
            )
        np.testing.assert_allclose(raw.actions, [command(t) for t in ticks[:-1]], atol=1e-6)
        assert raw.instruction == "pick up the cube" and raw.truncated and not raw.terminated


def test_bad_bags_and_mappings(tmp_path):
    write_bag(tmp_path / "gap", skip=("/joint_states", 0.2, 0.7))
    with pytest.raises(
        DataError, match=r"gap \(episode 0\): topic '/joint_states' \(state\) has no message in"
    ):
        read_all(mapping(tmp_path, ["gap"]))
    spec = mapping(tmp_path, ["gap"], action={"topic": "/gripper"})
    with pytest.raises(DataError, match=r"topic '/gripper' not in the bag"):
        read_all(spec)
    spec = mapping(tmp_path, ["gap"], action={"topic": "/cmd", "fields": ["nothing"]})
    with pytest.raises(DataError, match=r"topic /cmd at 0.050s: message has no field 'nothing'"):
        read_all(spec)
    with pytest.raises(DataError, match=r"bag .*/absent does not exist"):
        rb.episode_refs(mapping(tmp_path, ["absent"]))
    with pytest.raises(DataError, match=r"field 'rate' must be a positive number of Hz, got 0"):
        rb.episode_refs(mapping(tmp_path, ["gap"], rate=0))
    with pytest.raises(DataError, match=r"unknown field\(s\) \['topics'\]"):
        rb.episode_refs(mapping(tmp_path, ["gap"], topics={}))
    # a truncated storage file
    cut = Path(shutil.copytree(tmp_path / "gap", tmp_path / "cut"))
    db = next(cut.glob("*.db3"))
    db.write_bytes(db.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"cut \(episode 0\): cannot (open|read) the bag"):
        read_all(mapping(tmp_path, ["cut"]))
