"""OpenVLA checkpoints in the published Hub layout, exercised on a tiny random checkpoint.

``write_tiny_checkpoint`` writes the files openvla/openvla-7b ships (config.json with the published
keys, sharded safetensors + index, tokenizer, dataset_statistics.json, preprocessor_config.json)
at tiny sizes, naming every tensor by hand after the published names, so loading it goes through
the same ``OpenVLA.from_pretrained`` path as the real 7B checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_ray.models.openvla import (
    INDEX_NAME,
    OpenVLA,
    OpenVLAError,
    OpenVLATrunk,
    bin_centers,
    decode_action_tokens,
    language_model_config,
    prompt_text,
    unnormalize_actions,
)
from vla_ray.tokenizer import encode_instructions

BASE_VOCAB = 512  # tokenizer vocabulary; the last 256 ids are the action bins
PAD_TO = 64
LM_VOCAB = BASE_VOCAB + PAD_TO  # the published embedding is padded up (32000 + 64 = 32064)
D = 64  # LM width
IMAGE = 28  # px; patch 14 -> 2 x 2 patches per ViT
DINO = dict(dim=32, depth=3, patch=14, mlp=128, reg=4, cls=True, ls=True, pool=0)
SIGLIP = dict(dim=32, depth=3, patch=14, mlp=119, reg=0, cls=False, ls=False, pool=119)
STATS_Q01 = [-0.05, -0.1, -0.2, -0.3, -0.4, -0.5, 0.0]
STATS_Q99 = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0]
MASK = [True] * 6 + [False]
IMAGENET, IMAGENET_SD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _stats(scale: float) -> dict:
    q01 = [scale * v for v in STATS_Q01]
    q99 = [scale * v for v in STATS_Q99]
    return {
        "action": {
            "mean": [0.0] * 7,
            "std": [1.0] * 7,
            "max": q99,
            "min": q01,
            "q01": q01,
            "q99": q99,
            "mask": MASK,
        },
        "proprio": {k: [0.0] * 7 for k in ("mean", "std", "max", "min", "q01", "q99")},
        "num_transitions": 1000,
        "num_trajectories": 10,
    }


NORM_STATS = {"bridge_orig": _stats(1.0), "fractal20220817_data": _stats(2.0)}


def _vit_tensors(prefix: str, spec: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    d, p, m = spec["dim"], spec["patch"], spec["mlp"]

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=gen) * scale

    t = {}
    if spec["cls"]:
        t["cls_token"] = r(1, 1, d)
    if spec["reg"]:
        t["reg_token"] = r(1, spec["reg"], d)
    t["pos_embed"] = r(1, (IMAGE // p) ** 2, d)
    t["patch_embed.proj.weight"] = r(d, 3, p, p)
    t["patch_embed.proj.bias"] = r(d)
    for i in range(spec["depth"]):
        b = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            t[b + norm + ".weight"] = 1 + r(d)
            t[b + norm + ".bias"] = r(d)
        t[b + "attn.qkv.weight"], t[b + "attn.qkv.bias"] = r(3 * d, d, scale=0.2), r(3 * d)
        t[b + "attn.proj.weight"], t[b + "attn.proj.bias"] = r(d, d, scale=0.2), r(d)
        t[b + "mlp.fc1.weight"], t[b + "mlp.fc1.bias"] = r(m, d, scale=0.2), r(m)
        t[b + "mlp.fc2.weight"], t[b + "mlp.fc2.bias"] = r(d, m, scale=0.2), r(d)
        if spec["ls"]:  # OpenVLA's port renames timm's LayerScale gamma to scale_factor
            t[b + "ls1.scale_factor"] = 0.5 + r(d)
            t[b + "ls2.scale_factor"] = 0.5 + r(d)
    t["norm.weight"], t["norm.bias"] = 1 + r(d), r(d)
    if spec["pool"]:
        h = spec["pool"]
        t["attn_pool.latent"] = r(1, 1, d)
        t["attn_pool.q.weight"], t["attn_pool.q.bias"] = r(d, d), r(d)
        t["attn_pool.kv.weight"], t["attn_pool.kv.bias"] = r(2 * d, d), r(2 * d)
        t["attn_pool.proj.weight"], t["attn_pool.proj.bias"] = r(d, d), r(d)
        t["attn_pool.norm.weight"], t["attn_pool.norm.bias"] = 1 + r(d), r(d)
        t["attn_pool.mlp.fc1.weight"], t["attn_pool.mlp.fc1.bias"] = r(h, d), r(h)
        t["attn_pool.mlp.fc2.weight"], t["attn_pool.mlp.fc2.bias"] = r(d, h), r(d)
    return {prefix + k: v for k, v in t.items()}


def _lm_tensors(gen: torch.Generator, layers: int = 2, inter: int = 128) -> dict[str, torch.Tensor]:
    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=gen) * scale

    p = "language_model."
    t = {p + "model.embed_tokens.weight": r(LM_VOCAB, D, scale=1.0)}
    for i in range(layers):
        b = f"{p}model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[b + f"self_attn.{proj}.weight"] = r(D, D)
        t[b + "mlp.gate_proj.weight"] = r(inter, D)
        t[b + "mlp.up_proj.weight"] = r(inter, D)
        t[b + "mlp.down_proj.weight"] = r(D, inter)
        t[b + "input_layernorm.weight"] = 1 + r(D)
        t[b + "post_attention_layernorm.weight"] = 1 + r(D)
    t[p + "model.norm.weight"] = 1 + r(D)
    t[p + "lm_head.weight"] = r(LM_VOCAB, D, scale=1.0)
    return t


def _tokenizer():
    """A Llama-style (SentencePiece-like BPE with '▁') fast tokenizer built locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(3000)]
    corpus = [prompt_text("pick up the red block"), prompt_text("open the drawer"), *words]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = [*letters, *"ABCDEFGHIJKLMNOPQRSTUVWXYZ?:.,\n", "▁"]
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() == BASE_VOCAB
    fast = LlamaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.add_special_tokens({"pad_token": "<PAD>"})  # id 512, as <PAD> is 32000 in openvla-7b
    return fast


