"""Export: parity of every format with the PyTorch module, the spec and tokenizer beside each
model, the Triton repository, the functional (cache-free) graph, the noise input of sampling heads, errors."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch

from vla_ray.cli import main
from vla_ray.config import VLAConfig
from vla_ray.export import (
    EXPORT_FORMATS,
    FP32_TOLERANCE,
    QUANTISED_TOLERANCE,
    SPEC_NAME,
    SUMMARY_NAME,
    ExportError,
    TritonInstanceGroup,
    export,
    input_names,
    load_runner,
    random_inputs,
    read_spec,
    reference_actions,
    triton_config,
)
from vla_ray.models.vla import VLA
from vla_ray.tokenizer import encode_instructions, load_tokenizer

FOLDERS = {f: ("triton/vla" if f == "triton" else f) for f in EXPORT_FORMATS}


def exported_formats(tiny_export) -> list[str]:
    return list(json.loads((tiny_export / SUMMARY_NAME).read_text())["formats"])


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_parity_every_format(fmt, tiny_vla, tiny_export):
    if fmt not in exported_formats(tiny_export):
        pytest.skip("openvino is not installed")
    folder = tiny_export / FOLDERS[fmt]
    runner = load_runner(folder)
    worst = 0.0
    for batch, seed in ((1, 11), (7, 12), (33, 13)):  # fresh inputs, not the export's own
        inputs = random_inputs(tiny_vla.config, len(tiny_vla.tokenizer), batch, seed=seed)
        got = runner(inputs)
        ref = reference_actions(tiny_vla, inputs)
        assert got.shape == ref.shape == (batch, 1, 2)
        worst = max(worst, float(np.abs(got - ref).max()))
    assert np.abs(ref).max() > 0.5  # the actions are not trivially small
    if fmt in QUANTISED_TOLERANCE:
        assert worst < QUANTISED_TOLERANCE[fmt] * 2.0  # documented: a fraction of the range
    else:
        assert worst < FP32_TOLERANCE
    spec = read_spec(folder)
    assert spec["parity"]["max_abs_diff"] <= spec["parity"]["tolerance"]


def test_int8_is_quantised_and_fp16_is_half(tiny_export):
    import onnx

    fp32 = (tiny_export / "onnx" / "model.onnx").stat().st_size
    int8 = (tiny_export / "onnx-int8" / "model.onnx").stat().st_size
    assert int8 < 0.6 * fp32
    ops = {n.op_type for n in onnx.load(str(tiny_export / "onnx-int8" / "model.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "ConvInteger"}
    fp16 = onnx.load(str(tiny_export / "onnx-fp16" / "model.onnx"))
    dtypes = {i.data_type for i in fp16.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in dtypes
    # inputs/outputs keep their fp32/uint8/int64 types
    assert fp16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_spec_and_tokenizer_beside_each_model(tiny_vla, tiny_export):
    cfg = tiny_vla.config
    for fmt in [*exported_formats(tiny_export), "pytorch"]:
        folder = tiny_export / FOLDERS.get(fmt, fmt)
        spec = json.loads((folder / SPEC_NAME).read_text())
        assert spec["format"] == fmt
        assert (folder / spec["model_file"]).is_file()
        assert [i["name"] for i in spec["inputs"]] == input_names(cfg)
        shapes = {i["name"]: (i["dtype"], i["shape"]) for i in spec["inputs"]}
        assert shapes["image"] == ("uint8", ["batch", 64, 64, 3])
        assert shapes["state"] == ("float32", ["batch", 4])
        assert shapes["instruction"] == ("int64", ["batch", 16])
        assert spec["outputs"] == [
            {
                "name": "actions",
                "dtype": "float32",
                "shape": ["batch", 1, 2],
                "description": "action chunk: 1 step(s) of 2 dims",
            }
        ]
        assert spec["action"] == {"dim": 2, "chunk_size": 1, "low": [-1.0] * 2, "high": [1.0] * 2}
        assert spec["normalisation"]["image"]["mean"] == [0.5, 0.5, 0.5]
        assert spec["model_version"].startswith("vla-")
        # the shipped tokenizer encodes like the model's own
        tok = load_tokenizer(str(folder / spec["instruction"]["tokenizer"]))
        text = ["go to the green ball"]
        np.testing.assert_array_equal(
            encode_instructions(text, 16, tok)[0], encode_instructions(text, 16)[0]
        )


def test_onnx_graph_is_functional_with_dynamic_batch(tiny_export):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tiny_export / "onnx" / "model.onnx"))
    inputs = {i.name: i for i in sess.get_inputs()}
    assert list(inputs) == ["image", "state", "instruction", "instruction_mask"]  # no cache
    assert all(isinstance(i.shape[0], str) for i in inputs.values())  # symbolic batch
    assert [o.name for o in sess.get_outputs()] == ["actions"]


def test_prefix_cached_onnx_equals_the_module_and_encodes_each_instruction_once(
    tiny_vla, tiny_export, langreach_obs_batch
):
    """The onnx export's prefix/suffix graphs with the runner's cache give the eager module's
    actions on several real instructions, repeated within and across batches; an instruction
    already seen is not encoded again."""
    from vla_ray.runtime import PREFIX_CACHE_KEY, PrefixCachedOnnxRunner

    folder = tiny_export / "onnx"
    spec = read_spec(folder)
    assert spec[PREFIX_CACHE_KEY]["prefix_outputs"][0] == "context"
    assert spec["parity"]["prefix_cache_max_abs_diff"] < FP32_TOLERANCE
    runner = load_runner(folder)
    assert isinstance(runner, PrefixCachedOnnxRunner)
    texts = ["reach the red target", "go to the green ball", "head for the blue dot"]
    ids, mask = encode_instructions(texts, 16, tiny_vla.tokenizer)
    obs = {k: v for k, v in langreach_obs_batch.items() if k != "instruction"}
    seen = 0
    for pick in ([0, 1, 0, 2, 1, 0, 0, 2], [2, 2, 2, 2, 2, 2, 2, 2], [1, 0, 2, 1, 0, 2, 1, 0]):
        x = {**obs, "instruction": ids[pick], "instruction_mask": mask[pick]}
        got = runner(x)
        np.testing.assert_allclose(got, reference_actions(tiny_vla, x), atol=FP32_TOLERANCE)
        seen = max(seen, len(set(pick)))
        assert runner.encoded == seen  # the first batch held 3 distinct instructions
    assert np.abs(got).max() > 0.5 and not np.allclose(got[0], got[1])
    # a new instruction is a miss; padding beyond the mask does not make a new one
    other = encode_instructions(["touch the green one"], 16, tiny_vla.tokenizer)
    x = {k: v[:2] for k, v in obs.items()}
    x["instruction"] = np.concatenate([other[0], other[0]])
    x["instruction"][1, other[1][0] == 0] = 7  # garbage in the padded slots
    x["instruction_mask"] = np.concatenate([other[1], other[1]])
    got = runner(x)
    assert runner.encoded == 4
    np.testing.assert_allclose(got, reference_actions(tiny_vla, x), atol=FP32_TOLERANCE)


def test_functional_forward_matches_memoised_forward(tiny_vla, langreach_obs_batch):
    trunk = tiny_vla.trunk
    obs = {k: torch.as_tensor(v) for k, v in langreach_obs_batch.items()}
    trunk._prefix_cache.clear()
    with torch.no_grad():
        functional = trunk.forward_functional(obs)
        assert not trunk._prefix_cache  # the functional path neither reads nor fills the memo
        memo = trunk(obs)
        assert trunk._prefix_cache
        memo_again = trunk(obs)  # served from the memo
    torch.testing.assert_close(functional, memo, atol=1e-5, rtol=0)
    torch.testing.assert_close(memo_again, memo, atol=0, rtol=0)


def test_triton_model_repository(tiny_export):
    import onnx

    model_dir = tiny_export / "triton" / "vla"
    assert (model_dir / "1" / "model.onnx").is_file()
    config = (model_dir / "config.pbtxt").read_text()
    assert re.search(r'^name: "vla"$', config, re.M)
    assert re.search(r'^backend: "onnxruntime"$', config, re.M)
    assert re.search(r"^max_batch_size: 64$", config, re.M)
    assert "dynamic_batching" in config
    blocks = re.findall(r'name: "(\w+)"\s+data_type: (TYPE_\w+)\s+dims: \[ ([\d, ]+) \]', config)
    model = onnx.load(str(model_dir / "1" / "model.onnx"))
    types = {
        "TYPE_UINT8": onnx.TensorProto.UINT8,
        "TYPE_FP32": onnx.TensorProto.FLOAT,
        "TYPE_INT64": onnx.TensorProto.INT64,
    }
    graph_io = {
        v.name: (
            v.type.tensor_type.elem_type,
            [d.dim_value for d in v.type.tensor_type.shape.dim[1:]],
        )
        for v in [*model.graph.input, *model.graph.output]
    }
    assert {b[0] for b in blocks} == set(graph_io)  # every tensor, nothing else
    for name, dtype, dims in blocks:
        assert types[dtype] == graph_io[name][0]
        assert [int(d) for d in dims.split(",")] == graph_io[name][1]  # batch dim excluded
    # by default one CPU instance, as before the option existed
    assert re.search(r"instance_group \[\s+\{\s+count: 1\s+kind: KIND_CPU\s+\}\s+\]", config)


def test_triton_instance_group_option(tiny_export, monkeypatch):
    spec = read_spec(tiny_export / "triton" / "vla")
    group = TritonInstanceGroup.parse("kind=KIND_GPU,count=2")
    config = triton_config(spec, 32, group)
    block = re.search(r"instance_group \[(.*?)\]\n", config, re.S).group(1)
    assert re.search(r"count: 2\s+kind: KIND_GPU", block) and "gpus" not in block
    assert re.search(r"^max_batch_size: 32$", config, re.M)
    pinned = triton_config(spec, 64, TritonInstanceGroup.parse("kind=gpu, count=1, gpus=0:1"))
    assert re.search(r"count: 1\s+kind: KIND_GPU\s+gpus: \[ 0, 1 \]", pinned)
    for text, field in (
        ("kind=KIND_TPU", "kind: expected one of KIND_CPU, KIND_GPU, got 'KIND_TPU'"),
        ("kind=KIND_GPU,count=0", "count: expected an integer >= 1, got 0"),
        ("count=two", "count: expected integers, got 'two'"),
        ("gpus=0", "gpus: only with kind=KIND_GPU"),
        ("replicas=2", "got 'replicas=2'"),
    ):
        with pytest.raises(ExportError, match=re.escape(field)):
            TritonInstanceGroup.parse(text)
    # the CLI flag reaches export() parsed; a bad one is an argparse error (exit 2)
    seen = {}

    def fake_export(checkpoint, formats, output, **kwargs):
        seen.update(kwargs)
        return {"model_version": "v", "output": str(output), "formats": {}}

    monkeypatch.setattr("vla_ray.export.export", fake_export)
    argv = ["export", "--checkpoint", "c", "--format", "triton", "--output", "o"]
    assert main([*argv, "--triton-instance-group", "kind=KIND_GPU,count=3"]) == 0
    assert seen["triton_instance_group"] == TritonInstanceGroup("KIND_GPU", 3)
    assert main(argv) == 0
    assert seen["triton_instance_group"] == TritonInstanceGroup("KIND_CPU", 1)
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--triton-instance-group", "kind=KIND_TPU"])
    assert exit_.value.code == 2


def test_torch_export_is_a_loadable_exported_program(tiny_vla, tiny_export, tmp_path):
    """model.pt2 is an ExportedProgram with a dynamic batch axis, and its runner needs torch
    only: loaded in a fresh process it imports neither transformers nor the model's code."""
    import subprocess

    folder = tiny_export / "torch-export"
    spec = read_spec(folder)
    assert spec["format"] == "torch-export" and spec["model_file"] == "model.pt2"
    program = torch.export.load(str(folder / "model.pt2"))
    assert isinstance(program, torch.export.ExportedProgram)
    inputs = random_inputs(tiny_vla.config, len(tiny_vla.tokenizer), 9, seed=21)
    np.savez(tmp_path / "inputs.npz", **inputs)
    code = (
        "import sys, numpy as np\n"
        "from vla_ray.runtime import TorchExportRunner\n"
        "inputs = dict(np.load(sys.argv[2]))\n"
        "names = [n for n in ('image', 'state', 'instruction', 'instruction_mask') if n in inputs]\n"
        "np.save(sys.argv[3], TorchExportRunner(sys.argv[1], names)(inputs))\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
        "assert 'vla_ray.models' not in sys.modules, 'the model code imported'\n"
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(folder / "model.pt2"),
            str(tmp_path / "inputs.npz"),
            str(tmp_path / "out.npy"),
        ],
        check=True,
        timeout=120,
    )
    got = np.load(tmp_path / "out.npy")
    np.testing.assert_allclose(got, reference_actions(tiny_vla, inputs), atol=FP32_TOLERANCE)


