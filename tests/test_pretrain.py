"""VLM pretraining: synthetic LLaVA data, record checks, label masks, Ray Train DDP/align/resume,
and loading the exported VLM into VLAModule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from vla_ray.pretrain.data import (
    IGNORE_INDEX,
    INSTRUCT_FILE,
    PRETRAIN_FILE,
    RecordError,
    build_example,
    collate,
    load_records,
    make_vlm_data,
    position_phrase,
)
from vla_ray.pretrain.trainer import (
    PretrainConfig,
    PretrainError,
    build_vla,
    build_vlm,
    pretrain,
    shard_fsdp,
    vla_config_for,
)
from vla_ray.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def vlm_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlmdata")
    make_vlm_data(out, 8, seed=1, max_targets=3, progress=False)
    return out


class RecordingTracker:
    """A tracker (vla_ray.tracking.Tracker) that keeps what it is given."""

    def __init__(self):
        self.rows: list[tuple[int, dict]] = []
        self.summary: dict | None = None

    def log(self, metrics: dict, step: int) -> None:
        self.rows.append((step, metrics))

    def finish(self, summary: dict | None = None) -> None:
        self.summary = summary


def run_pretrain(data_dir, output, stage="align", trackers=None, **kw) -> dict:
    file = PRETRAIN_FILE if stage == "align" else INSTRUCT_FILE
    defaults = dict(batch_size=8, max_steps=3, checkpoint_every=100, progress=False, lr=1e-2)
    cfg = PretrainConfig(
        stage=stage, data=str(data_dir / file), output=str(output), **{**defaults, **kw}
    )
    return pretrain(cfg, trackers=trackers)


def losses(output) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


# ------------------------------------------------------------------------------ data, no Ray
def test_make_vlm_data_writes_llava_layouts(vlm_data):
    tok = load_tokenizer()
    for name in (PRETRAIN_FILE, INSTRUCT_FILE):
        records = json.loads((vlm_data / name).read_text())
        assert len(records) == 8
        for rec in records:
            assert set(rec) == {"id", "image", "conversations"}
            assert (vlm_data / "images" / rec["image"]).is_file()
            conv = rec["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert sum(t["value"].count("<image>") for t in conv) == 1
            for t in conv:  # the shipped tokenizer knows every word of the synthetic data
                ids = tok(t["value"], add_special_tokens=False)["input_ids"]
                assert tok.unk_token_id not in ids, t["value"]
        if name == INSTRUCT_FILE:
            assert max(len(r["conversations"]) for r in records) >= 4  # multi-turn


def test_captions_name_colours_at_their_pixels(vlm_data):
    from PIL import Image

    from vla_ray.envs.langreach import COLORS

    rec = json.loads((vlm_data / PRETRAIN_FILE).read_text())[0]
    img = np.asarray(Image.open(vlm_data / "images" / rec["image"]))
    assert img.shape == (64, 64, 3)
    caption = rec["conversations"][1]["value"]
    for colour in [c for c in COLORS if f"a {c} disc" in caption]:
        rgb = (np.array(COLORS[colour]) * 255).astype(int)
        ys, xs = np.nonzero(np.abs(img.astype(int) - rgb).sum(-1) < 60)
        assert len(xs), colour  # the disc is in the image ...
        x, y = xs.mean() / 32 - 1, 1 - ys.mean() / 32  # pixel -> arena coords (y up)
        assert f"a {colour} disc {position_phrase(x, y)}" in caption  # ... where the caption says
    assert position_phrase(-0.9, 0.9) == "at the top left"
    assert position_phrase(0.0, 0.0) == "in the center"


def test_instruct_labels_mask_everything_but_assistant_tokens():
    tok = load_tokenizer()
    conv = [
        {"from": "human", "value": "<image>\nwhat color is the disc at the top ?"},
        {"from": "gpt", "value": "it is red ."},
        {"from": "human", "value": "how many discs are there ?"},
        {"from": "gpt", "value": "there are two discs ."},
    ]
    ex = build_example(conv, tok, num_image_tokens=5, max_length=256)
    ids, labels, image = map(np.array, (ex.input_ids, ex.labels, ex.image_mask))
    assert image.sum() == 5 and np.all(ids[image] == tok.convert_tokens_to_ids("<image>"))
    learned = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[learned], ids[learned])
    answers = [
        tok(a, add_special_tokens=False)["input_ids"]
        for a in ("it is red .", "there are two discs .")
    ]
    expected = answers[0] + [tok.eos_token_id] + answers[1] + [tok.eos_token_id]
    assert ids[learned].tolist() == expected  # exactly the answers and their EOS
    assert not learned[image].any()
    question = tok("how many discs are there ?", add_special_tokens=False)["input_ids"]
    text = ids.tolist()
    start = next(i for i in range(len(text)) if text[i : i + len(question)] == question)
    assert np.all(labels[start : start + len(question)] == IGNORE_INDEX)
    role = tok("user :", add_special_tokens=False)["input_ids"]
    assert text[: len(role)] == role and np.all(labels[: len(role)] == IGNORE_INDEX)


def test_collate_pads_and_names_unreadable_images(vlm_data, tmp_path):
    tok = load_tokenizer()
    loaded = load_records(vlm_data / INSTRUCT_FILE)
    rows = {
        k: np.array([r[k] for r in loaded.records[:3]], dtype=object) for k in loaded.records[0]
    }
    b = collate(rows, tok, 8, (32, 32), 256)
    assert b["images"].shape == (3, 32, 32, 3) and b["images"].dtype == np.uint8
    L = b["input_ids"].shape[1]
    for k in ("attention_mask", "labels", "image_mask"):
        assert b[k].shape == (3, L)
    assert np.all(b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX)
    assert np.all(b["image_mask"].sum(1) == 8)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows["image"][1] = str(broken)
    with pytest.raises(RecordError, match=rf"record {rows['id'][1]}: cannot read image"):
        collate(rows, tok, 8, (32, 32), 256)


def test_bad_records_are_reported_by_id_and_skipped(vlm_data, tmp_path):
    records = json.loads((vlm_data / INSTRUCT_FILE).read_text())
    records[1]["image"] = "nope.png"
    records[2]["conversations"] = [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]
    records[3]["conversations"][0]["value"] += " <image>"
    bad_file = tmp_path / "llava.json"
    bad_file.write_text(json.dumps(records))
    logged: list[str] = []
    loaded = load_records(bad_file, vlm_data / "images", max_bad_fraction=0.5, log=logged.append)
    assert len(loaded.records) == 5
    reasons = dict(loaded.bad)
    assert "missing image" in reasons[records[1]["id"]]
    assert "'from' should be 'human'" in reasons[records[2]["id"]]
    assert "2 '<image>' placeholders" in reasons[records[3]["id"]]
    assert any(records[1]["id"] in m for m in logged) and "skipping 3 of 8 records" in logged[-1]
    with pytest.raises(RecordError, match=rf"3 of 8 records are bad.*record {records[1]['id']}"):
        load_records(bad_file, vlm_data / "images", max_bad_fraction=0.1, log=logged.append)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(strategy="zero3"), "valid names are ddp, fsdp"),
        (dict(precision="fp16"), "valid names are fp32, bf16"),
        (dict(batch_size=6, num_workers=4), "divisible by num_workers x grad_accum"),
        (dict(stage="align", lora=True), "LoRA is for instruct"),
        (dict(stage="caption"), "valid names are align, instruct"),
    ],
)
def test_bad_settings_are_rejected_before_starting(tmp_path, kw, match):
    args = {"stage": "instruct", "data": "x.json", "output": str(tmp_path), **kw}
    with pytest.raises(ValueError, match=match):
        PretrainConfig(**args).check()


# ----------------------------------------------------------------------------- Ray Train runs
def exported_weights(output) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(output / "vlm" / "model.safetensors"))


def assert_same_run(reference, output) -> None:
    """Same losses at every step and the same exported weights as the reference run."""
    ref, got = losses(reference), losses(output)
    assert [s for s, _ in got] == [s for s, _ in ref]
    np.testing.assert_allclose([x for _, x in got], [x for _, x in ref], rtol=1e-4)
    w_ref, w_got = exported_weights(reference), exported_weights(output)
    assert w_ref.keys() == w_got.keys()
    for k in w_ref:
        torch.testing.assert_close(w_got[k], w_ref[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def one_worker(ray_session, vlm_data, tmp_path_factory):
    """The reference run: stage instruct, 1 worker, 4 steps over the same global batch."""
    out = tmp_path_factory.mktemp("w1")
    tracker = RecordingTracker()
    summary = run_pretrain(
        vlm_data, out, stage="instruct", num_workers=1, max_steps=4, trackers=[tracker]
    )
    assert summary["steps"] == 4
    steps = losses(out)
    assert [s for s, _ in steps] == [1, 2, 3, 4]
    assert steps[-1][1] < steps[0][1]  # it learns
    # the driver followed metrics.jsonl: every step's row reached the tracker, then the summary
    assert [(s, r["loss"]) for s, r in tracker.rows] == steps
    assert tracker.summary["vlm"] == summary["vlm"] and tracker.summary["steps"] == 4
    return out


@pytest.mark.slow
def test_one_and_two_workers_give_the_same_losses(one_worker, vlm_data, tmp_path):
    """DDP correctness: the global batch (all 8 records) is the same, so every step must match,
    also when each worker accumulates its share over 2 micro-batches (DDP's no_sync)."""
    two = run_pretrain(
        vlm_data, tmp_path / "w2", stage="instruct", num_workers=2, grad_accum=2, max_steps=4
    )
    assert two["steps"] == 4
    assert_same_run(one_worker, tmp_path / "w2")


@pytest.mark.slow
def test_fsdp_matches_one_worker_through_an_interruption(one_worker, vlm_data, tmp_path):
    """FSDP2 over 2 CPU workers (gloo), 2 micro-batches per step, activation checkpointing on,
    failing before step 4 and resumed from the step-2 checkpoint: the same losses and weights as
    the 1-worker run, so the sharded gradients, the gathered checkpoint and the restored
    optimiser state are right."""
    out = tmp_path / "fsdp"
    kw = dict(
        stage="instruct",
        num_workers=2,
        strategy="fsdp",
        grad_accum=2,
        gradient_checkpointing=True,
        max_steps=4,
        checkpoint_every=2,
    )
    with pytest.raises(PretrainError, match="fault injection"):
        run_pretrain(vlm_data, out, fail_at_step=4, **kw)
    assert [s for s, _ in losses(out)] == [1, 2, 3]
    summary = run_pretrain(vlm_data, out, resume=True, **kw)
    assert summary["steps"] == 4
    assert_same_run(one_worker, out)  # step 4 needs Adam's moments from steps 1-3


@pytest.mark.slow
def test_bf16_autocast_runs_and_stays_close_to_fp32(one_worker, vlm_data, tmp_path):
    out = tmp_path / "bf16"
    run_pretrain(vlm_data, out, stage="instruct", precision="bf16", max_steps=2)
    ref, got = [x for _, x in losses(one_worker)[:2]], [x for _, x in losses(out)]
    np.testing.assert_allclose(got, ref, rtol=0.03)
    assert not np.allclose(got, ref, rtol=1e-6, atol=0)  # autocast did run in bf16
    assert {w.dtype for w in exported_weights(out).values()} == {torch.float32}


@pytest.fixture(scope="module")
def aligned(ray_session, vlm_data, tmp_path_factory):
    """Stage align, started from the data's folder with relative paths, as users type them (the
    Ray Train workers run in another directory)."""
    out = tmp_path_factory.mktemp("align")
    cwd = os.getcwd()
    os.chdir(vlm_data.parent)
    try:
        summary = run_pretrain(
            Path(vlm_data.name), Path(os.path.relpath(out)), stage="align", max_steps=2
        )
    finally:
        os.chdir(cwd)
    return out, summary


@pytest.mark.slow
def test_align_changes_only_projector_weights(aligned):
    from vla_ray.models.vla import VLA

    out, summary = aligned
    assert summary["steps"] == 2 and summary["bad_records"] == 0
    cfg = json.loads((out / "pretrain_config.json").read_text())
    before = build_vla(cfg["vla_config"], None, seed=0).state_dict()
    after = VLA.from_pretrained(out / "vlm").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert all(k.startswith("trunk.projector.") for k in changed), changed
    for k in before:
        if k.startswith(("trunk.vision.", "trunk.lm.", "trunk.bos")):
            assert torch.equal(before[k], after[k]), k  # bit-identical


@pytest.mark.slow
def test_resume_after_interruption_continues_from_last_step(ray_session, vlm_data, tmp_path):
    out = tmp_path / "run"
    kw = dict(stage="instruct", lora=True, max_steps=4, checkpoint_every=2)
    with pytest.raises(PretrainError, match="fault injection"):
        run_pretrain(vlm_data, out, fail_at_step=4, **kw)  # dies after step 3, checkpoint at 2
    first = (out / "metrics.jsonl").read_text().splitlines()
    assert [s for s, _ in losses(out)] == [1, 2, 3]
    with pytest.raises(ValueError, match="--resume"):
        run_pretrain(vlm_data, out, **kw)
    summary = run_pretrain(vlm_data, out, resume=True, **kw)
    assert summary["steps"] == 4
    again = (out / "metrics.jsonl").read_text().splitlines()
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4]  # step 3 replayed once, not duplicated
    assert again[:2] == first[:2]  # steps 1-2 came from the checkpoint: not rerun
    assert again[2] != first[2]
    meta = json.loads((out / "vlm" / "vlm_meta.json").read_text())
    assert meta["step"] == 4 and meta["stage"] == "instruct"
    saved = json.loads((out / "vlm" / "vla_config.json").read_text())
    assert saved["lora"] is None  # adapters merged into the exported LM


