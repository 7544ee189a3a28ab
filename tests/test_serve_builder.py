"""Ray Serve's conventions: the application builder (`serve run vla_ray.serve.app:build
model=DIR`, the `args:` of a config file) and replicas of the ONNX/OpenVINO backends that import
neither torch nor transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _serve_builder_call(args: dict):
    """What `serve run module:build k=v` and a config file's `args:` do with the builder."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from vla_ray.serve.app import build

    return call_user_app_builder_with_args_if_necessary(build, args)


def test_builder_returns_the_application_with_the_given_options(tiny_export, tmp_path):
    from ray.serve import Application

    (tmp_path / "key").write_text("k3y\n")
    # as the command line gives them: every value a string, converted by the typed args
    app = _serve_builder_call(
        {
            "model": str(tiny_export),
            "backend": "onnx",
            "replicas": "2",
            "replica_cpus": "0.5",
            "max_batch_size": "8",
            "batch_wait_ms": "5",
            "shield": '{"low": -0.5, "high": 0.5}',
            "max_delta": "0.25",
            "api_key_file": str(tmp_path / "key"),
        }
    )
    assert isinstance(app, Application)
    dep = app._bound_deployment
    assert dep.name == "VLAPolicy"
    assert dep.num_replicas == 2 and dep.ray_actor_options["num_cpus"] == 0.5
    settings, scaling = dep.init_args
    assert settings["model"] == str(tiny_export.resolve()) and settings["backend"] == "onnx"
    assert settings["max_batch_size"] == 8 and settings["batch_wait_timeout_s"] == 0.005
    assert settings["shield"] == {"low": -0.5, "high": 0.5, "max_delta": 0.25}
    assert settings["api_key"] == "k3y" and scaling == {"replicas": 2}
    auto = _serve_builder_call(
        {"model": str(tiny_export), "min_replicas": "1", "max_replicas": "3"}
    )._bound_deployment
    assert auto._deployment_config.autoscaling_config.max_replicas == 3


@pytest.mark.parametrize(
    "args, field",
    [
        ({"replicaz": "2"}, "replicaz"),  # unknown key
        ({"backend": "tensorrt"}, "backend"),
        ({"replicas": "0"}, "replicas"),
        ({"max_replicas": "2"}, "min_replicas"),  # autoscaling needs both bounds
        ({"api_key_file": "/nonexistent/key"}, "api_key_file"),
    ],
)
def test_builder_bad_args_are_errors_naming_the_field(tiny_export, args, field):
    from pydantic import ValidationError

    with pytest.raises((ValidationError, ValueError, FileNotFoundError), match=field):
        _serve_builder_call({"model": str(tiny_export), **args})


def test_builder_bad_model_is_a_named_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model"):
        _serve_builder_call({"model": str(tmp_path / "missing")})


def test_the_shipped_serve_config_is_valid_and_builds(tiny_export):
    """serve/configs/policy.yaml: a valid `serve deploy` schema whose app builds (model set)."""
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "serve" / "configs" / "policy.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app_cfg,) = config["applications"]
    assert app_cfg["import_path"] == "vla_ray.serve.app:build"
    app = _serve_builder_call({**app_cfg["args"], "model": str(tiny_export)})
    assert app._bound_deployment.num_replicas == app_cfg["args"]["replicas"]


@pytest.mark.slow
def test_builder_app_serves_over_http(ray_session, tiny_export):
    """`serve.run` on the builder's application answers /v1/act like `vla-ray serve`."""
    import gymnasium as gym
    from ray import serve

    from vla_ray.serve.client import act_body, free_port, request

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = _serve_builder_call({"model": str(tiny_export), "replica_cpus": "0.5"})
        serve.run(app, name="builder", route_prefix="/")
        env = gym.make("vla_ray/LangReach-v0")
        obs, info = env.reset(seed=0)
        env.close()
        status, answer = request(
            f"http://127.0.0.1:{port}/v1/act",
            act_body(obs["image"], info["instruction"], obs["state"]),
        )
        assert status == 200, answer
        assert answer["backend"] == "onnx" and len(answer["action"]) == 2
    finally:
        serve.shutdown()


_REPLICA = """
import json, sys
import numpy as np
import vla_ray.serve.app as app  # what a replica unpickles the deployment from
from vla_ray.serve.backends import load_backend
from vla_ray.serve.schema import RequestParser
from vla_ray.serve.shield import Shield

backend = load_backend(sys.argv[1], sys.argv[2])
parser = RequestParser(backend.spec, backend.tokenizer)
inputs = parser.parse(app._example_body(backend.spec)).inputs
actions, _ = Shield(None, backend.spec).apply(backend.predict(inputs)[0])
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers"})
print(json.dumps({"heavy": heavy, "shape": list(actions.shape), "backend": backend.name}))
"""


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_onnx_and_openvino_replicas_import_neither_torch_nor_transformers(tiny_export, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    out = subprocess.run(
        [sys.executable, "-c", _REPLICA, str(tiny_export), backend],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["backend"] == backend and result["shape"][-1] == 2
    assert result["heavy"] == []


def test_export_tokenizer_without_transformers_gives_the_same_ids(tiny_export):
    from vla_ray.runtime import FastTokenizer, load_export_tokenizer
    from vla_ray.tokenizer import load_tokenizer

    folder = tiny_export / "onnx" / "tokenizer"
    fast = load_export_tokenizer(folder)
    assert isinstance(fast, FastTokenizer)
    reference = load_tokenizer(str(folder))
    for text in ("reach the red target", "Go to the BLUE disc!", "unknownword green <image>"):
        assert (
            fast(text, add_special_tokens=False)["input_ids"]
            == reference(text, add_special_tokens=False)["input_ids"]
        )


def test_export_tokenizer_ignores_the_padding_its_file_was_saved_with(tiny_export, tmp_path):
    """A tokenizer.json saved right after a padded call keeps that padding (and truncation);
    the export's tokenizer gives the unpadded ids all the same (the runner pads them)."""
    from tokenizers import Tokenizer

    from vla_ray.runtime import FastTokenizer

    plain = Tokenizer.from_file(str(tiny_export / "onnx" / "tokenizer" / "tokenizer.json"))
    plain.no_padding()
    plain.no_truncation()
    padded = Tokenizer.from_file(str(tiny_export / "onnx" / "tokenizer" / "tokenizer.json"))
    padded.enable_padding(length=16)
    padded.enable_truncation(max_length=16)
    padded.save(str(tmp_path / "tokenizer.json"))
    text = "reach the red target"
    expected = plain.encode(text, add_special_tokens=False).ids
    assert len(expected) < 16
    assert FastTokenizer(tmp_path / "tokenizer.json")(text, add_special_tokens=False)[
        "input_ids"
    ] == list(expected)


def test_openvino_backend_matches_onnx(tiny_export):
    pytest.importorskip("openvino")
    import numpy as np

    from vla_ray.serve.app import _example_body
    from vla_ray.serve.backends import load_backend
    from vla_ray.serve.schema import RequestParser

    onnx, ov = load_backend(tiny_export, "onnx"), load_backend(tiny_export, "openvino")
    inputs = RequestParser(onnx.spec, onnx.tokenizer).parse(_example_body(onnx.spec)).inputs
    np.testing.assert_allclose(ov.predict(inputs), onnx.predict(inputs), atol=1e-4)
