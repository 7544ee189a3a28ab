"""The Ray Serve endpoint over real HTTP on localhost: answers equal the module's, batching,
the bad-input matrix with its status codes, the API key, the shield; plus the shield alone.

One Serve instance for the module, with two applications: the ONNX backend at ``/`` (default
shield, rate limit 0.25) and the torch backend at ``/torch`` (tight bounds, API key).
"""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import gymnasium as gym
import numpy as np
import pytest

from vla_ray.serve.client import act_body, encode_image, free_port, request
from vla_ray.serve.shield import Shield, ShieldConfigError

KEY = "s3cret"
TIGHT = 0.05


@pytest.fixture(scope="module")
def endpoint(ray_session, tiny_export):
    from ray import serve

    from vla_ray.serve.app import ServeSettings, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    onnx_app = build_app(
        ServeSettings(
            model=str(tiny_export),
            backend="onnx",
            batch_wait_timeout_s=0.02,
            max_batch_size=16,
            shield={"max_delta": 0.25},
            max_body_bytes=200_000,
        ),
        replica_cpus=0.5,
    )
    torch_app = build_app(
        ServeSettings(
            model=str(tiny_export),
            backend="torch",
            api_key=KEY,
            shield={"low": -TIGHT, "high": TIGHT},
        ),
        replica_cpus=0.5,
    )
    serve.run(onnx_app, name="onnx", route_prefix="/")
    serve.run(torch_app, name="torch", route_prefix="/torch")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def observations():
    """8 real LangReach observations with their instruction text."""
    env = gym.make("vla_ray/LangReach-v0")
    out = []
    for seed in range(8):
        obs, info = env.reset(seed=seed)
        out.append((obs, info["instruction"]))
    env.close()
    return out


def direct(vla, obs, instruction) -> np.ndarray:
    """The module called directly: VLA.act (K, A)."""
    return vla.act(obs["image"], instruction, obs["state"])


def test_act_over_http_equals_module(endpoint, tiny_vla, observations, tiny_export):
    spec = json.loads((tiny_export / "onnx" / "spec.json").read_text())
    for i, (obs, text) in enumerate(observations):
        body = act_body(obs["image"], text, obs["state"])
        if i % 2:  # the other image encoding: a nested uint8 list
            body["image"] = obs["image"].tolist()
        status, answer = request(f"{endpoint}/v1/act", body)
        assert status == 200, answer
        want = np.clip(direct(tiny_vla, obs, text), -1.0, 1.0)  # the default shield: bounds
        np.testing.assert_allclose(answer["actions"], want, atol=1e-4)
        assert answer["action"] == answer["actions"][0] and answer["chunk_size"] == 1
        assert answer["model_version"] == spec["model_version"] and answer["backend"] == "onnx"
        assert answer["latency_ms"] > 0
    # at least one of these real observations really needed the clamp
    raw = np.stack([direct(tiny_vla, o, t) for o, t in observations])
    assert np.abs(raw).max() > 1.0


def test_torch_backend_and_shield_clamp_over_http(endpoint, tiny_vla, observations):
    obs, text = observations[2]
    raw = direct(tiny_vla, obs, text)
    assert np.abs(raw).max() > TIGHT  # the model's action is outside the tight bounds
    status, answer = request(
        f"{endpoint}/torch/v1/act", act_body(obs["image"], text, obs["state"]), api_key=KEY
    )
    assert status == 200, answer
    assert answer["backend"] == "torch" and answer["shield"]["clamped"] is True
    np.testing.assert_allclose(answer["actions"], np.clip(raw, -TIGHT, TIGHT), atol=1e-6)
    status, spec = request(f"{endpoint}/torch/v1/spec", api_key=KEY)
    assert spec["shield"]["bounds"] == {"low": [-TIGHT] * 2, "high": [TIGHT] * 2}


def test_rate_limit_from_previous_action(endpoint, tiny_vla, observations):
    obs, text = observations[0]
    raw = np.clip(direct(tiny_vla, obs, text)[0], -1, 1)
    # at least 0.7 away from what the model wants in each dim, inside the bounds
    previous = np.where(raw >= 0, -0.7, 0.7).astype(np.float32)
    body = act_body(obs["image"], text, obs["state"], previous_action=previous)
    status, answer = request(f"{endpoint}/v1/act", body)
    assert status == 200 and answer["shield"]["rate_limited"] is True
    step = np.asarray(answer["action"]) - previous
    np.testing.assert_allclose(np.abs(step), 0.25, atol=1e-5)  # moved by max_delta, no more


