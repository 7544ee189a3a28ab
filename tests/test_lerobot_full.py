"""LeRobotDataset folders laid out as the ``lerobot`` package publishes them (v3.0 and v2.1),
built here by hand from the published format (``meta/info.json`` schema, episode metadata,
``datasets.Image`` parquet structs), not by vla-ray's writer: several cameras, ``image``-dtype
features, a Hub id resolved through a Hugging Face cache, and each kind of bad data."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vla_ray.data import DataError
from vla_ray.data import lerobot_format as lf
from vla_ray.data.convert import detect_format, resolve_source

CAMERAS = ("top", "wrist")
H, W, FPS = 6, 8, 10
LENGTHS = (4, 3)
TASKS = ("pick the cube", "open the drawer")


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _frames(ep: int, n: int) -> dict[str, np.ndarray]:
    """Deterministic frames of episode ``ep``: per camera images, state (4,), action (2,)."""
    rng = np.random.default_rng(ep)
    out = {c: rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8) for c in CAMERAS}
    out["state"] = rng.normal(size=(n, 4)).astype(np.float32)
    out["action"] = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    return out


def _features() -> dict:
    image = {"dtype": "image", "shape": [H, W, 3], "names": ["height", "width", "channels"]}
    scalar = {"shape": [1], "names": None}
    return {
        **{f"observation.images.{c}": dict(image) for c in CAMERAS},
        "observation.state": {"dtype": "float32", "shape": [4], "names": ["x", "y", "vx", "vy"]},
        "action": {"dtype": "float32", "shape": [2], "names": ["dx", "dy"]},
        "timestamp": {"dtype": "float32", **scalar},
        "frame_index": {"dtype": "int64", **scalar},
        "episode_index": {"dtype": "int64", **scalar},
        "index": {"dtype": "int64", **scalar},
        "task_index": {"dtype": "int64", **scalar},
    }


def _table(episodes: list[int], start: int, fixed_lists: bool) -> pa.Table:
    """Frames of ``episodes`` as ``datasets`` writes them (Image structs, list columns)."""
    cols: dict[str, list] = {k: [] for k in _features()}
    index = start
    for ep in episodes:
        n = LENGTHS[ep]
        f = _frames(ep, n)
        for t in range(n):
            for c in CAMERAS:
                cols[f"observation.images.{c}"].append({"bytes": _png(f[c][t]), "path": None})
            cols["observation.state"].append(f["state"][t].tolist())
            cols["action"].append(f["action"][t].tolist())
            cols["timestamp"].append(t / FPS)
            cols["frame_index"].append(t)
            cols["episode_index"].append(ep)
            cols["index"].append(index)
            cols["task_index"].append(ep)
            index += 1
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    vec = (
        (lambda n: pa.list_(pa.float32(), n)) if fixed_lists else (lambda n: pa.list_(pa.float32()))
    )
    types = {
        **{f"observation.images.{c}": image for c in CAMERAS},
        "observation.state": vec(4),
        "action": vec(2),
        "timestamp": pa.float32(),
    }
    arrays = {k: pa.array(v, type=types.get(k, pa.int64())) for k, v in cols.items()}
    table = pa.table(arrays)
    hf = {"info": {"features": {k: {"_type": "Value"} for k in cols}}}  # as datasets tags it
    return table.replace_schema_metadata({"huggingface": json.dumps(hf)})


def _info(version: str) -> dict:
    n = sum(LENGTHS)
    info = {
        "codebase_version": version,
        "robot_type": "so100",
        "total_episodes": len(LENGTHS),
        "total_frames": n,
        "total_tasks": len(TASKS),
        "chunks_size": 1000,
        "fps": FPS,
        "splits": {"train": f"0:{len(LENGTHS)}"},
        "features": _features(),
    }
    if version == "v3.0":
        info.update(
            data_files_size_in_mb=100,
            video_files_size_in_mb=500,
            data_path="data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            video_path=None,
        )
    else:
        info.update(
            total_chunks=1,
            total_videos=0,
            data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            video_path=None,
        )
    return info


def write_v30(root: Path) -> Path:
    """v3.0: both episodes in data/chunk-000/file-000.parquet, episode rows with stats columns."""
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    (root / "data" / "chunk-000").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(_info("v3.0"), indent=4))
    pq.write_table(_table([0, 1], 0, True), root / "data" / "chunk-000" / "file-000.parquet")
    rows, start = [], 0
    for ep, n in enumerate(LENGTHS):
        rows.append(
            {
                "episode_index": ep,
                "tasks": [TASKS[ep]],
                "length": n,
                "data/chunk_index": 0,
                "data/file_index": 0,
                "dataset_from_index": start,
                "dataset_to_index": start + n,
                "stats/action/mean": [0.0, 0.0],
                "meta/episodes/chunk_index": 0,
                "meta/episodes/file_index": 0,
            }
        )
        start += n
    pq.write_table(pa.Table.from_pylist(rows), root / "meta/episodes/chunk-000/file-000.parquet")
    tasks = pa.table({"task_index": [0, 1], "__index_level_0__": list(TASKS)})
    pq.write_table(tasks, root / "meta" / "tasks.parquet")
    return root


def write_v21(root: Path) -> Path:
    """v2.1: one parquet per episode (variable-size list columns), jsonl metadata."""
    (root / "meta").mkdir(parents=True)
    (root / "data" / "chunk-000").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(_info("v2.1"), indent=4))
    start = 0
    for ep, n in enumerate(LENGTHS):
        path = root / "data" / "chunk-000" / f"episode_{ep:06d}.parquet"
        pq.write_table(_table([ep], start, False), path)
        start += n
    lines = [
        {"episode_index": ep, "tasks": [TASKS[ep]], "length": n} for ep, n in enumerate(LENGTHS)
    ]
    (root / "meta" / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    tasks = [{"task_index": i, "task": t} for i, t in enumerate(TASKS)]
    (root / "meta" / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tasks))
    return root


def read_all(root: Path) -> list:
    return [lf.read_episode(root, ref) for ref in lf.episode_refs(root)]


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_multi_camera_image_features(tmp_path, version):
    root = (write_v30 if version == "v3.0" else write_v21)(tmp_path / "ds")
    assert detect_format(root) == "lerobot"
    assert lf.camera_names(lf.load_info(root)) == list(CAMERAS)
    episodes = read_all(root)
    assert [len(e.actions) for e in episodes] == list(LENGTHS)
    for ep, raw in enumerate(episodes):
        want = _frames(ep, LENGTHS[ep])
        n = LENGTHS[ep]
        obs = raw.observations
        # T frames + the repeated last one (LeRobotDataset stores no final observation)
        assert obs["images"].shape == (n + 1, len(CAMERAS), H, W, 3)
        assert obs["images"].dtype == np.uint8
        for i, cam in enumerate(CAMERAS):
            np.testing.assert_array_equal(obs[cam][:n], want[cam])  # PNG is lossless
            np.testing.assert_array_equal(obs["images"][:n, i], want[cam])
        np.testing.assert_array_equal(obs["images"][n], obs["images"][n - 1])
        assert "image" not in obs  # several cameras: no single-camera key
        np.testing.assert_allclose(obs["state"][:n], want["state"])
        np.testing.assert_allclose(raw.actions, want["action"])
        assert raw.instruction == TASKS[ep]


def test_single_camera_also_image_key(tmp_path):
    root = write_v30(tmp_path / "ds")
    info = json.loads((root / "meta" / "info.json").read_text())
    del info["features"]["observation.images.wrist"]
    (root / "meta" / "info.json").write_text(json.dumps(info))
    raw = read_all(root)[0]
    assert "images" not in raw.observations
    np.testing.assert_array_equal(raw.observations["image"][:4], _frames(0, 4)["top"])


def test_image_path_instead_of_bytes(tmp_path):
    """A ``datasets.Image`` cell with null bytes reads its path (relative to the root)."""
    root = write_v21(tmp_path / "ds")
    path = root / "data" / "chunk-000" / "episode_000001.parquet"
    table = pq.read_table(path)
    imgs = _frames(1, LENGTHS[1])["wrist"]
    cells = []
    for t, img in enumerate(imgs):
        Image.fromarray(img).save(root / f"wrist_{t}.png")
        cells.append({"bytes": None, "path": f"wrist_{t}.png"})
    i = table.column_names.index("observation.images.wrist")
    column = pa.array(cells, type=table.schema.field(i).type)
    pq.write_table(table.set_column(i, "observation.images.wrist", column), path)
    raw = read_all(root)[1]
    np.testing.assert_array_equal(raw.observations["wrist"][: LENGTHS[1]], imgs)


def _rewrite(root: Path, column: str, fn) -> None:
    path = root / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(path)
    i = table.column_names.index(column)
    pq.write_table(table.set_column(i, column, fn(table.column(column), table)), path)


def test_bad_image_and_shape_data(tmp_path):
    src = write_v30(tmp_path / "src")
    # a truncated PNG: the file, episode, row and field are named
    bad = Path(shutil.copytree(src, tmp_path / "png"))
    cells = pq.read_table(bad / "data/chunk-000/file-000.parquet").column("observation.images.top")

    def cut(col, _):
        cells = col.to_pylist()
        cells[5] = {"bytes": cells[5]["bytes"][:30], "path": None}
        return pa.array(cells, type=col.type)

    _rewrite(bad, "observation.images.top", cut)
    with pytest.raises(
        DataError, match=r"file-000.parquet episode 1 row 1: field 'observation.images.top' is not"
    ):
        read_all(bad)
    assert len(cells) == sum(LENGTHS)
    # images of another size than info.json gives
    small = Path(shutil.copytree(src, tmp_path / "small"))
    info = json.loads((small / "meta" / "info.json").read_text())
    info["features"]["observation.images.wrist"]["shape"] = [H, W + 1, 3]
    (small / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(
        DataError, match=r"episode 0: field 'observation.images.wrist' has frames of shape"
    ):
        read_all(small)
    # a state vector of the wrong width
    wide = Path(shutil.copytree(src, tmp_path / "wide"))
    _rewrite(
        wide,
        "observation.state",
        lambda col, t: pa.array([v + [0.0] for v in col.to_pylist()], pa.list_(pa.float32(), 5)),
    )
    with pytest.raises(
        DataError, match=r"episode 0: field 'observation.state' has shape \(5,\) for 4 frames"
    ):
        read_all(wide)
    # a missing data file
    gone = Path(shutil.copytree(src, tmp_path / "gone"))
    (gone / "data/chunk-000/file-000.parquet").unlink()
    with pytest.raises(DataError, match=r"gone/data/chunk-000/file-000.parquet does not exist"):
        read_all(gone)
    # a missing tasks table
    notask = Path(shutil.copytree(src, tmp_path / "notask"))
    (notask / "meta" / "tasks.parquet").unlink()
    with pytest.raises(DataError, match=r"tasks.parquet: cannot read tasks"):
        read_all(notask)


def test_nan_action_is_refused_by_the_contract(tmp_path):
    from vla_ray.data.contract import EnvContract

    root = write_v30(tmp_path / "ds")

    def nan(col, _):
        rows = col.to_pylist()
        rows[1] = [float("nan"), 0.0]
        return pa.array(rows, col.type)

    _rewrite(root, "action", nan)
    raw = read_all(root)[0]
    contract = EnvContract.__new__(EnvContract)  # the action check only needs the space
    from gymnasium import spaces

    contract.action_space = spaces.Box(-1, 1, (2,), np.float32)
    contract.env_id = "test"
    with pytest.raises(DataError, match=r"episode 0: field 'actions' has NaN or inf \(first at"):
        contract.check_transitions(raw)


def _fake_cache(cache: Path, repo: str, rev: str, src: Path) -> None:
    """The Hugging Face cache layout: datasets--org--name/{refs/main, snapshots/<rev>/...}."""
    folder = cache / f"datasets--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(rev)
    shutil.copytree(src, folder / "snapshots" / rev)


def test_hub_id_from_the_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    src = write_v30(tmp_path / "src")
    cache = tmp_path / "hub"
    _fake_cache(cache, "org/so100_demo", "a" * 40, src)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = resolve_source("hf://org/so100_demo")
    assert Path(folder) == (cache / "datasets--org--so100_demo" / "snapshots" / ("a" * 40))
    assert detect_format("hf://org/so100_demo") == "lerobot"
    assert len(read_all(Path(folder))) == 2
    with pytest.raises(
        DataError, match=r"LeRobot dataset 'org/missing' \(revision main\) is not in the Hugging"
    ):
        detect_format("hf://org/missing")
    with pytest.raises(DataError, match=r"expected hf://<org>/<name>"):
        resolve_source("hf://no-org")


def test_delta_timestamps_windows(tmp_path):
    """LeRobot's ``delta_timestamps``: an observation history and an action chunk by time
    offsets, clamped to the episode with ``*_is_pad`` masks; off-grid offsets are refused."""
    from vla_ray.data.delta_timestamps import delta_indices, read_windows

    root = write_v30(tmp_path / "ds")
    ref = lf.episode_refs(root)[0]  # episode 0: 4 frames at 10 fps
    frames = _frames(0, LENGTHS[0])
    out = read_windows(
        root,
        ref,
        {
            "observation.state": [-0.2, -0.1, 0.0],
            "action": [0.0, 0.1, 0.2],
            "observation.images.top": [-0.1, 0.0],
        },
    )
    assert out["observation.state"].shape == (4, 3, 4)
    assert out["action"].shape == (4, 3, 2)
    assert out["observation.images.top"].shape == (4, 2, H, W, 3)
    # frame 1: states of frames 0 (clamped from -1), 0, 1; actions of frames 1, 2, 3
    np.testing.assert_array_equal(out["observation.state"][1], frames["state"][[0, 0, 1]])
    assert out["observation.state_is_pad"][1].tolist() == [True, False, False]
    np.testing.assert_array_equal(out["action"][1], frames["action"][[1, 2, 3]])
    assert out["action_is_pad"][3].tolist() == [False, True, True]  # past the episode's end
    np.testing.assert_array_equal(out["action"][3], frames["action"][[3, 3, 3]])
    np.testing.assert_array_equal(out["observation.images.top"][2, 0], frames["top"][1])
    assert delta_indices({"action": [0.0, 0.05, 0.1]}, 20)["action"].tolist() == [0, 1, 2]
    with pytest.raises(DataError, match=r"delta_timestamps\['action'\]: offsets \[0.05\] are not"):
        read_windows(root, ref, {"action": [0.0, 0.05]})
    with pytest.raises(DataError, match="names 'observation.depth', not a feature"):
        read_windows(root, ref, {"observation.depth": [0.0]})