def write_tiny_checkpoint(directory: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a random checkpoint in openvla-7b's published layout; returns the tensors."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        **_vit_tensors("vision_backbone.featurizer.", DINO, gen),
        **_vit_tensors("vision_backbone.fused_featurizer.", SIGLIP, gen),
    }
    vd = DINO["dim"] + SIGLIP["dim"]
    for name, shape in (("fc1", (4 * vd, vd)), ("fc2", (D, 4 * vd)), ("fc3", (D, D))):
        tensors[f"projector.{name}.weight"] = torch.randn(*shape, generator=gen) * 0.1
        tensors[f"projector.{name}.bias"] = torch.randn(shape[0], generator=gen) * 0.1
    tensors.update(_lm_tensors(gen))
    tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}  # published dtype

    names = sorted(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in shard}, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))

    text_config = {
        "_name_or_path": "meta-llama/Llama-2-7b-hf",
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": LM_VOCAB,
        "hidden_size": D,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": BASE_VOCAB,
    }
    config = {
        "arch_specifier": "no-align+fused-gelu-mlp",
        "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": {
            "AutoConfig": "configuration_prismatic.OpenVLAConfig",
            "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
        },
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "image_resize_strategy": "resize-naive",
        "image_sizes": [IMAGE, IMAGE],
        "llm_backbone_id": "llama2-7b-pure",
        "llm_max_length": 2048,
        "model_type": "openvla",
        "n_action_bins": 256,
        "norm_stats": NORM_STATS,
        "output_projector_states": False,
        "pad_to_multiple_of": PAD_TO,
        "pad_token_id": BASE_VOCAB,
        "text_config": text_config,
        "timm_model_ids": [
            "vit_large_patch14_reg4_dinov2.lvd142m",
            "vit_so400m_patch14_siglip_224",
        ],
        "timm_override_act_layers": [None, None],
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_fused_vision_backbone": True,
        "vision_backbone_id": "dinosiglip-vit-so-224px",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "dataset_statistics.json").write_text(json.dumps(NORM_STATS, indent=2))
    means = [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]]
    stds = [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]]
    pre = {
        "image_processor_type": "PrismaticImageProcessor",
        "processor_class": "PrismaticProcessor",
        "image_resize_strategy": "resize-naive",
        "input_sizes": [[3, IMAGE, IMAGE], [3, IMAGE, IMAGE]],
        "interpolations": ["bicubic", "bicubic"],
        "means": means,
        "stds": stds,
        "use_fused_vision_backbone": True,
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    _tokenizer().save_pretrained(str(directory))
    return tensors


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    directory = tmp_path_factory.mktemp("openvla-tiny")
    return directory, write_tiny_checkpoint(directory)


@pytest.fixture(scope="module")
def model(checkpoint) -> OpenVLA:
    return OpenVLA.from_pretrained(checkpoint[0], dtype=torch.float32)


def _edit(checkpoint, tmp_path: Path, **changes) -> Path:
    """A copy of the checkpoint with config.json keys changed (None deletes a key)."""
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint[0], copy)
    config = json.loads((copy / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _image(h: int = 40, w: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_weights_round_trip_by_published_names(checkpoint, model):
    _, written = checkpoint
    state = model.state_dict()
    assert set(state) == set(written)
    for name, tensor in written.items():
        assert state[name].dtype == torch.float32
        torch.testing.assert_close(state[name], tensor.float(), rtol=0, atol=0, msg=name)
    # the families the published files use
    for name in (
        "vision_backbone.featurizer.reg_token",
        "vision_backbone.featurizer.blocks.2.ls2.scale_factor",
        "vision_backbone.fused_featurizer.attn_pool.mlp.fc2.weight",
        "projector.fc3.weight",
        "language_model.model.layers.1.self_attn.o_proj.weight",
        "language_model.lm_head.weight",
    ):
        assert name in state
    assert model.vocab_size == BASE_VOCAB and model.action_dim("bridge_orig") == 7


def test_default_dtype_is_the_checkpoint_dtype(checkpoint):
    m = OpenVLA.from_pretrained(checkpoint[0], unnorm_key="bridge_orig")
    assert m.language_model.lm_head.weight.dtype == torch.bfloat16
    assert m.vision_backbone.featurizer.pos_embed.dtype == torch.bfloat16
    assert m.predict_action(_image(), "open the drawer").shape == (7,)


def test_prompt_ids_end_with_the_empty_token(model):
    ids = model.encode_prompt("Pick up the red block")[0].tolist()
    assert ids[0] == model.tokenizer.bos_token_id
    assert ids[-1] == model.empty_token_id == model.tokenizer.convert_tokens_to_ids("▁")
    text = model.tokenizer.decode(ids[1:-1])
    assert text == "In: What action should the robot take to pick up the red block?\nOut:"


def test_predict_action_is_finite_and_within_the_statistics(model):
    for key in NORM_STATS:
        stats = NORM_STATS[key]["action"]
        action = model.predict_action(_image(), "pick up the red block", unnorm_key=key)
        assert action.shape == (7,) and np.isfinite(action).all()
        q01, q99 = np.array(stats["q01"]), np.array(stats["q99"])
        m = np.array(MASK)
        assert ((action[m] >= q01[m]) & (action[m] <= q99[m])).all()
        assert -1 <= action[~m][0] <= 1  # unmasked dims stay normalised


def test_predict_action_decodes_the_greedy_action_tokens(checkpoint, tmp_path):
    """lm_head rows chosen so that only two action tokens can win the argmax: each action value
    must be one of their two de-normalised bin centres."""
    m = OpenVLA.from_pretrained(checkpoint[0], dtype=torch.float32, unnorm_key="bridge_orig")
    hi, lo = BASE_VOCAB - 10, BASE_VOCAB - 250  # bins 9 and 249
    with torch.no_grad():
        m.language_model.model.norm.weight.zero_()
        m.language_model.model.norm.weight[0] = 1.0
        m.language_model.lm_head.weight.zero_()
        m.language_model.lm_head.weight[hi, 0] = 100.0
        m.language_model.lm_head.weight[lo, 0] = -100.0
    action = m.predict_action(_image(seed=3), "open the drawer")
    centers = bin_centers(256)
    stats = NORM_STATS["bridge_orig"]["action"]
    options = np.stack([unnormalize_actions(np.full(7, centers[i]), stats) for i in (9, 249)])
    assert np.isclose(action[None], options).any(0).all(), (action, options)


def test_image_geometry_follows_the_published_processor():
    from vla_ray.models.openvla import ImageTransform, _resize_pil

    image = np.zeros((10, 20, 3), np.uint8)
    image[:, :, 0] = np.arange(20, dtype=np.uint8)[None] * 10  # red = 10 * column
    naive = _resize_pil(image, ImageTransform(8, IMAGENET, IMAGENET_SD, "resize-naive"))
    assert naive.shape == (8, 8, 3)
    crop = _resize_pil(image, ImageTransform(10, IMAGENET, IMAGENET_SD, "resize-crop"))
    assert crop.shape == (10, 10, 3)
    np.testing.assert_array_equal(crop[0, :, 0], np.arange(5, 15) * 10)  # the centre columns
    box = _resize_pil(image, ImageTransform(20, IMAGENET, IMAGENET_SD, "letterbox"))
    assert box.shape == (20, 20, 3)
    np.testing.assert_array_equal(box[0, 0], [123, 116, 103])  # int(255 * ImageNet mean)
    np.testing.assert_array_equal(box[5:15, :, 0], image[:, :, 0])


def test_bin_arithmetic_on_hand_picked_ids():
    V = 32000  # openvla-7b: text_config.vocab_size 32064 - pad_to_multiple_of 64
    centers = bin_centers(256)
    assert centers.shape == (255,)
    np.testing.assert_allclose(centers[[0, 127, 254]], [-1 + 1 / 255, 0.0, 1 - 1 / 255])
    ids = np.array([V - 1, V - 128, V - 255, V - 256, V, 31000])
    expected = centers[[0, 127, 254, 254, 0, 254]]  # V - id - 1, clipped to [0, 254]
    np.testing.assert_allclose(decode_action_tokens(ids, V), expected)
    stats = {"q01": [-2.0, 0.0], "q99": [2.0, 1.0], "mask": [True, False]}
    np.testing.assert_allclose(
        unnormalize_actions(np.array([0.5, 0.5]), stats), [0.75 * 4 - 2, 0.5]
    )
    no_mask = {"q01": [-2.0, 0.0], "q99": [2.0, 1.0]}
    np.testing.assert_allclose(unnormalize_actions(np.array([-1.0, 1.0]), no_mask), [-2.0, 1.0])


def test_minimal_published_text_config_gives_llama2_7b_sizes():
    """openvla-7b's text_config keeps only the keys that differ from transformers 4.40's
    LlamaConfig defaults; the rest must come out as Llama-2-7B's sizes."""
    cfg = language_model_config(
        {
            "model_type": "llama",
            "pad_token_id": 32000,
            "torch_dtype": "bfloat16",
            "vocab_size": 32064,
        }
    )
    assert type(cfg).__name__ == "LlamaConfig"
    got = {
        k: getattr(cfg, k)
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "tie_word_embeddings",
        )
    }
    assert got == {
        "vocab_size": 32064,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }


def test_full_size_architecture_matches_the_published_total_size():
    """On the meta device: openvla-7b's architecture (timm's ViT-L/14-reg4 DINOv2 and So400M/14
    SigLIP sizes, the minimal published text_config) holds 7,541,237,184 parameters, i.e. the
    15,082,474,368 bf16 bytes that openvla-7b's model.safetensors.index.json reports as
    total_size (figure as recorded by third parties; not downloaded here)."""
    from transformers import AutoModelForCausalLM

    from vla_ray.models.openvla import (
        PrismaticProjector,
        PrismaticVisionBackbone,
        TimmViT,
        ViTShape,
        vit_family,
    )

    dino = ViTShape(1024, 24, 14, 4096, 256, 4, 0)
    siglip = ViTShape(1152, 27, 14, 4304, 256, 0, 4304)
    text = {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16"}
    with torch.device("meta"):
        vision = PrismaticVisionBackbone(
            [
                TimmViT(vit_family("vit_large_patch14_reg4_dinov2.lvd142m"), dino),
                TimmViT(vit_family("vit_so400m_patch14_siglip_224"), siglip),
            ]
        )
        projector = PrismaticProjector(True, vision.embed_dim, 4096)
        lm = AutoModelForCausalLM.from_config(language_model_config({**text, "vocab_size": 32064}))
    modules = (vision, projector, lm)
    total = sum(t.numel() for m in modules for t in m.state_dict().values())
    assert total * 2 == 15_082_474_368


def test_other_model_type_is_rejected_naming_both(checkpoint, tmp_path):
    d = _edit(
        checkpoint, tmp_path, model_type="llava", architectures=["LlavaForConditionalGeneration"]
    )
    with pytest.raises(OpenVLAError) as err:
        OpenVLA.from_pretrained(d)
    msg = str(err.value)
    for word in (
        "llava",
        "LlavaForConditionalGeneration",
        "'openvla'",
        "OpenVLAForActionPrediction",
    ):
        assert word in msg


def test_unnorm_key_errors_list_the_datasets(model, checkpoint):
    with pytest.raises(OpenVLAError, match="unnorm_key.*bridge_orig, fractal20220817_data"):
        model.predict_action(_image(), "open the drawer")
    with pytest.raises(OpenVLAError, match="'libero'.*bridge_orig, fractal20220817_data"):
        model.predict_action(_image(), "open the drawer", unnorm_key="libero")
    with pytest.raises(OpenVLAError, match="'libero'.*bridge_orig"):
        OpenVLA.from_pretrained(checkpoint[0], unnorm_key="libero")


def test_missing_norm_stats_is_a_named_error(checkpoint, tmp_path):
    d = _edit(checkpoint, tmp_path, norm_stats=None)
    (d / "dataset_statistics.json").unlink()
    m = OpenVLA.from_pretrained(d, dtype=torch.float32)
    with pytest.raises(OpenVLAError, match="norm_stats: the checkpoint has none"):
        m.predict_action(_image(), "open the drawer")


def test_norm_stats_fall_back_to_dataset_statistics(checkpoint, tmp_path):
    d = _edit(checkpoint, tmp_path, norm_stats=None)
    m = OpenVLA.from_pretrained(d, dtype=torch.float32)
    assert m.action_stats("fractal20220817_data")["q99"][6] == 2.0


def test_wrong_image_is_a_named_error(model):
    with pytest.raises(OpenVLAError, match=r"image: expected .*\(H, W, 3\), given \(32, 32\)"):
        model.predict_action(np.zeros((32, 32), np.uint8), "open", unnorm_key="bridge_orig")
    with pytest.raises(OpenVLAError, match="image: expected dtype uint8, given float32"):
        model.predict_action(np.zeros((32, 32, 3), np.float32), "open", unnorm_key="bridge_orig")
    trunk = OpenVLATrunk(model)
    ids, mask = encode_instructions([prompt_text("open")], 64, model.tokenizer)
    obs = {
        "image": torch.zeros(1, 30, 30, 3, dtype=torch.uint8),
        "instruction": torch.from_numpy(ids),
        "instruction_mask": torch.from_numpy(mask),
    }
    with pytest.raises(
        OpenVLAError,
        match=r"obs\['image'\]: expected shape \(1, 28, 28, 3\), given \(1, 30, 30, 3\)",
    ):
        trunk(obs)
    obs["image"] = torch.zeros(1, IMAGE, IMAGE, 3, dtype=torch.uint8)
    obs["instruction_mask"] = torch.from_numpy(mask[:, ::-1].copy())  # left padding
    with pytest.raises(OpenVLAError, match=r"obs\['instruction_mask'\]: expected right padding"):
        trunk(obs)


def test_missing_and_unexpected_tensors_are_listed(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _edit(checkpoint, tmp_path)
    index = json.loads((d / INDEX_NAME).read_text())
    old = "vision_backbone.featurizer.blocks.0.ls1.scale_factor"
    new = "vision_backbone.featurizer.blocks.0.ls1.gamma"  # timm's own name
    shard = index["weight_map"].pop(old)
    index["weight_map"][new] = shard
    tensors = load_file(str(d / shard))
    tensors[new] = tensors.pop(old)
    save_file(tensors, str(d / shard))
    (d / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(OpenVLAError) as err:
        OpenVLA.from_pretrained(d)
    assert f"missing 1: {old}" in str(err.value)
    assert f"unexpected 1: {new}" in str(err.value)


def test_trunk_features_are_the_first_action_token_readout(model):
    trunk = OpenVLATrunk(model)
    assert trunk.feature_dim == trunk.hidden_size == D and trunk.vision is model.vision_backbone
    texts = ["pick up the red block", "open the drawer"]
    ids, mask = encode_instructions([prompt_text(t) for t in texts], 64, model.tokenizer)
    images = np.stack([_image(IMAGE, IMAGE, seed=s) for s in (1, 2)])
    obs = {
        "image": torch.from_numpy(images),
        "instruction": torch.from_numpy(ids),
        "instruction_mask": torch.from_numpy(mask),
        "state": torch.zeros(2, 7),
    }
    with trunk.shared_prefixes(), torch.no_grad():
        feats = trunk(obs)
        again = trunk.forward_functional(obs)
    assert feats.shape == (2, D) and torch.isfinite(feats).all()
    torch.testing.assert_close(feats, again)
    # the same hidden state the action decoder reads for the first action token
    from vla_ray.models.openvla import preprocess_image

    for row, text in enumerate(texts):
        pixels = preprocess_image(images[row], model.transforms)[None]
        with torch.no_grad():
            emb = model.embed(model.encode_prompt(text), pixels)
            ref = model.language_model.model(inputs_embeds=emb).last_hidden_state[0, -1]
        torch.testing.assert_close(feats[row], ref, rtol=1e-4, atol=1e-4)
    # trainable as a trunk: gradients reach the vision backbone, projector and LM
    trunk(obs).square().sum().backward()
    for p in (model.vision_backbone.featurizer.pos_embed, model.projector.fc1.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.language_model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_parallel_decoding_returns_a_chunk(checkpoint, tmp_path):
    from safetensors.torch import save_file

    m = OpenVLA.from_pretrained(
        checkpoint[0], dtype=torch.float32, action_decoding="l1_parallel", action_chunk=3
    )
    head_path = tmp_path / "action_head.safetensors"
    save_file(m.action_head.state_dict(), str(head_path))
    chunk = m.predict_action(_image(), "open the drawer", unnorm_key="bridge_orig")
    assert chunk.shape == (3, 7) and np.isfinite(chunk).all()
    q01, q99 = np.array(STATS_Q01), np.array(STATS_Q99)
    assert ((chunk[:, :6] >= q01[:6]) & (chunk[:, :6] <= q99[:6])).all()
    again = OpenVLA.from_pretrained(
        checkpoint[0],
        dtype=torch.float32,
        action_decoding="l1_parallel",
        action_chunk=3,
        action_head_path=head_path,
    )
    np.testing.assert_allclose(
        again.predict_action(_image(), "open the drawer", unnorm_key="bridge_orig"), chunk
    )
    with pytest.raises(OpenVLAError, match="action_decoding: unknown name 'diffusion'"):
        OpenVLA.from_pretrained(checkpoint[0], action_decoding="diffusion")


def test_openvla_backbone_in_the_vla_and_the_rl_module(checkpoint, tmp_path):
    """``vlm_path`` of an OpenVLA checkpoint gives backbone='openvla': the env's bare
    instruction ids are wrapped in OpenVLA's prompt, heads train on the readout, LoRA adapts
    the LM only, and save_pretrained/from_pretrained round-trips."""
    import gymnasium as gym
    from ray.rllib.core.columns import Columns

    import vla_ray.envs  # noqa: F401
    from vla_ray.config import ConfigError, VLAConfig
    from vla_ray.models.vla import VLA
    from vla_ray.rl_module import VLAModule

    directory, _ = checkpoint
    env = gym.make(
        "vla_ray/LangReach-v0",
        image_size=IMAGE,
        tokenizer=str(directory),
        instruction_max_length=24,
    )
    obs = [env.reset(seed=s)[0] for s in range(3)]
    batch = {k: torch.as_tensor(np.stack([o[k] for o in obs])) for k in obs[0]}
    module = VLAModule(
        observation_space=env.observation_space,
        action_space=env.action_space,
        model_config={"vlm_path": str(directory), "lora": {"r": 4}, "value": "shared"},
    )
    env.close()
    vla = module.vla
    assert vla.config.backbone == "openvla"
    out = module.forward_train({Columns.OBS: batch})
    assert out[Columns.ACTION_DIST_INPUTS].shape == (3, 4)
    trained = {n for n, p in vla.trunk.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and "language_model" in n for n in trained)
    # the wrapped prompt is OpenVLA's own: the same feature as the prompt encoded whole
    trunk = vla.trunk
    ids, mask = encode_instructions(["reach the red target"], 24, vla.tokenizer)
    full_ids, full_mask = encode_instructions(
        [prompt_text("reach the red target")], 64, vla.tokenizer
    )
    image = torch.as_tensor(np.stack([_image(IMAGE, IMAGE, seed=3)]))
    with torch.no_grad():
        wrapped = trunk(
            {
                "image": image,
                "instruction": torch.as_tensor(ids),
                "instruction_mask": torch.as_tensor(mask),
            }
        )
        trunk.wrap_prompt = False
        whole = trunk(
            {
                "image": image,
                "instruction": torch.as_tensor(full_ids),
                "instruction_mask": torch.as_tensor(full_mask),
            }
        )
        trunk.wrap_prompt = True
    torch.testing.assert_close(wrapped, whole)
    # save and load through the VLA (the architecture comes from vlm_path)
    vla.save_pretrained(tmp_path / "vla")
    again = VLA.from_pretrained(tmp_path / "vla")
    with torch.no_grad():
        torch.testing.assert_close(again.trunk(batch), vla.trunk(batch), rtol=0, atol=0)
    # an env image size the checkpoint does not take is named
    with pytest.raises(
        ConfigError, match=r"image_size: .* takes \(28, 28\) images, the env gives \(32, 32\)"
    ):
        VLA(VLAConfig(backbone="openvla", vlm_path=str(directory), image_size=(32, 32)))