def test_concurrent_requests_are_batched(endpoint, tiny_vla, observations):
    bodies = [act_body(o["image"], t, o["state"]) for o, t in observations] * 4
    before = request(f"{endpoint}/v1/health")[1]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda b: request(f"{endpoint}/v1/act", b), bodies))
    after = request(f"{endpoint}/v1/health")[1]
    for (status, answer), (obs, text) in zip(answers, observations * 4, strict=True):
        assert status == 200
        want = np.clip(direct(tiny_vla, obs, text), -1, 1)
        np.testing.assert_allclose(answer["actions"], want, atol=1e-4)
    assert after["requests"] - before["requests"] == len(bodies)
    assert after["batches"] - before["batches"] < len(bodies)  # some requests shared a batch
    assert after["largest_batch"] > 1


def _png(array: np.ndarray, mode: str | None = None) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _bad_cases(obs, text):
    good = act_body(obs["image"], text, obs["state"])
    img = obs["image"]

    def with_(**kw):
        return json.dumps({**good, **kw}).encode()

    def without(key):
        return json.dumps({k: v for k, v in good.items() if k != key}).encode()

    return {
        "image too small": (with_(image=_png(img[:32, :32])), 422, "image", "64x64x3"),
        "image grey": (with_(image=_png(img[..., 0])), 422, "image", "3 channels"),
        "image rgba": (
            with_(image=_png(np.dstack([img, img[..., :1]]))),
            422,
            "image",
            "got 4",
        ),
        "image list 4 channels": (
            with_(image=np.dstack([img, img[..., :1]]).tolist()),
            422,
            "image",
            "3 channels",
        ),
        "image list out of range": (
            with_(image=(img.astype(int) + 300).tolist()),
            422,
            "image",
            "0-255",
        ),
        "image list ragged": (with_(image=[[1, 2, 3], [4]]), 422, "image", "ragged"),
        "bad base64": (with_(image="not*base64!"), 422, "image", "base64"),
        "base64 not an image": (
            with_(image=base64.b64encode(b"hello world").decode()),
            422,
            "image",
            "PNG or JPEG",
        ),
        "state NaN": (with_(state=[0.0, float("nan"), 0.0, 0.0]), 422, "state", "finite"),
        "state inf": (with_(state=[float("inf"), 0.0, 0.0, 0.0]), 422, "state", "finite"),
        "state wrong length": (with_(state=[0.0, 0.0]), 422, "state", "expected 4"),
        "state missing": (without("state"), 422, "state", "required"),
        "image missing": (without("image"), 422, "image", "required"),
        "instruction missing": (without("instruction"), 422, "instruction", "required"),
        "instruction not text": (with_(instruction=5), 422, "instruction", "string"),
        "extra field": (with_(gripper=1), 422, "gripper", "not permitted"),
        "instruction too many tokens": (
            with_(instruction="reach the red target " * 5),
            422,
            "instruction",
            "at most 16",
        ),
        "instruction too many chars": (with_(instruction="a" * 600), 422, "instruction", "512"),
        "previous_action wrong length": (
            with_(previous_action=[0.0]),
            422,
            "previous_action",
            "expected 2",
        ),
        "previous_action NaN": (
            with_(previous_action=[float("nan"), 0.0]),
            422,
            "previous_action",
            "finite",
        ),
        "not JSON": (b"{image: nope", 400, "body", "not valid JSON"),
        "JSON list": (b"[1, 2, 3]", 422, "body", "JSON object"),
        "oversized body": (b"{" + b" " * 300_000 + b"}", 413, "body", "200000 bytes"),
    }


def test_bad_input_matrix(endpoint, observations):
    obs, text = observations[0]
    cases = _bad_cases(obs, text)
    for name, (body, status, field, words) in cases.items():
        got, answer = request(f"{endpoint}/v1/act", body)
        assert got == status, (name, got, answer)
        assert answer["field"] == field, (name, answer)
        assert answer["detail"].startswith(field) and words in answer["detail"], (name, answer)
    # the replica survived all of it
    got, answer = request(f"{endpoint}/v1/act", act_body(obs["image"], text, obs["state"]))
    assert got == 200 and request(f"{endpoint}/v1/health")[0] == 200


def test_jpeg_image_is_accepted(endpoint, observations):
    obs, text = observations[1]
    body = act_body(obs["image"], text, obs["state"])
    body["image"] = "data:image/jpeg;base64," + encode_image(obs["image"], "JPEG")
    status, answer = request(f"{endpoint}/v1/act", body)
    assert status == 200 and len(answer["action"]) == 2


