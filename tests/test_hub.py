"""Hugging Face conventions, offline: ``VLA.from_pretrained`` by Hub repo id from the Hub cache,
``push_to_hub`` (only the network calls mocked), and the model cards written beside a VLA."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from vla_ray.model_card import find_eval, write_model_card
from vla_ray.models.vla import VLA

REPO_ID = "vla-ray-tests/tiny-langreach"
REVISION = "0123456789abcdef0123456789abcdef01234567"
EVAL = {
    "env": "vla_ray/LangReach-v0",
    "episodes": 100,
    "success_rate": 0.83,
    "mean_return": 4.25,
    "mean_length": 31.0,
    "success_by_target": {"blue": 0.8, "green": 0.9, "red": 0.79},
}


def _obs(vla: VLA, batch: int = 3) -> dict[str, np.ndarray]:
    from vla_ray.export import random_inputs

    return random_inputs(vla.config, len(vla.tokenizer), batch, seed=5)


def _hub_cache(cache, folder) -> None:
    """``folder`` as the Hub cache holds a downloaded repo (the layout huggingface_hub writes):
    ``models--ORG--NAME/blobs/<hash>``, ``snapshots/<commit>/<file>`` symlinks to the blobs and
    ``refs/main`` naming the commit."""
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hub cache as HF_HUB_CACHE, and HF_HUB_OFFLINE=1: no request leaves the process."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: set both
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_from_pretrained_by_hub_id_reads_the_hub_cache(tiny_vla, tiny_vla_dir, offline_hub):
    _hub_cache(offline_hub, tiny_vla_dir)
    vla = VLA.from_pretrained(REPO_ID).eval()
    obs = _obs(tiny_vla)
    torch.testing.assert_close(vla.predict(obs), tiny_vla.predict(obs))
    # a pinned revision (the commit) resolves the same snapshot
    again = VLA.from_pretrained(REPO_ID, revision=REVISION).eval()
    torch.testing.assert_close(again.predict(obs), tiny_vla.predict(obs))


def test_a_local_folder_wins_over_a_hub_id(tiny_vla_dir, offline_hub, tmp_path, monkeypatch):
    _hub_cache(offline_hub, tiny_vla_dir)
    monkeypatch.chdir(tmp_path)
    (tmp_path / REPO_ID).mkdir(parents=True)  # a local folder of that name, not a VLA
    with pytest.raises(FileNotFoundError, match="not a VLA directory"):
        VLA.from_pretrained(REPO_ID)


def test_hub_id_not_in_the_offline_cache_is_a_clear_error(offline_hub):
    with pytest.raises(FileNotFoundError, match=r"other-org/missing.*HF_HUB_OFFLINE"):
        VLA.from_pretrained("other-org/missing")
    with pytest.raises(FileNotFoundError, match="nor a Hugging Face Hub repo id"):
        VLA.from_pretrained("no/such/local/folder")


def test_push_to_hub_uploads_a_loadable_folder_with_a_card(tiny_vla, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, ModelCard

    calls: dict[str, dict] = {}
    remote = tmp_path / "remote"

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload_folder"] = {"repo_id": repo_id, **kwargs}
        shutil.copytree(folder_path, remote)  # what the Hub would store
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    meta = {"env": "vla_ray/LangReach-v0", "preset": "langreach-ppo", "iteration": 12}
    assert tiny_vla.push_to_hub(REPO_ID, meta=meta, private=True) == "commit-info"
    assert calls["create_repo"]["repo_id"] == REPO_ID
    assert calls["create_repo"]["private"] is True and calls["create_repo"]["exist_ok"] is True
    assert calls["upload_folder"]["repo_id"] == REPO_ID

    loaded = VLA.from_pretrained(remote).eval()
    obs = _obs(tiny_vla)
    torch.testing.assert_close(loaded.predict(obs), tiny_vla.predict(obs))
    assert json.loads((remote / "vla_ray_meta.json").read_text())["env"] == meta["env"]
    card = ModelCard.load(remote / "README.md")
    assert card.data.library_name == "vla-ray"
    assert card.data.pipeline_tag == "robotics"
    assert {"robotics", "vision-language-action", "langreach-ppo"} <= set(card.data.tags)
    assert card.text.lstrip().startswith(f"# {REPO_ID}")
    assert "`vla_ray/LangReach-v0`" in card.text
    assert "2 dimension(s), each in [-1, 1]" in card.text  # LangReach's action space
    assert "vla-ray train --preset langreach-ppo" in card.text
    assert f'VLA.from_pretrained("{REPO_ID}")' in card.text


def test_card_reports_eval_results_as_model_index(tiny_vla_dir, tmp_path):
    from huggingface_hub import ModelCard

    folder = shutil.copytree(tiny_vla_dir, tmp_path / "run" / "checkpoints" / "best" / "vla")
    assert find_eval(folder) is None
    (tmp_path / "run" / "eval.json").write_text(json.dumps(EVAL))
    result = find_eval(folder)
    assert result == EVAL  # three levels up: RUN/eval.json beside RUN/checkpoints/best/vla
    meta = {"env": EVAL["env"], "preset": "langreach-ppo"}
    card = ModelCard.load(write_model_card(folder, meta=meta, eval_result=result))
    by_metric = {r.metric_type: r for r in card.data.eval_results}
    assert by_metric["success_rate"].metric_value == 0.83
    assert by_metric["mean_return"].metric_value == 4.25
    assert by_metric["success_rate"].dataset_type == "vla_ray/LangReach-v0"
    assert "| red | 0.790 |" in card.text
    assert "no evaluation" not in card.text.lower()


def test_save_pretrained_and_export_write_model_cards(tiny_vla_dir, tiny_export):
    from huggingface_hub import ModelCard

    card = ModelCard.load(tiny_vla_dir / "README.md")
    assert card.data.library_name == "vla-ray"
    assert "No evaluation was saved" in card.text
    root = ModelCard.load(tiny_export / "README.md")
    summary = json.loads((tiny_export / "export.json").read_text())
    for fmt, row in summary["formats"].items():
        assert f"| `{fmt}` | `{row['model_file']}` |" in root.text
    assert (tiny_export / "pytorch" / "README.md").is_file()