@pytest.mark.parametrize("head", ["diffusion", "flow_matching"])
def test_noise_sampling_head_takes_noise_as_input(tmp_path, head):
    """Heads that sample from noise export it as an input (flow matching: the Euler steps are
    unrolled in the graph) and match the PyTorch module for given and for zero noise."""
    cfg = VLAConfig(
        head=head,
        chunk_size=3,
        head_config={"inference_steps": 3, "hidden": 64},
        vision_config={"tokens": "keypoints"},
    )
    torch.manual_seed(0)
    src = VLA(cfg).save_pretrained(tmp_path / "vla")
    # flow matching also through the prefix-cached split graphs (noise is the suffix's input)
    split = head == "flow_matching"
    summary = export(src, "onnx", tmp_path / "out", prefix_cache=split, progress=None)
    assert summary["formats"]["onnx"]["max_abs_diff"] < FP32_TOLERANCE
    spec = read_spec(tmp_path / "out" / "onnx")
    assert ("prefix_cache" in spec) == split
    assert spec["inputs"][-1]["name"] == "noise" and spec["inputs"][-1]["shape"] == ["batch", 6]
    assert spec["head"] == {
        "name": head,
        "deterministic": True,
        "inference_steps": 3,
        "noise_input": "noise",
    }
    vla = VLA.from_pretrained(src).eval()
    runner = load_runner(tmp_path / "out" / "onnx")
    inputs = random_inputs(vla.config, len(vla.tokenizer), 4, seed=5)
    sampled = runner(inputs)
    np.testing.assert_allclose(sampled, reference_actions(vla, inputs), atol=FP32_TOLERANCE)
    # zero noise is the module's deterministic prediction
    inputs["noise"] = np.zeros_like(inputs["noise"])
    obs = {k: v for k, v in inputs.items() if k != "noise"}
    np.testing.assert_allclose(runner(inputs), vla.predict(obs).numpy(), atol=FP32_TOLERANCE)
    assert not np.allclose(sampled, runner(inputs), atol=1e-3)  # the noise matters


