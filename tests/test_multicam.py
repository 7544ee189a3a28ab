"""Several cameras end to end: LangReach's ``num_cameras``, the default trunk's multi-camera
vision path, a LeRobot dataset with two ``image``-dtype cameras (built by hand in the published
v3.0 layout) mapped onto that env, and BC on it from the CLI with validation metrics."""

from __future__ import annotations

import io
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import vla_ray.envs  # noqa: F401
from vla_ray.config import ConfigError, VLAConfig

LANGREACH = "vla_ray/LangReach-v0"
S = 16  # image size
CAMERAS = ("top", "side")


def test_langreach_renders_each_camera():
    env = gym.make(LANGREACH, num_cameras=2, image_size=S)
    obs, _ = env.reset(seed=0)
    assert env.observation_space["images"].shape == (2, S, S, 3)
    assert obs["images"].shape == (2, S, S, 3) and obs["images"].dtype == np.uint8
    assert np.array_equal(obs["image"], obs["images"][0])  # ``image`` is the top camera
    assert np.abs(obs["images"][0].astype(int) - obs["images"][1]).mean() > 5  # another view
    one, _ = gym.make(LANGREACH, image_size=S).reset(seed=0)
    assert np.array_equal(one["image"], obs["image"]) and "images" not in one
    with pytest.raises(ValueError, match="num_cameras"):
        gym.make(LANGREACH, num_cameras=3)
    env.close()


@pytest.fixture(scope="module")
def two_camera_vla():
    from vla_ray.presets import TINY_VLA
    from vla_ray.rl_module import VLAModule

    env = gym.make(LANGREACH, num_cameras=2, image_size=S)
    torch.manual_seed(0)
    module = VLAModule(
        observation_space=env.observation_space,
        action_space=env.action_space,
        model_config=dict(TINY_VLA, head="gaussian", value="none", num_cameras=2, vision_skip=True),
        inference_only=True,
    )
    obs, _ = env.reset(seed=1)
    env.close()
    return module.vla.eval(), obs


@torch.no_grad()
def test_default_trunk_encodes_each_camera_and_tags_it(two_camera_vla):
    vla, obs = two_camera_vla
    trunk = vla.trunk
    batch = {k: torch.as_tensor(v)[None] for k, v in obs.items()}
    context = torch.randn(1, trunk.hidden_size)
    vis = trunk._suffix_tokens(batch, context)[2]
    T = trunk.projector.num_tokens
    assert vis.shape == (1, 2 * T, trunk.hidden_size)
    for i in range(2):  # camera i's tokens: the shared encoder and projector + its embedding
        alone = trunk.projector(trunk.vision(batch["images"][:, i]), context)
        assert torch.allclose(vis[:, i * T : (i + 1) * T], alone + trunk.camera_embed[i], atol=1e-5)
    features = vla.features(batch)
    # the last token, both cameras' tokens (vision_skip) and the state (state_skip)
    assert features.shape[1] == trunk.feature_dim == trunk.hidden_size * (1 + 2 * T) + 4
    side = dict(batch, images=batch["images"].clone())
    side["images"][:, 1] = 255 - side["images"][:, 1]  # only the side camera changes
    changed = (vla.features(side) - features).abs().reshape(-1)
    d = trunk.hidden_size
    assert changed[d : d + T * d].max() < 1e-5 < changed[d + T * d :].max()
    one = {k: v for k, v in batch.items() if k != "images"}
    with pytest.raises(ValueError, match="'images' is missing"):
        vla.predict(one)
    assert vla.act(obs["images"], "reach the red target", obs["state"]).shape == (1, 2)
    with pytest.raises(ConfigError, match="num_cameras: 2 cameras need a vision encoder"):
        VLAConfig(vision="none", num_cameras=2)


def test_export_refuses_several_cameras(two_camera_vla, tmp_path):
    from vla_ray.export import ExportError, export

    vla, _ = two_camera_vla
    saved = vla.save_pretrained(tmp_path / "vla")
    with pytest.raises(ExportError, match="take one image, not the 2 cameras"):
        export(saved, ["onnx"], tmp_path / "export", progress=None)


