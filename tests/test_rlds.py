"""RLDS / Open X-Embodiment shards as TFDS writes them (``features.json``, ``dataset_info.json``,
``<name>-train.tfrecord-0000i-of-0000n``, one flattened ``tf.train.Example`` per episode), built
here without TensorFlow from the published layout, read back, filtered, and each kind of bad data
refused with a named DataError."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_no_new_stream_threads, live_stream_threads
from PIL import Image

from vla_ray.data import DataError
from vla_ray.data import rlds_format as rf
from vla_ray.data.convert import detect_format
from vla_ray.data.stats import action_statistics
from vla_ray.data.tfrecord import iter_records, make_example, parse_example, write_records

H = W = 8
LENGTHS = ((5, 3), (4,))  # episodes per shard
TEXTS = ("put the spoon in the pot", "", "wipe the table")


def _img(a: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def _tensor(shape: list[int], dtype: str = "float32", cls: str = "tensor_feature.Tensor") -> dict:
    return {
        "pythonClassName": f"tensorflow_datasets.core.features.{cls}",
        "tensor": {
            "shape": {"dimensions": [str(d) for d in shape]} if shape else {},
            "dtype": dtype,
            "encoding": "none",
        },
    }


def _image(fmt: str) -> dict:
    return {
        "pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
        "image": {
            "shape": {"dimensions": [str(H), str(W), "3"]},
            "dtype": "uint8",
            "encodingFormat": fmt,
        },
    }


def _dict(features: dict) -> dict:
    return {
        "pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
        "featuresDict": {"features": features},
    }


TEXT = {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text", "text": {}}
SCALAR = "scalar.Scalar"


def bridge_features() -> dict:
    """BridgeData V2's published schema, small: 2 cameras (PNG, JPEG), state 7, action 7."""
    step = {
        "observation": _dict(
            {"image_0": _image("png"), "image_1": _image("jpeg"), "state": _tensor([7])}
        ),
        "action": _tensor([7]),
        "language_instruction": TEXT,
        "reward": _tensor([], "float32", SCALAR),
        "discount": _tensor([], "float32", SCALAR),
        "is_first": _tensor([], "bool", SCALAR),
        "is_last": _tensor([], "bool", SCALAR),
        "is_terminal": _tensor([], "bool", SCALAR),
    }
    steps = {
        "pythonClassName": "tensorflow_datasets.core.features.dataset_feature.Dataset",
        "sequence": {"feature": _dict(step), "length": "-1"},
    }
    return _dict({"steps": steps, "episode_metadata": _dict({"file_path": TEXT})})


def episode(i: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {
        "image_0": rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8),
        "image_1": np.full((n, H, W, 3), 40 * i + 20, np.uint8),  # flat: JPEG keeps it
        "state": rng.normal(size=(n, 7)).astype(np.float32),
        "action": rng.uniform(-1, 1, (n, 7)).astype(np.float32),
        "reward": (np.arange(n) == n - 1).astype(np.float32),
    }


def _record(i: int, n: int) -> bytes:
    e = episode(i, n)
    last = np.arange(n) == n - 1
    return make_example(
        {
            "steps/observation/image_0": [_img(x, "PNG") for x in e["image_0"]],
            "steps/observation/image_1": [_img(x, "JPEG") for x in e["image_1"]],
            "steps/observation/state": e["state"].reshape(-1).tolist(),
            "steps/action": e["action"].reshape(-1).tolist(),
            "steps/language_instruction": [TEXTS[i].encode()] * n,
            "steps/reward": e["reward"].tolist(),
            "steps/discount": [1.0] * n,
            "steps/is_first": (np.arange(n) == 0).astype(int).tolist(),
            "steps/is_last": last.astype(int).tolist(),
            "steps/is_terminal": (last & (i != 1)).astype(int).tolist(),  # episode 1: time limit
            "episode_metadata/file_path": [f"/raw/traj{i}.pkl".encode()],
        }
    )