@pytest.mark.slow
def test_exported_vlm_loads_into_vla_module(aligned, langreach_spaces, langreach_obs_batch):
    from safetensors.torch import load_file

    from vla_ray.presets import get_preset
    from vla_ray.rl_module import VLAModule
    from vla_ray.train import parse_overrides

    out, _ = aligned
    vlm = out / "vlm"
    assert parse_overrides([f"vlm_path={vlm}"]) == {"model": {"vlm_path": str(vlm)}}
    obs_space, act_space = langreach_spaces
    model_config = {**get_preset("langreach-ppo").model, "vlm_path": str(vlm)}
    module = VLAModule(
        observation_space=obs_space, action_space=act_space, model_config=model_config
    )
    # the preset's training-only keypoint reconstruction stays (fresh decoder, VLM encoder)
    assert model_config["vision_config"]["recon_coeff"] > 0
    assert (
        module.vla.config.vision_config["recon_coeff"]
        == model_config["vision_config"]["recon_coeff"]
    )
    assert module.vla.trunk.vision.recon is not None
    saved = load_file(str(vlm / "model.safetensors"))
    assert not any(k.startswith("trunk.vision.recon.") for k in saved)
    state = module.vla.state_dict()
    # the action query is RL's own: it starts fresh, not from the VLM's untrained copy
    assert not torch.equal(state["trunk.query"], saved["trunk.query"])
    for k, v in saved.items():
        if k.startswith(("trunk.vision.", "trunk.projector.", "trunk.lm.", "trunk.bos")):
            torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
    batch = {Columns.OBS: {k: torch.as_tensor(v) for k, v in langreach_obs_batch.items()}}
    with torch.no_grad():
        dist_inputs = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
    assert dist_inputs.shape == (8, 4) and torch.isfinite(dist_inputs).all()
    with pytest.raises(ValueError, match="not both"):
        VLAModule(
            observation_space=obs_space,
            action_space=act_space,
            model_config={"vlm_path": str(vlm), "pretrained_path": str(vlm)},
        )