def test_state_normalisation_is_inside_the_exported_graph(tmp_path):
    """A VLA trained on standardised states (``state_mean``/``state_std``) exports a graph that
    takes the raw env state; the spec says so and gives the statistics."""
    mean, std = [10.0, -5.0, 0.0, 2.0], [4.0, 0.5, 1.0, 3.0]
    cfg = VLAConfig(vision="none", head="mlp", state_mean=mean, state_std=std)
    torch.manual_seed(0)
    src = VLA(cfg).save_pretrained(tmp_path / "vla")
    summary = export(src, "onnx", tmp_path / "out", progress=None)
    assert summary["formats"]["onnx"]["max_abs_diff"] < FP32_TOLERANCE
    spec = read_spec(tmp_path / "out" / "onnx")
    state = spec["normalisation"]["state"]
    assert state["applied"] == "inside the model"
    assert state["mean"] == mean and state["std"] == std
    vla = VLA.from_pretrained(src).eval()
    inputs = random_inputs(vla.config, len(vla.tokenizer), 3, seed=1)
    inputs["state"] = inputs["state"] * 10 + 5  # raw, far from standardised
    actions = load_runner(tmp_path / "out" / "onnx")(inputs)
    np.testing.assert_allclose(actions, reference_actions(vla, inputs), atol=FP32_TOLERANCE)