def write_bridge(folder: Path, name: str = "bridge_dataset") -> Path:
    root = folder / name / "1.0.0"
    root.mkdir(parents=True)
    (root / "features.json").write_text(json.dumps(bridge_features(), indent=2))
    i, lengths = 0, []
    for s, shard in enumerate(LENGTHS):
        records = []
        for n in shard:
            records.append(_record(i, n))
            i += 1
        lengths.append(str(len(shard)))
        write_records(root / f"{name}-train.tfrecord-{s:05d}-of-{len(LENGTHS):05d}", records)
    info = {
        "name": name,
        "version": "1.0.0",
        "fileFormat": "tfrecord",
        "moduleName": f"{name}.{name}_dataset_builder",
        "splits": [
            {
                "name": "train",
                "numBytes": "0",
                "shardLengths": lengths,
                "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            }
        ],
    }
    (root / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return root


def read_all(path: Path) -> list:
    return [rf.read_episode(path, ref) for ref in rf.episode_refs(path)]


@pytest.fixture
def bridge(tmp_path):
    return write_bridge(tmp_path)


def test_bridge_shards(bridge):
    assert detect_format(bridge) == "rlds" and detect_format(bridge.parent) == "rlds"
    eps = read_all(bridge.parent)  # the dataset folder: its newest version
    assert [len(e.actions) for e in eps] == [5, 3, 4]
    for i, raw in enumerate(eps):
        want, n, obs = episode(i, len(raw.actions)), len(raw.actions), raw.observations
        assert obs["images"].shape == (n + 1, 2, H, W, 3) and obs["images"].dtype == np.uint8
        np.testing.assert_array_equal(obs["images"][:n, 0], want["image_0"])  # PNG: exact
        assert np.abs(obs["images"][:n, 1].astype(int) - want["image_1"]).max() <= 2  # JPEG
        np.testing.assert_array_equal(obs["images"][n], obs["images"][n - 1])  # repeated last
        np.testing.assert_allclose(obs["state"][:n], want["state"])
        np.testing.assert_allclose(raw.actions, want["action"])
        np.testing.assert_allclose(raw.rewards, want["reward"])
        assert raw.instruction == (TEXTS[i] or None)
        assert raw.terminated == (i != 1) and raw.truncated == (i == 1)
        assert raw.source.endswith(f"tfrecord-0000{int(i == 2)}-of-00002 episode {i}")


def test_generic_mapping_spec_file_and_filters(bridge, tmp_path):
    spec = tmp_path / "spec.json"

    def write(**options):
        spec.write_text(json.dumps({"format": "rlds", "path": str(bridge), **options}))
        return read_all(spec)

    # generic (the dataset is named otherwise): every observation image, state, action
    generic = write(mapping="generic")
    assert generic[0].observations["images"].shape[1] == 2
    # a single camera by a mapping dict: also 'image'; actions = two parts concatenated
    one = write(
        mapping={"images": {"wrist": "observation/image_1"}, "action": ["action", "reward"]}
    )
    assert "images" not in one[0].observations
    assert one[0].observations["image"].shape == (6, H, W, 3)
    assert one[0].actions.shape == (5, 8)
    np.testing.assert_allclose(one[0].actions[:, 7], episode(0, 5)["reward"])
    # filters: index range, length, instruction text
    assert [len(e.actions) for e in write(filter={"episodes": "1:"})] == [3, 4]
    assert [len(e.actions) for e in write(filter={"min_length": 4})] == [5, 4]
    assert [len(e.actions) for e in write(filter={"instruction_contains": "WIPE"})] == [4]
    with pytest.raises(DataError, match=r"unknown filter field\(s\) \['shortest'\]"):
        write(filter={"shortest": 1})
    with pytest.raises(DataError, match=r"mapping 'droidx' is not known \(known: \['bridge'"):
        write(mapping="droidx")
    with pytest.raises(DataError, match=r"split 'val' not found \(splits: \['train'\]\)"):
        write(split="val")


def test_example_wire_format():
    """The Example bytes of a known message as TensorFlow serialises them (field numbers)."""
    data = make_example({"a": [b"x"], "f": [1.0], "i": [3]})
    assert parse_example(data, "w") == {"a": [b"x"], "f": [1.0], "i": [3]}
    # Features.feature (1) map entry {key (1): "a", value (2): Feature{bytes_list (1){value (1)}}}
    assert b"\n\x01a\x12\x05\n\x03\n\x01x" in data
    assert b"\n\x01i\x12\x05\x1a\x03\n\x01\x03" in data  # int64_list is Feature field 3, packed


def test_bad_shards(bridge, tmp_path):
    shard0 = "bridge_dataset-train.tfrecord-00000-of-00002"
    cut = Path(shutil.copytree(bridge, tmp_path / "cut"))
    size = (cut / shard0).stat().st_size
    (cut / shard0).write_bytes((cut / shard0).read_bytes()[: size - 50])
    with pytest.raises(
        DataError, match=r"cut/bridge_dataset-train.tfrecord-00000-of-00002 record 1"
    ):
        rf.episode_refs(cut)
    gone = Path(shutil.copytree(bridge, tmp_path / "gone"))
    (gone / "bridge_dataset-train.tfrecord-00001-of-00002").unlink()
    with pytest.raises(DataError, match=r"1 'train' shards, the names say 2"):
        rf.episode_refs(gone)
    nofeat = Path(shutil.copytree(bridge, tmp_path / "nofeat"))
    (nofeat / "features.json").unlink()
    with pytest.raises(DataError, match=r"nofeat is not a TFDS-built RLDS dataset"):
        rf.episode_refs(nofeat)

    def rewrite(name: str, change) -> Path:
        root = Path(shutil.copytree(bridge, tmp_path / name))
        path = root / shard0
        records = []
        for _, data in iter_records(path):
            feats = parse_example(data, "x")
            change(feats)
            records.append(make_example(feats))
        write_records(path, records)
        return root

    def wide(f):
        f["steps/observation/state"] = f["steps/observation/state"] + [0.0]

    with pytest.raises(
        DataError, match=r"episode 0: field 'steps/observation/state' has 36 values, not a multiple"
    ):
        read_all(rewrite("wide", wide))

    def short(f):
        f["steps/action"] = f["steps/action"][:-7]

    with pytest.raises(DataError, match=r"field 'steps/action' has 4 steps, other step fields"):
        read_all(rewrite("short", short))

    def drop(f):
        del f["steps/language_instruction"]

    with pytest.raises(DataError, match=r"episode 0: field 'steps/language_instruction' missing"):
        read_all(rewrite("drop", drop))

    def broken(f):
        f["steps/observation/image_0"][2] = f["steps/observation/image_0"][2][:20]

    with pytest.raises(
        DataError, match=r"episode 0 step 2: field 'steps/observation/image_0' is not a readable"
    ):
        read_all(rewrite("broken", broken))

    def nan(f):
        f["steps/action"][3] = float("nan")

    raw = read_all(rewrite("nan", nan))[0]
    from gymnasium import spaces

    from vla_ray.data.contract import EnvContract

    contract = EnvContract.__new__(EnvContract)  # the action check needs only the space
    contract.action_space, contract.env_id = spaces.Box(-1, 1, (7,), np.float32), "test"
    with pytest.raises(DataError, match=r"episode 0: field 'actions' has NaN or inf \(first at"):
        contract.check_transitions(raw)


def test_action_statistics():
    a = np.array([[0.0, 1.0], [2.0, 3.0]])
    b = np.array([[4.0, -1.0]])
    got = action_statistics([a, b])
    np.testing.assert_allclose(got["mean"], [2.0, 1.0])
    np.testing.assert_allclose(got["std"], np.std(np.concatenate([a, b]), axis=0))
    assert got["min"] == [0.0, -1.0] and got["max"] == [4.0, 3.0] and got["count"] == [3]
    np.testing.assert_allclose(got["q01"], np.quantile(np.concatenate([a, b]), 0.01, axis=0))


def test_a_corrupt_record_fails_its_checksum(bridge):
    pytest.importorskip("google_crc32c", reason="record data checksums need google-crc32c")
    shard = bridge / "bridge_dataset-train.tfrecord-00001-of-00002"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF  # inside the first record's data
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"00001-of-00002 record 0 \(byte 0\): data checksum"):
        rf.episode_refs(bridge)


S = 16  # LangReach image size of the CLI run


def write_langreach_rlds(folder: Path, episodes: int = 4, steps: int = 6) -> Path:
    """An RLDS dataset in LangReach's shapes (one PNG camera S x S, state 4, action 2, a
    LangReach instruction), in the published TFDS layout, one shard."""
    step = {
        "observation": _dict(
            {
                "image": {**_image("png"), "image": {**_image("png")["image"]}},
                "state": _tensor([4]),
            }
        ),
        "action": _tensor([2]),
        "language_instruction": TEXT,
        "reward": _tensor([], "float32", SCALAR),
        "discount": _tensor([], "float32", SCALAR),
        "is_first": _tensor([], "bool", SCALAR),
        "is_last": _tensor([], "bool", SCALAR),
        "is_terminal": _tensor([], "bool", SCALAR),
    }
    step["observation"]["featuresDict"]["features"]["image"]["image"]["shape"] = {
        "dimensions": [str(S), str(S), "3"]
    }
    features = _dict(
        {
            "steps": {
                "pythonClassName": "tensorflow_datasets.core.features.dataset_feature.Dataset",
                "sequence": {"feature": _dict(step), "length": "-1"},
            }
        }
    )
    name = "langreach_rlds"
    root = folder / name / "1.0.0"
    root.mkdir(parents=True)
    (root / "features.json").write_text(json.dumps(features))
    records = []
    for i in range(episodes):
        rng = np.random.default_rng(i)
        last = np.arange(steps) == steps - 1
        records.append(
            make_example(
                {
                    "steps/observation/image": [
                        _img(rng.integers(0, 256, (S, S, 3), dtype=np.uint8), "PNG")
                        for _ in range(steps)
                    ],
                    "steps/observation/state": rng.normal(size=steps * 4).tolist(),
                    "steps/action": rng.uniform(-1, 1, steps * 2).tolist(),
                    "steps/language_instruction": [b"touch the green one"] * steps,
                    "steps/reward": last.astype(float).tolist(),
                    "steps/discount": [1.0] * steps,
                    "steps/is_first": (np.arange(steps) == 0).astype(int).tolist(),
                    "steps/is_last": last.astype(int).tolist(),
                    "steps/is_terminal": last.astype(int).tolist(),
                }
            )
        )
    write_records(root / f"{name}-train.tfrecord-00000-of-00001", records)
    info = {
        "name": name,
        "version": "1.0.0",
        "fileFormat": "tfrecord",
        "splits": [{"name": "train", "numBytes": "0", "shardLengths": [str(episodes)]}],
    }
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


@pytest.mark.slow  # ~25 s: Ray Data conversion + 2 BC iterations + a 2-episode evaluation
def test_bc_on_an_rlds_dataset_from_the_cli(ray_session, tmp_path):
    """``vla-ray train --preset langreach-bc --data RLDS --val-fraction``: the shards are
    converted through ray.data, BC runs 2 iterations, the held-out episode is scored."""
    from vla_ray.cli import main

    data = write_langreach_rlds(tmp_path / "rlds")
    out = tmp_path / "run"
    argv = ["train", "--preset", "langreach-bc", "--data", str(data), "--val-fraction", "0.25"]
    argv += ["--stop-iters", "2", "--output", str(out), "--quiet"]
    for setting in (
        f"env_config.image_size={S}",
        "env_config.max_episode_steps=6",
        "training.train_batch_size_per_learner=16",
        "eval_every=2",
        "eval_episodes=2",
        "env_runners.num_envs_per_env_runner=1",
    ):
        argv += ["--set", setting]
    before = live_stream_threads()  # other tests' streams
    assert main(argv) == 0
    assert_no_new_stream_threads(before)  # the run closed its Ray Data stream
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    scored = [r for r in rows if "val_action_mse" in r]
    assert [r["iteration"] for r in scored] == [1, 2]
    assert len(scored[-1]["val_action_mse_per_dim"]) == 2
    assert all(np.isfinite(r["val_action_mse"]) and r["val_action_l1"] > 0 for r in scored)
    assert rows[-1]["success_rate"] is not None  # evaluated on LangReach