def test_api_key(endpoint, observations):
    obs, text = observations[0]
    body = act_body(obs["image"], text, obs["state"])
    status, answer = request(f"{endpoint}/torch/v1/act", body)
    assert status == 401 and answer["field"] == "X-API-Key" and "missing" in answer["detail"]
    status, answer = request(f"{endpoint}/torch/v1/act", body, api_key="wrong")
    assert status == 401 and "wrong API key" in answer["detail"]
    assert request(f"{endpoint}/torch/v1/spec")[0] == 401
    assert request(f"{endpoint}/torch/v1/health")[0] == 200  # liveness stays open
    assert request(f"{endpoint}/torch/v1/act", body, api_key=KEY)[0] == 200


def test_health_spec_docs(endpoint, tiny_export):
    import urllib.request

    status, health = request(f"{endpoint}/v1/health")
    assert status == 200 and health["status"] == "ok" and health["backend"] == "onnx"
    status, spec = request(f"{endpoint}/v1/spec")
    assert status == 200
    assert [i["name"] for i in spec["inputs"]] == [
        "image",
        "state",
        "instruction",
        "instruction_mask",
    ]
    assert spec["shield"]["max_delta"] == 0.25
    assert spec["shield"]["bounds"] == {"low": [-1.0, -1.0], "high": [1.0, 1.0]}
    assert spec["serving"]["max_batch_size"] == 16 and spec["serving"]["api_key_required"] is False
    assert "api_key" not in spec["serving"]
    assert set(spec["request_schema"]["properties"]) == {
        "image",
        "instruction",
        "state",
        "previous_action",
    }
    with urllib.request.urlopen(f"{endpoint}/docs") as resp:
        assert resp.status == 200 and b"swagger" in resp.read().lower()
    status, openapi = request(f"{endpoint}/openapi.json")
    assert {"/v1/act", "/v1/health", "/v1/spec"} <= set(openapi["paths"])
    assert "requestBody" in openapi["paths"]["/v1/act"]["post"]


# ---- the shield on its own ------------------------------------------------------------------
SPEC = {
    "inputs": [{"name": "state", "shape": ["batch", 4]}],
    "action": {"dim": 2, "low": [-1.0, -1.0], "high": [1.0, 1.0]},
}


def test_shield_clamps_out_of_bounds_actions():
    shield = Shield(None, SPEC)
    out, report = shield.apply(np.array([[3.0, -0.5], [-7.0, 0.2]]))
    np.testing.assert_allclose(out, [[1.0, -0.5], [-1.0, 0.2]], atol=1e-7)
    assert report == {"rate_limited": False, "clamped": True, "workspace_blocked": False}
    out, report = shield.apply(np.array([[0.3, -0.5]]))
    assert not report["clamped"] and np.allclose(out, [[0.3, -0.5]])


def test_shield_rate_limit_within_chunk_and_workspace():
    ws = {"state_indices": [0, 1], "low": [-0.9, -0.9], "high": [0.9, 0.9]}
    shield = Shield({"max_delta": 0.1, "workspace": ws}, SPEC)
    chunk = np.array([[0.5, 0.0], [0.5, 0.0], [-0.5, 0.0]])
    out, report = shield.apply(chunk, state=np.zeros(4), previous_action=np.zeros(2))
    np.testing.assert_allclose(out[:, 0], [0.1, 0.2, 0.1])  # each step moves at most 0.1
    assert report["rate_limited"] and not report["workspace_blocked"]
    # at the +x wall: moving further out is blocked, moving back in is allowed
    shield = Shield({"workspace": ws}, SPEC)
    out, report = shield.apply(
        np.array([[0.5, 0.5], [-0.5, 0.5]]), state=np.array([0.95, 0.0, 0, 0])
    )
    np.testing.assert_allclose(out, [[0.0, 0.5], [-0.5, 0.5]])
    assert report["workspace_blocked"]
    assert shield.describe()["workspace"] == ws


@pytest.mark.parametrize(
    "config,match",
    [
        ({"max_delta": 0}, "max_delta: expected > 0"),
        ({"low": 1.0, "high": -1.0}, "low < high"),
        ({"low": [0.0, 0.0, 0.0]}, "expected 2 values"),
        ({"speed": 1}, "unknown key"),
        ({"workspace": {"state_indices": [0, 9], "low": [0, 0], "high": [1, 1]}}, "out of range"),
        ({"workspace": {"state_indices": [0]}}, "missing"),
    ],
)
def test_shield_config_errors(config, match):
    with pytest.raises(ShieldConfigError, match=match):
        Shield(config, SPEC)


def test_cli_serve_argument_errors(tmp_path, capsys, tiny_export):
    from vla_ray.cli import main

    assert main(["serve", "--model", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "not an export" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_export), "--autoscale", "4"]) == 2
    assert "expected MIN:MAX" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_export), "--max-delta", "-1"]) == 2
    assert "max_delta" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_export / "torchscript"), "--backend", "onnx"]) == 2
    assert "needs onnx" in capsys.readouterr().err