def test_transformer_head_and_rllib_module_dir(tmp_path, langreach_spaces):
    """An RLlib RLModule checkpoint directory exports too (here: autoregressive head)."""
    from vla_ray.rl_module import VLAModule

    obs_space, act_space = langreach_spaces
    torch.manual_seed(0)
    module = VLAModule(
        observation_space=obs_space,
        action_space=act_space,
        model_config={"head": "transformer", "head_config": {"d_model": 32}, "value": "none"},
    )
    module.save_to_path(str(tmp_path / "module"))
    summary = export(tmp_path / "module", "torchscript", tmp_path / "out", progress=None)
    assert summary["formats"]["torchscript"]["max_abs_diff"] < FP32_TOLERANCE
    runner = load_runner(tmp_path / "out" / "torchscript")
    inputs = random_inputs(module.vla.config, len(module.vla.tokenizer), 3, seed=2)
    np.testing.assert_allclose(runner(inputs), reference_actions(module.vla, inputs), atol=1e-5)


def test_export_errors(tiny_vla_dir, tmp_path, capsys, monkeypatch):
    with pytest.raises(ExportError, match="unknown \\['tflite'\\]; valid formats are onnx"):
        export(tiny_vla_dir, "onnx,tflite", tmp_path / "a", progress=None)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="is not an earlier export"):
        export(tiny_vla_dir, "torchscript", tmp_path / "busy", progress=None)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export(tmp_path / "nope", "onnx", tmp_path / "b", progress=None)
    # openvino missing: a clear error that says how to get it, before any work
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ExportError, match=r"pip install 'vla-ray\[openvino\]'"):
        export(tiny_vla_dir, "onnx,openvino", tmp_path / "c", progress=None)
    assert not (tmp_path / "c").exists()
    # the CLI reports the same errors with exit code 2
    with pytest.raises(SystemExit) as exit_:  # argparse checks --format before anything runs
        main(["export", "--checkpoint", str(tiny_vla_dir), "--format", "x", "--output", "o"])
    assert (
        exit_.value.code == 2
        and "unknown format(s) 'x'; choose from onnx" in capsys.readouterr().err
    )