@pytest.mark.parametrize("lora", [False, True])
def test_fsdp_shards_each_decoder_layer_and_the_rest_at_the_root(lora, tmp_path):
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    cfg = PretrainConfig(stage="instruct", data="x.json", output=str(tmp_path), lora=lora)
    vla, vlm = build_vlm(vla_config_for(cfg).to_dict(), cfg)
    with socket.socket() as s:  # a free port for a one-process gloo group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        shard_fsdp(vlm)
        layers = [m for m in vlm.modules() if isinstance(m, Qwen2DecoderLayer)]
        assert len(layers) == vla.trunk.lm.config.num_hidden_layers
        assert all(isinstance(m, FSDPModule) for m in [vlm, *layers])
        assert not isinstance(vlm.trunk.vision, FSDPModule)  # in the root unit
        assert all(isinstance(p, DTensor) for p in vlm.parameters())
        trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
        assert trainable and all(("lora_" in n) == lora for n in trainable if ".layers." in n)
    finally:
        dist.destroy_process_group()


def test_trunk_weights_load_into_a_lora_wrapped_lm(tmp_path):
    from vla_ray.config import VLAConfig
    from vla_ray.models.vla import VLA, load_trunk_weights

    plain = VLAConfig(state_dim=0, head="mlp", vision_config={"tokens": "keypoints"})
    torch.manual_seed(0)
    src = VLA(plain)
    src.save_pretrained(tmp_path / "vlm")
    torch.manual_seed(1)
    lora = VLA(VLAConfig.from_dict({**plain.to_dict(), "lora": {"r": 4}}))
    load_trunk_weights(lora, tmp_path / "vlm")
    from vla_ray.models.vla import _peft_to_plain

    want = src.state_dict()
    lm_keys = [k for k in lora.state_dict() if k.startswith("trunk.lm.") and "lora_" not in k]
    assert any(".base_layer." in k for k in lm_keys)  # peft names really differ
    for k in lm_keys:
        torch.testing.assert_close(lora.state_dict()[k], want[_peft_to_plain(k)], rtol=0, atol=0)
    torch.testing.assert_close(lora.trunk.projector.kv.weight, src.trunk.projector.kv.weight)
    other = VLA(VLAConfig.from_dict({**plain.to_dict(), "llm_config": {"hidden_size": 32}}))
    with pytest.raises(ValueError, match="shape"):
        load_trunk_weights(other, tmp_path / "vlm")