# ---- a LeRobot v3.0 dataset with two image-dtype cameras, from LangReach's expert ------------
def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_multicam_lerobot(root: Path, episodes: int = 4, steps: int = 6) -> Path:
    """Expert episodes of two-camera LangReach in LeRobot's v3.0 layout (``datasets.Image``
    structs per camera, as ``lerobot`` writes image features; written here from the format)."""
    env = gym.make(LANGREACH, num_cameras=2, image_size=S, max_episode_steps=steps)
    cols: dict[str, list] = {
        **{f"observation.images.{c}": [] for c in CAMERAS},
        "observation.state": [],
        "action": [],
        "timestamp": [],
        "frame_index": [],
        "episode_index": [],
        "index": [],
        "task_index": [],
    }
    tasks: list[str] = []
    rows, index = [], 0
    for ep in range(episodes):
        obs, info = env.reset(seed=ep)
        if info["instruction"] not in tasks:
            tasks.append(info["instruction"])
        start = index
        for t in range(steps):
            action = info["expert_action"]
            for i, c in enumerate(CAMERAS):
                cols[f"observation.images.{c}"].append(
                    {"bytes": _png(obs["images"][i]), "path": None}
                )
            cols["observation.state"].append(obs["state"].tolist())
            cols["action"].append(action.tolist())
            cols["timestamp"].append(t / 10)
            cols["frame_index"].append(t)
            cols["episode_index"].append(ep)
            cols["index"].append(index)
            cols["task_index"].append(tasks.index(info["instruction"]))
            index += 1
            obs, _, term, trunc, info = env.step(action)
            if term or trunc:
                break
        rows.append(
            {
                "episode_index": ep,
                "tasks": [tasks[cols["task_index"][-1]]],
                "length": index - start,
                "data/chunk_index": 0,
                "data/file_index": 0,
                "dataset_from_index": start,
                "dataset_to_index": index,
                "meta/episodes/chunk_index": 0,
                "meta/episodes/file_index": 0,
            }
        )
    env.close()
    image_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    types = {
        **{f"observation.images.{c}": image_t for c in CAMERAS},
        "observation.state": pa.list_(pa.float32(), 4),
        "action": pa.list_(pa.float32(), 2),
        "timestamp": pa.float32(),
    }
    table = pa.table({k: pa.array(v, type=types.get(k, pa.int64())) for k, v in cols.items()})
    image = {"dtype": "image", "shape": [S, S, 3], "names": ["height", "width", "channels"]}
    scalar = {"shape": [1], "names": None}
    info = {
        "codebase_version": "v3.0",
        "robot_type": "langreach",
        "total_episodes": episodes,
        "total_frames": index,
        "total_tasks": len(tasks),
        "chunks_size": 1000,
        "fps": 10,
        "splits": {"train": f"0:{episodes}"},
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 500,
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": None,
        "features": {
            **{f"observation.images.{c}": dict(image) for c in CAMERAS},
            "observation.state": {"dtype": "float32", "shape": [4], "names": None},
            "action": {"dtype": "float32", "shape": [2], "names": None},
            **{
                k: {"dtype": "float32" if k == "timestamp" else "int64", **scalar}
                for k in ("timestamp", "frame_index", "episode_index", "index", "task_index")
            },
        },
    }
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    (root / "data" / "chunk-000").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    pq.write_table(table, root / "data" / "chunk-000" / "file-000.parquet")
    pq.write_table(pa.Table.from_pylist(rows), root / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(
        pa.table({"task_index": list(range(len(tasks))), "__index_level_0__": tasks}),
        root / "meta" / "tasks.parquet",
    )
    return root


def test_two_camera_lerobot_maps_onto_the_two_camera_env(tmp_path):
    from vla_ray.data import lerobot_format as lf
    from vla_ray.data.contract import EnvContract

    root = write_multicam_lerobot(tmp_path / "mc", episodes=2, steps=4)
    raw = [lf.read_episode(root, ref) for ref in lf.episode_refs(root)]
    contract = EnvContract(LANGREACH, {"num_cameras": 2, "image_size": S})
    obs = contract.observations(raw[0])
    assert obs["images"].shape == (5, 2, S, S, 3)
    assert np.array_equal(obs["image"], obs["images"][:, 0])  # the first camera in info.json
    assert np.array_equal(obs["images"][:, 1], raw[0].observations["side"])
    single = EnvContract(LANGREACH, {"image_size": S})  # a one-camera env takes the first one
    assert np.array_equal(single.observations(raw[0])["image"], raw[0].observations["top"])


@pytest.mark.slow  # ~60 s (+ Ray's start) on the loaded 2-core CI machine: Ray Data + BC + eval
def test_bc_on_two_camera_lerobot_from_the_cli(ray_session, tmp_path, capsys):
    """``vla-ray train --preset langreach-bc-multicam --data LEROBOT --val-fraction``: 2 BC
    updates on a 4-episode two-camera dataset; the held-out episode is scored (action MSE/L1
    per dimension) in metrics.jsonl, and the trained policy is evaluated on the env."""
    from vla_ray.cli import main

    data = write_multicam_lerobot(tmp_path / "mc")
    out = tmp_path / "run"
    argv = [
        "train",
        "--preset",
        "langreach-bc-multicam",
        "--data",
        str(data),
        "--val-fraction",
        "0.25",
        "--stop-iters",
        "2",
        "--output",
        str(out),
        "--quiet",
        "--set",
        f"env_config.image_size={S}",
        "--set",
        "env_config.max_episode_steps=6",
        "--set",
        "training.train_batch_size_per_learner=16",
        "--set",
        "eval_every=2",
        "--set",
        "eval_episodes=2",
        "--set",
        "env_runners.num_envs_per_env_runner=1",
    ]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    scored = [r for r in rows if "val_action_mse" in r]
    assert [r["iteration"] for r in scored] == [1, 2]
    assert len(scored[-1]["val_action_mse_per_dim"]) == 2
    assert all(np.isfinite(r["val_action_mse"]) and r["val_action_l1"] > 0 for r in scored)
    assert rows[-1]["success_rate"] is not None  # evaluated on the two-camera env
    config = json.loads((out / "checkpoints" / "last" / "vla" / "vla_config.json").read_text())
    assert config["num_cameras"] == 2