def test_cli_export_writes_summary(tiny_vla_dir, tmp_path, capsys):
    out = tmp_path / "exp"
    code = main(
        [
            "export",
            "--checkpoint",
            str(tiny_vla_dir),
            "--format",
            "torchscript",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert list(summary["formats"]) == ["torchscript"]
    assert (out / "pytorch" / "model.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "torchscript" in printed and f"vla-ray serve --model {out}" in printed
    # exporting again over an earlier export replaces it as a whole
    (out / "stale.txt").write_text("from before")
    args = ["export", "--checkpoint", str(tiny_vla_dir), "--format", "torchscript"]
    assert main([*args, "--output", str(out)]) == 0
    assert not (out / "stale.txt").exists() and (out / "torchscript" / "model.pt").is_file()


@pytest.mark.parametrize(
    "layers, tokens, film",
    [
        (((32, 4, 4), (32, 3, 2), (32, 3, 1)), "keypoints", False),  # patchify stem, no padding
        (((8, 3, 1), (8, 3, 2)), "patches", True),  # padded stem: the offset varies at the edges
    ],
)
def test_folded_stem_cnn_equals_the_encoder(layers, tokens, film):
    from vla_ray.models.vision import CNNEncoder, FoldedStemCNN

    torch.manual_seed(0)
    enc = CNNEncoder((32, 32), layers=layers, tokens=tokens, film=film, context_dim=6).eval()
    if film:  # away from the identity initialisation, so that FiLM acts
        torch.nn.init.normal_(enc.film.weight)
    folded = FoldedStemCNN(enc)
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    context = torch.randn(4, 6)
    with torch.no_grad():
        want, got = enc(images, context), folded(images, context)
    assert folded.stem.in_channels == 3  # the two CoordConv channels are folded away
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conditioned", [True, False])
def test_folded_attention_pool_equals_the_projector(conditioned):
    from vla_ray.models.projectors import AttentionPoolProjector, FoldedAttentionPool

    torch.manual_seed(0)
    projector = AttentionPoolProjector(32, 64, 8, conditioned=conditioned).eval()
    folded = FoldedAttentionPool(projector)
    tokens, context = torch.randn(4, 32, 32), torch.randn(4, 64)
    with torch.no_grad():
        want, got = projector(tokens, context), folded(tokens, context)
    assert got.shape == want.shape == (4, 8, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(projector(tokens.flip(1).roll(1, 2), context), want)  # tokens matter


def test_rotary_table_equals_the_rotary_embedding(tiny_vla):
    from vla_ray.models.language import decoder_of, rotary_table_of

    decoder = decoder_of(tiny_vla.trunk.lm)
    table = rotary_table_of(decoder)
    positions = torch.tensor([[0, 5, 17, 30], [3, 3, 4, 511]])
    x = torch.zeros(2, 4, 8)
    for got, want in zip(table(x, positions), decoder.rotary_emb(x, positions), strict=True):
        assert got.shape == want.shape == (2, 4, decoder.rotary_emb.inv_freq.numel() * 2)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_export_variants_swap_for_the_export_and_restore(tiny_vla):
    from vla_ray.export import export_variants
    from vla_ray.models.language import DivRMSNorm, RotaryTable, decoder_of, rms_norms_of
    from vla_ray.models.projectors import FoldedAttentionPool
    from vla_ray.models.vision import FoldedStemCNN

    vision, decoder = tiny_vla.trunk.vision, decoder_of(tiny_vla.trunk.lm)
    projector = tiny_vla.trunk.projector
    rotary = decoder.rotary_emb
    norms = [n for _, _, n in rms_norms_of(decoder)]
    assert len(norms) == 2 * len(decoder.layers) + 1  # two per layer and the final one
    obs = random_inputs(tiny_vla.config, len(tiny_vla.tokenizer), batch=3)
    want = reference_actions(tiny_vla, obs)
    with pytest.raises(RuntimeError, match="inside"), export_variants(tiny_vla):
        assert isinstance(tiny_vla.trunk.vision, FoldedStemCNN)
        assert isinstance(tiny_vla.trunk.projector, FoldedAttentionPool)
        assert isinstance(decoder.rotary_emb, RotaryTable)
        assert isinstance(decoder.norm, DivRMSNorm) and isinstance(
            decoder.layers[0].input_layernorm, DivRMSNorm
        )
        named = {k: torch.as_tensor(v) for k, v in obs.items()}
        with torch.no_grad():
            got = tiny_vla.head.predict(tiny_vla.trunk.forward_functional(named), True)
        np.testing.assert_allclose(got.numpy(), want, atol=FP32_TOLERANCE)
        raise RuntimeError("inside")  # restored on errors too
    assert tiny_vla.trunk.vision is vision and decoder.rotary_emb is rotary
    assert tiny_vla.trunk.projector is projector
    assert [n for _, _, n in rms_norms_of(decoder)] == norms


def test_exported_suffix_graph_has_the_export_variants(tiny_export):
    import onnx

    graph = onnx.load(str(tiny_export / "onnx" / "suffix.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert not ops & {"Sin", "Cos", "Reciprocal"}  # rotary table; RMSNorm in its division form
    weights = {t.name: t for t in graph.initializer}
    conv = next(n for n in graph.node if n.op_type == "Conv")
    assert weights[conv.input[1]].dims[1] == 3  # RGB only: no CoordConv channels per call