def test_cli_pretrain_reports_bad_input(tmp_path, capsys):
    from vla_ray.cli import main

    code = main(
        [
            "pretrain",
            "--stage",
            "align",
            "--data",
            str(tmp_path / "nope.json"),
            "--output",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2 and "nope.json: no such file" in capsys.readouterr().err
    code = main(
        [
            "pretrain",
            "--stage",
            "align",
            "--data",
            "x.json",
            "--output",
            str(tmp_path / "run"),
            "--batch-size",
            "6",
            "--num-workers",
            "4",
        ]
    )
    assert code == 2 and "divisible by num_workers x grad_accum" in capsys.readouterr().err
    code = main(
        ["pretrain", "--stage", "align", "--data", "x.json", "--output", "o"]
        + ["--model-config", '{"llm_config": {"hidden_size": 32}']
    )
    assert code == 2 and "--model-config: not valid JSON" in capsys.readouterr().err


def test_metrics_follower_moves_the_bar_and_feeds_the_trackers(tmp_path):
    """What the driver shows while Ray Train runs: complete rows only, each step once (a
    restarted run truncates and rewrites metrics.jsonl), the bar at the last step."""
    from vla_ray.pretrain.trainer import MetricsFollower

    path = tmp_path / "metrics.jsonl"

    def row(step: int, loss: float) -> str:
        return json.dumps({"step": step, "loss": loss, "samples_per_s": 8.0}) + "\n"

    tracker = RecordingTracker()
    follower = MetricsFollower(path, total=5, trackers=[tracker], progress=False)
    assert follower.poll() == []  # nothing written yet
    path.write_text(row(1, 2.0) + row(2, 1.5) + '{"step": 3, "lo')  # step 3 being written
    assert [r["step"] for r in follower.poll()] == [1, 2]
    with open(path, "a") as f:
        f.write('ss": 1.2}\n')
    assert [r["step"] for r in follower.poll()] == [3]
    path.write_text(row(1, 2.0) + row(2, 1.5))  # a restart from the step-2 checkpoint
    with open(path, "a") as f:
        f.write(row(3, 1.25) + row(4, 1.0))
    assert [r["step"] for r in follower.poll()] == [4]  # step 3 was already shown
    assert [(s, r["loss"]) for s, r in tracker.rows] == [(1, 2.0), (2, 1.5), (3, 1.2), (4, 1.0)]
    assert follower.bar.n == 4 and follower.bar.total == 5
    # a resumed run's bar starts at the steps already in the file
    assert MetricsFollower(path, total=9, progress=False).bar.n == 4


def test_total_steps_of_epochs_and_max_steps():
    from vla_ray.pretrain.trainer import steps_per_epoch, total_steps

    cfg = PretrainConfig(stage="align", data="d", output="o", batch_size=8)
    assert steps_per_epoch(40, cfg) == 5
    assert total_steps(40, cfg) == 5  # one epoch by default
    assert (
        total_steps(40, PretrainConfig(stage="align", data="d", output="o", batch_size=8, epochs=3))
        == 15
    )
    capped = PretrainConfig(
        stage="align", data="d", output="o", batch_size=8, epochs=3, max_steps=7
    )
    assert total_steps(40, capped) == 7


def test_cli_pretrain_opens_the_trackers_it_is_asked_for(tmp_path, monkeypatch, capsys):
    import vla_ray.pretrain.trainer
    import vla_ray.tracking
    from vla_ray.cli import main

    seen = {}

    def fake_open(run_dir, config, *, wandb_project=None, mlflow_uri=None):
        seen.update(run_dir=run_dir, config=config, wandb=wandb_project, mlflow=mlflow_uri)
        return ["tracker"]

    def fake_pretrain(cfg, trackers=None):
        seen.update(trackers=trackers, progress=cfg.progress)
        return {"vlm": str(tmp_path / "run" / "vlm")}

    monkeypatch.setattr(vla_ray.tracking, "open_trackers", fake_open)
    monkeypatch.setattr(vla_ray.pretrain.trainer, "pretrain", fake_pretrain)
    argv = ["pretrain", "--stage", "align", "--data", "d.json", "--output", str(tmp_path / "run")]
    argv += ["--wandb", "proj", "--mlflow", "sqlite:///m.db", "--quiet"]
    assert main(argv) == 0
    assert seen["wandb"] == "proj" and seen["mlflow"] == "sqlite:///m.db"
    assert seen["trackers"] == ["tracker"] and seen["progress"] is False
    assert seen["config"]["stage"] == "align" and seen["config"]["batch_size"] == 32
    assert f"vla-ray report {tmp_path / 'run'}" in capsys.readouterr().out
