"""Dataset formats: Minari, D4RL HDF5 and LeRobotDataset (v3.0, v2.1) written by `vla-ray collect`,
read back onto the env's spaces, converted to RLlib episodes with ray.data, and trained on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vla_ray.cli import main
from vla_ray.data import DataError, collect, read_episodes
from vla_ray.data.convert import detect_format, offline_input, read_dataset
from vla_ray.data.lerobot_format import write_lerobot
from vla_ray.train import resolve, train

LANGREACH = "vla_ray/LangReach-v0"
HOPPER = "vla_ray/Hopper-v5"  # Dict: state + a fixed instruction
HOPPER_RAW = "Hopper-v5"  # gymnasium's own: flat Box observations, as in D4RL / Minari mujoco
FORMATS = ("minari", "d4rl", "lerobot")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The same 3 LangReach expert episodes (seeds 10..12) in every format, plus short random
    Hopper episodes (our Dict env and gymnasium's flat one)."""
    root = tmp_path_factory.mktemp("datasets")
    out = {}
    for fmt in ("rllib", *FORMATS):
        out[fmt] = Path(
            collect(LANGREACH, "expert", 3, root / fmt, fmt=fmt, seed=10, progress=False)["output"]
        )
    short = {"max_episode_steps": 12}
    for env_id, name in ((HOPPER, "hopper"), (HOPPER_RAW, "raw")):
        for fmt in ("rllib", *FORMATS):
            summary = collect(
                env_id,
                "random",
                2,
                root / f"{name}-{fmt}",
                fmt=fmt,
                seed=3,
                progress=False,
                env_config=short,
            )
            out[f"{name}-{fmt}"] = Path(summary["output"])
    return out


def assert_same_episodes(ref, got, *, final_obs: bool = True):
    """Same observations (all T+1, or the first T for LeRobot), actions, rewards, terminations."""
    assert len(ref) == len(got) > 0
    for a, b in zip(ref, got, strict=True):
        assert len(a) == len(b)
        n = len(a) + 1 if final_obs else len(a)
        oa, ob = a.get_observations(), b.get_observations()
        if isinstance(oa, dict):
            assert set(oa) == set(ob)
            for k in oa:
                np.testing.assert_array_equal(
                    np.asarray(oa[k])[:n], np.asarray(ob[k])[:n], err_msg=k
                )
        else:
            np.testing.assert_array_equal(np.asarray(oa)[:n], np.asarray(ob)[:n])
        np.testing.assert_array_equal(a.get_actions(), b.get_actions())
        np.testing.assert_allclose(a.get_rewards(), b.get_rewards(), rtol=1e-6)
        assert (a.is_terminated, a.is_truncated) == (b.is_terminated, b.is_truncated)


@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_langreach(datasets, fmt):
    assert detect_format(datasets[fmt]) == fmt
    ref = read_episodes(datasets["rllib"])
    assert any(e.is_terminated for e in ref)  # the expert succeeds: terminations are exercised
    got = read_dataset(datasets[fmt], LANGREACH)
    # LeRobotDataset stores no observation after the last action: the reader repeats the last
    assert_same_episodes(ref, got, final_obs=fmt != "lerobot")
    if fmt == "lerobot":
        for b in got:
            obs = b.get_observations()
            np.testing.assert_array_equal(obs["image"][-1], obs["image"][-2])


@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_hopper_and_flat_observations(datasets, fmt):
    ref = read_episodes(datasets["hopper-rllib"])
    assert any(e.is_truncated for e in ref)  # time limit: must not come back as a termination
    got = read_dataset(datasets[f"hopper-{fmt}"], HOPPER)
    assert_same_episodes(ref, got, final_obs=fmt != "lerobot")
    raw = read_episodes(datasets["raw-rllib"])
    assert_same_episodes(
        raw, read_dataset(datasets[f"raw-{fmt}"], HOPPER_RAW), final_obs=fmt != "lerobot"
    )
    # flat D4RL / Minari mujoco observations onto the contract: state + the env's fixed instruction
    mapped = read_dataset(datasets[f"raw-{fmt}"], HOPPER)
    env = gym.make(HOPPER)
    fixed = env.reset(seed=0)[0]
    env.close()
    for a, b in zip(raw, mapped, strict=True):
        obs = b.get_observations()
        n = len(a) + (fmt != "lerobot")
        flat = np.asarray(a.get_observations(), np.float32)  # float64 -> the contract's float32
        np.testing.assert_array_equal(obs["state"][:n], flat[:n])
        assert (obs["instruction"] == fixed["instruction"]).all()
        assert (obs["instruction_mask"] == fixed["instruction_mask"]).all()
        np.testing.assert_array_equal(a.get_actions(), b.get_actions())


def test_upstream_tools_open_the_files(datasets, tmp_path, monkeypatch):
    import minari

    # Minari: a dataset under MINARI_DATASETS_PATH opens by id with minari itself and with us
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    target = tmp_path / "minari" / "vla_ray" / "langreach" / "expert-v0"
    collect(LANGREACH, "expert", 2, target, fmt="minari", seed=10, progress=False)
    ds = minari.load_dataset("vla_ray/langreach/expert-v0")
    assert ds.total_episodes == 2 and ds.spec.dataset_id == "vla_ray/langreach/expert-v0"
    ep = next(iter(ds))
    assert ep.observations["image"].shape[1:] == (64, 64, 3) and ep.actions.shape[1] == 2
    assert len(ep.observations["image"]) == len(ep.actions) + 1
    ref = read_episodes(datasets["rllib"])[:2]
    assert_same_episodes(ref, read_dataset("vla_ray/langreach/expert-v0", LANGREACH))
    with pytest.raises(DataError, match="never downloads"):
        detect_format("mujoco/hopper/medium-v0")
    # D4RL: the flat keys D4RL tools read
    with h5py.File(datasets["d4rl"], "r") as f:
        n = f["actions"].shape[0]
        assert f["observations"].shape == (n, 4) and f["next_observations"].shape == (n, 4)
        assert int(np.sum(f["terminals"][:]) + np.sum(f["timeouts"][:])) == 3
    # LeRobotDataset v3.0: the documented layout
    root = datasets["lerobot"]
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 3
    assert info["features"]["observation.image"]["dtype"] == "video"
    stats = json.loads((root / "meta" / "stats.json").read_text())
    assert len(stats["action"]["mean"]) == 2 and np.asarray(
        stats["observation.image"]["mean"]
    ).shape == (3, 1, 1)
    tasks = pq.read_table(root / "meta" / "tasks.parquet").to_pandas()
    assert tasks.index.name == "task" and list(tasks["task_index"]) == list(range(len(tasks)))
    eps = pq.read_table(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    assert [e["dataset_from_index"] for e in eps][1] == eps[0]["dataset_to_index"]
    assert (
        root / info["video_path"].format(video_key="observation.image", chunk_index=0, file_index=0)
    ).is_file()


def test_lerobot_v21_and_lossy_video(datasets, tmp_path):
    ref = read_episodes(datasets["rllib"])
    env = gym.make(LANGREACH)
    kw = dict(observation_space=env.observation_space, action_space=env.action_space, fps=10)
    env.close()
    v21 = write_lerobot(ref, tmp_path / "v21", version="v2.1", **kw)
    assert (v21 / "meta" / "episodes.jsonl").is_file()
    assert (v21 / "data" / "chunk-000" / "episode_000002.parquet").is_file()
    assert (v21 / "videos" / "chunk-000" / "observation.image" / "episode_000000.mp4").is_file()
    assert_same_episodes(ref, read_dataset(v21, LANGREACH), final_obs=False)
    lossy = write_lerobot(ref, tmp_path / "av1", codec="libsvtav1", **kw)
    got = read_dataset(lossy, LANGREACH)
    a = np.asarray(ref[0].get_observations()["image"][:-1], np.float32)
    b = np.asarray(got[0].get_observations()["image"][:-1], np.float32)
    assert a.shape == b.shape and 0 < np.abs(a - b).mean() < 12  # AV1 yuv420p: close, not exact


def _copy(src, dst):
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def test_bad_d4rl(datasets, tmp_path):
    src = datasets["d4rl"]
    missing = _copy(src, tmp_path / "missing.hdf5")
    with h5py.File(missing, "a") as f:
        del f["timeouts"]
    with pytest.raises(DataError, match=r"missing.hdf5.*\['timeouts'\] missing"):
        read_dataset(missing, LANGREACH)
    nan = _copy(src, tmp_path / "nan.hdf5")
    with h5py.File(nan, "a") as f:
        f["actions"][3, 0] = np.nan
    with pytest.raises(DataError, match=r"nan.hdf5 rows 0:\d+: field 'actions' has NaN .*step 3"):
        read_dataset(nan, LANGREACH)
    with pytest.raises(DataError, match=r"'image' has shape \(64, 64, 3\).*expects \(32, 32, 3\)"):
        read_dataset(src, LANGREACH, {"image_size": 32})
    with pytest.raises(DataError, match=r"'actions' has shape \(2,\).*expects \(3,\)"):
        read_dataset(src, HOPPER)
    short = tmp_path / "short.hdf5"
    short.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(DataError, match="short.hdf5"):
        read_dataset(short, LANGREACH)


def test_bad_minari(datasets, tmp_path):
    src = datasets["minari"]
    missing = _copy(src, tmp_path / "missing")
    with h5py.File(missing / "data" / "main_data.hdf5", "a") as f:
        del f["episode_1/actions"]
    with pytest.raises(DataError, match=r"main_data.hdf5 episode 1: missing field"):
        read_dataset(missing, LANGREACH)
    nan = _copy(src, tmp_path / "nan")
    with h5py.File(nan / "data" / "main_data.hdf5", "a") as f:
        f["episode_2/actions"][0, 1] = np.inf
    with pytest.raises(DataError, match=r"episode 2: field 'actions' has NaN or inf"):
        read_dataset(nan, LANGREACH)
    with pytest.raises(DataError, match=r"episode 0: observation 'image' has shape"):
        read_dataset(src, LANGREACH, {"image_size": 32})
    short = _copy(src, tmp_path / "short")
    data = short / "data" / "main_data.hdf5"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(DataError, match="short/data"):
        read_dataset(short, LANGREACH)


def test_bad_lerobot(datasets, tmp_path):
    src = datasets["lerobot"]
    data_file = "data/chunk-000/file-000.parquet"
    missing = _copy(src, tmp_path / "missing")
    table = pq.read_table(missing / data_file)
    pq.write_table(table.drop(["action"]), missing / data_file)
    with pytest.raises(DataError, match=r"file-000.parquet episode 0: field 'action' missing"):
        read_dataset(missing, LANGREACH)
    nan = _copy(src, tmp_path / "nan")
    actions = np.stack(table.column("action").to_pylist()).astype(np.float32)
    actions[1, 0] = np.nan
    column = pa.FixedSizeListArray.from_arrays(pa.array(actions.reshape(-1)), 2)
    index = table.column_names.index("action")
    pq.write_table(table.set_column(index, "action", column), nan / data_file)
    with pytest.raises(
        DataError, match=r"episode 0: field 'actions' has NaN or inf \(first at step 1\)"
    ):
        read_dataset(nan, LANGREACH)
    with pytest.raises(DataError, match=r"episode 0: observation 'image' has shape"):
        read_dataset(src, LANGREACH, {"image_size": 32})
    old = _copy(src, tmp_path / "old")
    info = json.loads((old / "meta" / "info.json").read_text())
    (old / "meta" / "info.json").write_text(json.dumps({**info, "codebase_version": "v1.6"}))
    with pytest.raises(
        DataError, match=r"codebase_version 'v1.6' is not supported \(supported: v3.0, v2.1\)"
    ):
        read_dataset(old, LANGREACH)
    short = _copy(src, tmp_path / "short")
    video = short / "videos" / "observation.image" / "chunk-000" / "file-000.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    with pytest.raises(DataError, match=r"file-000.mp4"):
        read_dataset(short, LANGREACH)
    cut = _copy(src, tmp_path / "cut")
    (cut / data_file).write_bytes((cut / data_file).read_bytes()[:200])
    with pytest.raises(DataError, match=r"file-000.parquet: cannot read frames"):
        read_dataset(cut, LANGREACH)
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format(tmp_path)


def test_collect_cli_formats(tmp_path):
    out = tmp_path / "demos"
    args = ["collect", "--env", LANGREACH, "--episodes", "1", "--quiet", "--output", str(out)]
    assert main([*args, "--format", "d4rl"]) == 0
    assert detect_format(tmp_path / "demos.hdf5") == "d4rl"
    with pytest.raises(SystemExit) as exit_:  # a clear CLI error (argparse), no traceback
        main([*args, "--format", "hdf5"])
    assert exit_.value.code == 2


@pytest.mark.slow
def test_bc_trains_from_every_format(ray_session, datasets, tmp_path, monkeypatch, capsys):
    """`train --data` converts each format with ray.data into the cache (``offline_input``, what
    ``train`` hands RLlib), then BC trains on it (one format trained end to end: past the
    conversion every format is the same RLlib episode files)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("VLA_RAY_DATA_CACHE", str(cache))
    for fmt in FORMATS[1:]:
        assert offline_input(datasets[fmt], LANGREACH, {})
    spec = resolve(
        "langreach-bc",
        {"training": {"train_batch_size_per_learner": 16}, "eval_every": 100},
        data=str(datasets[FORMATS[0]]),
    )
    summary = train(spec, tmp_path / "run", stop_iters=2, progress=False)
    assert summary["iteration"] == 2 and np.isfinite(summary["learner"]["total_loss"])
    err = capsys.readouterr().err
    assert all(f"converting {fmt} dataset" in err for fmt in FORMATS)
    # the ray.data conversion gives the episodes the in-process reader gives
    converted = {fmt: next(cache.glob(f"*-{fmt}-*")) for fmt in FORMATS}
    ref = {e.id_: e for e in read_dataset(datasets["lerobot"], LANGREACH)}
    conv = {e.id_: e for e in read_episodes(converted["lerobot"])}
    assert sorted(conv) == sorted(ref)
    assert_same_episodes([ref[k] for k in sorted(ref)], [conv[k] for k in sorted(conv)])
    files = offline_input(datasets["minari"], LANGREACH, {})  # reused, not converted again
    assert files == sorted(str(f.resolve()) for f in converted["minari"].glob("*.parquet"))
    assert "cached RLlib episodes" in capsys.readouterr().err
    # bad data inside a ray.data task still arrives as a DataError naming the field
    with pytest.raises(DataError, match=r"observation 'image' has shape"):
        offline_input(datasets["d4rl"], LANGREACH, {"image_size": 32})


def test_a_missing_format_package_names_the_extra(monkeypatch):
    import sys

    from vla_ray.data.rllib_format import require

    monkeypatch.setitem(sys.modules, "h5py", None)  # what an uninstalled package looks like
    with pytest.raises(ImportError, match=r"'d4rl' dataset format needs the 'h5py' package: "):
        require("h5py", "d4rl")


def test_collect_refuses_an_existing_output_without_overwrite(tmp_path, capsys):
    out = tmp_path / "demos"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"demos already exists and is not empty.*--overwrite"):
        collect(LANGREACH, "expert", 1, out, seed=0, progress=False)
    args = ["collect", "--env", LANGREACH, "--episodes", "1", "--output", str(out), "--quiet"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
    (tmp_path / "data.hdf5").write_text("an older file")  # d4rl writes OUTPUT.hdf5
    with pytest.raises(ValueError, match="data.hdf5 already exists"):
        collect(LANGREACH, "expert", 1, tmp_path / "data", fmt="d4rl", progress=False)
    assert main([*args, "--overwrite"]) == 0
    assert len(read_episodes(out)) == 1 and not (out / "notes.txt").exists()
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    collect(LANGREACH, "expert", 1, tmp_path / "empty", progress=False)


class _Touch:
    """Unpickling this creates a file: the proof that untrusted data ran code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _tampered(tmp_path, name, edit):
    """A one-episode RLlib dataset whose packed state was changed by ``edit(state)``."""
    import msgpack
    import msgpack_numpy as mnp
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    ep = SingleAgentEpisode(
        observation_space=gym.spaces.Box(-1, 1, (1,)), action_space=gym.spaces.Box(-1, 1, (1,))
    )
    ep.add_env_reset(observation=np.zeros(1, np.float32))
    ep.add_env_step(
        observation=np.ones(1, np.float32),
        action=np.zeros(1, np.float32),
        reward=1.0,
        terminated=True,
    )
    state = ep.to_numpy().get_state()
    edit(state)
    out = tmp_path / name
    out.mkdir()
    item = msgpack.packb(state, default=mnp.encode)
    pq.write_table(pa.table({"item": [item]}), out / "part-000000.parquet")
    return out, ep.id_, item


def test_episode_data_that_would_unpickle_is_refused(tmp_path):
    import base64
    import io
    import zlib

    marker = tmp_path / "code-ran"
    evil = np.array([_Touch(str(marker))], dtype=object)

    def object_rewards(state):
        state["rewards"]["data"] = evil

    def pickled_space(state):
        buf = io.BytesIO()
        np.save(buf, evil, allow_pickle=True)
        state["_action_space"]["low"] = base64.b64encode(zlib.compress(buf.getvalue())).decode()

    for name, edit, field in (
        ("rewards", object_rewards, "rewards.data"),
        ("space", pickled_space, "_action_space.low"),
    ):
        path, episode_id, item = _tampered(tmp_path, name, edit)
        with pytest.raises(DataError) as err:
            read_episodes(path)
        text = str(err.value)
        assert "part-000000.parquet row 0" in text and f"episode {episode_id}" in text, text
        assert field in text and "unpickle" in text, text
        from vla_ray.data.rllib_format import check_packed

        with pytest.raises(DataError, match=field):
            check_packed([item], source="in the pre-learner")  # what VLAPreLearner runs
        assert not marker.exists(), "decoding the dataset ran code"
