"""The Ray Serve endpoint over real HTTP on localhost: answers equal the module's, batching,
the bad-input matrix with its status codes, the API key, the shield; plus the shield alone.

One Serve instance for the module, with two applications: the ONNX backend at ``/`` (default
shield, rate limit 0.25) and the torch backend at ``/torch`` (tight bounds, API key).
"""

from __future__ import annotations

import base64
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor

import gymnasium as gym
import numpy as np
import pytest

from vla_ray.serve.client import act_batch_body, act_body, encode_image, free_port, request
from vla_ray.serve.shield import Shield, ShieldConfigError

KEY = "s3cret"
TIGHT = 0.05
LIMIT_BODY_S = 2.0


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
    # slow and piled-up requests: one request at a time, one waiting, bodies within 2 s
    limits_app = build_app(
        ServeSettings(model=str(tiny_export), backend="onnx", body_timeout_s=LIMIT_BODY_S),
        replica_cpus=0.25,
        max_ongoing_requests=1,
        max_queued_requests=1,
    )
    serve.run(onnx_app, name="onnx", route_prefix="/")
    serve.run(torch_app, name="torch", route_prefix="/torch")
    serve.run(limits_app, name="limits", route_prefix="/limits")
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


# the ONNX app's shield: bounds [-1, 1], rate limit 0.25 from the neutral action (0, 0) when a
# request has no previous_action
ONNX_SHIELD = Shield(
    {"max_delta": 0.25}, {"inputs": [], "action": {"dim": 2, "low": [-1.0] * 2, "high": [1.0] * 2}}
)


def shielded(raw: np.ndarray, previous=None) -> np.ndarray:
    return ONNX_SHIELD.apply(raw, previous_action=previous)[0]


def test_act_over_http_equals_module(endpoint, tiny_vla, observations, tiny_export):
    spec = json.loads((tiny_export / "onnx" / "spec.json").read_text())
    for i, (obs, text) in enumerate(observations):
        raw = direct(tiny_vla, obs, text)
        # from the clamped action itself: the rate limit does not move it
        previous = np.clip(raw[0], -1.0, 1.0)
        body = act_body(obs["image"], text, obs["state"], previous_action=previous)
        if i % 2:  # the other image encoding: a nested uint8 list
            body["image"] = obs["image"].tolist()
        status, answer = request(f"{endpoint}/v1/act", body)
        assert status == 200, answer
        want = np.clip(raw, -1.0, 1.0)  # the default shield: bounds
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
        want = shielded(direct(tiny_vla, obs, text))  # rate-limited from the neutral action
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
        "state beyond float32": (with_(state=[1e39, 0.0, 0.0, 0.0]), 422, "state", "float32"),
        "previous_action beyond float32": (
            with_(previous_action=[0.0, -1e39]),
            422,
            "previous_action",
            "float32",
        ),
        "previous_action outside the bounds": (
            with_(previous_action=[0.0, 5.0]),
            422,
            "previous_action",
            "within the action bounds [-1, -1]..[1, 1], got [0, 5]",
        ),
        "previous_action not numbers": (
            with_(previous_action=["a", "b"]),
            422,
            "previous_action",
            "expected a number",
        ),
        "deeply nested JSON": (b"[" * 100_000 + b"]" * 100_000, 400, "body", "nested too deeply"),
        "deeply nested image": (
            with_(image=json.loads("[" * 500 + "]" * 500)),
            422,
            "image",
            "expected",
        ),
        "state wrong type": (with_(state={"x": 1}), 422, "state", "valid list"),
        "not JSON": (b"{image: nope", 400, "body", "not valid JSON"),
        "JSON list": (b"[1, 2, 3]", 422, "body", "JSON object"),
        "oversized body": (b"{" + b" " * 300_000 + b"}", 413, "body", "200000 bytes"),
    }


INTERNALS = ("Error", "Traceback", "recursion", 'File "', "site-packages")


def test_bad_input_matrix(endpoint, observations):
    obs, text = observations[0]
    cases = _bad_cases(obs, text)
    for name, (body, status, field, words) in cases.items():
        got, answer = request(f"{endpoint}/v1/act", body)
        assert got == status, (name, got, answer)
        assert answer["field"] == field, (name, answer)
        assert answer["detail"].startswith(field) and words in answer["detail"], (name, answer)
        # no Python internals in the answer
        assert not any(w in answer["detail"] for w in INTERNALS), (name, answer)
    # the replica survived all of it
    got, answer = request(f"{endpoint}/v1/act", act_body(obs["image"], text, obs["state"]))
    assert got == 200 and request(f"{endpoint}/v1/health")[0] == 200


def test_states_the_model_overflows_on_are_422_and_spare_their_batch(
    endpoint, tiny_vla, observations
):
    """A state within float32 that would drive the model to NaN (3e38) is beyond the range the
    replica probed at start-up: 422 naming the state (JSON, no traceback), never a 500; the
    requests sent with it get their normal answers."""
    good = [(o, t, act_body(o["image"], t, o["state"])) for o, t in observations]
    obs, text = observations[3]
    bad = act_body(obs["image"], text, [3e38] * 4)
    bodies = [b for _, _, b in good] + [bad] * 4
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda b: request(f"{endpoint}/v1/act", b), bodies))
    for (status, answer), (o, t, _) in zip(answers, good, strict=False):
        assert status == 200, answer
        np.testing.assert_allclose(answer["actions"], shielded(direct(tiny_vla, o, t)), atol=1e-4)
    for status, answer in answers[len(good) :]:
        assert status == 422 and answer["field"] == "state", answer
        assert "output is finite" in answer["detail"] and "Traceback" not in answer["detail"]
    assert request(f"{endpoint}/v1/health")[1]["largest_batch"] > 1


def test_act_batch_answers_each_row_as_act_and_a_bad_row_fails_alone(
    endpoint, tiny_vla, observations
):
    """POST /v1/act_batch: the good rows get /v1/act's shielded actions, in order; every bad
    row of the /v1/act matrix (and a state beyond the probed range) gets its own status and
    named field in its slot, without changing the others."""
    obs0, text0 = observations[0]
    bad = {}
    for name, (raw_body, status, field, words) in _bad_cases(obs0, text0).items():
        try:
            row = json.loads(raw_body)
        except (ValueError, RecursionError):
            continue  # not JSON: a whole-body error, checked below
        if status == 422:
            bad[name] = (row, status, field, words)
    obs3, text3 = observations[3]
    # a state the model's output would overflow on: refused by the probed state range (the
    # model-error answer of a row is checked in test_safety.py, with that range lifted)
    bad["state beyond the probed range"] = (
        act_body(obs3["image"], text3, [3e38] * 4),
        422,
        "state",
        "output is finite",
    )
    assert len(bad) > 20
    good = []
    for i, (obs, text) in enumerate(observations):
        raw = direct(tiny_vla, obs, text)
        previous = np.clip(raw[0], -1.0, 1.0) if i % 2 else None
        good.append((act_body(obs["image"], text, obs["state"], previous), shielded(raw, previous)))
    # bad rows between the good ones
    rows, want = [], []
    bad_items = list(bad.items())
    for i in range(max(len(good), len(bad_items))):
        if i < len(good):
            rows.append(good[i][0])
            want.append(good[i][1])
        if i < len(bad_items):
            rows.append(bad_items[i][1][0])
            want.append(bad_items[i])
    status, answer = request(f"{endpoint}/v1/act_batch", {"observations": rows})
    assert status == 200, answer
    assert answer["backend"] == "onnx" and answer["latency_ms"] > 0
    assert len(answer["results"]) == len(rows)
    for got, expected in zip(answer["results"], want, strict=True):
        if isinstance(expected, np.ndarray):
            assert got["status"] == 200, got
            np.testing.assert_allclose(got["actions"], expected, atol=1e-4)
            assert got["action"] == got["actions"][0] and got["chunk_size"] == 1
            assert got["safety"]["stopped_by"] is None
            continue
        name, (_, code, field, words) = expected
        assert got["status"] == code and got["field"] == field, (name, got)
        assert got["detail"].startswith(field) and words in got["detail"], (name, got)
        assert not any(w in got["detail"] for w in INTERNALS), (name, got)
    # the vectorised client's helper builds the same rows
    images = np.stack([o["image"] for o, _ in observations])
    states = np.stack([o["state"] for o, _ in observations])
    texts = [t for _, t in observations]
    status, answer = request(f"{endpoint}/v1/act_batch", act_batch_body(images, texts, states))
    assert status == 200 and [r["status"] for r in answer["results"]] == [200] * 8
    for got, (obs, text) in zip(answer["results"], observations, strict=True):
        np.testing.assert_allclose(got["actions"], shielded(direct(tiny_vla, obs, text)), atol=1e-4)


def test_act_batch_whole_body_errors(endpoint, observations):
    obs, text = observations[0]
    one = act_body(obs["image"], text, obs["state"])
    cases = {
        "not JSON": (b"{observations: [", 400, "body", "not valid JSON"),
        "deeply nested": (b"[" * 100_000 + b"]" * 100_000, 400, "body", "nested too deeply"),
        "a list": (b"[1]", 422, "body", "JSON object"),
        "no rows": ({"observations": []}, 422, "observations", "1 to 128 rows, got 0"),
        "too many rows": ({"observations": [{}] * 129}, 422, "observations", "got 129"),
        "rows not a list": ({"observations": one}, 422, "observations", "got a dict"),
        "missing": ({}, 422, "observations", "got nothing"),
        "extra field": ({"observations": [one], "mode": 1}, 422, "mode", "extra field"),
    }
    for name, (body, status, field, words) in cases.items():
        got, answer = request(f"{endpoint}/v1/act_batch", body)
        assert got == status and answer["field"] == field, (name, got, answer)
        assert answer["detail"].startswith(field) and words in answer["detail"], (name, answer)
    assert request(f"{endpoint}/torch/v1/act_batch", {"observations": [one]})[0] == 401
    got, answer = request(f"{endpoint}/torch/v1/act_batch", {"observations": [one]}, api_key=KEY)
    assert got == 200 and answer["results"][0]["status"] == 200 and answer["backend"] == "torch"
    with pytest.raises(ValueError, match="states: expected 2 rows"):
        act_batch_body(obs["image"][None].repeat(2, 0), ["a", "b"], [obs["state"]])
    # the schema documents the route
    paths = request(f"{endpoint}/openapi.json")[1]["paths"]
    schema = paths["/v1/act_batch"]["post"]["requestBody"]["content"]["application/json"]
    rows = schema["schema"]["properties"]["observations"]
    assert rows["maxItems"] == 128
    assert "instruction" in rows["items"]["required"]  # inlined: no dangling $defs reference
    act = paths["/v1/act"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert rows["items"] == act  # each row carries the loaded model's constraints
    assert "$ref" not in json.dumps(schema)


def test_first_step_is_rate_limited_from_the_neutral_action(endpoint, tiny_vla, observations):
    obs, text = observations[0]
    raw = direct(tiny_vla, obs, text)
    assert np.abs(raw[0, 0]) > 0.25  # the model wants more than one step from the midpoint
    status, answer = request(f"{endpoint}/v1/act", act_body(obs["image"], text, obs["state"]))
    assert status == 200 and answer["shield"]["rate_limited"] is True
    assert np.abs(answer["action"]).max() <= 0.25 + 1e-6  # from (0, 0), by max_delta at most
    status, spec = request(f"{endpoint}/v1/spec")
    assert spec["shield"]["neutral_action"] == [0.0, 0.0]


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
    # no server file-system paths (the export's source checkpoint, the model folder)
    text = json.dumps(spec)
    assert str(tiny_export.parent) not in text and "/tmp" not in text, text[:2000]
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


def _act_body_schema(url: str) -> dict:
    status, openapi = request(f"{url}/openapi.json")
    assert status == 200
    return openapi["paths"]["/v1/act"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]


def test_openapi_states_the_loaded_model_s_constraints(endpoint, tiny_export, observations):
    """/openapi.json's /v1/act body is the model's: exact lengths, bounds, instruction length,
    image size; bodies at its edges validate and are answered 200, bodies just outside fail it
    and get 422 naming the field."""
    import jsonschema

    spec = json.loads((tiny_export / "onnx" / "spec.json").read_text())
    shapes = {i["name"]: i["shape"] for i in spec["inputs"]}
    _, h, w, _ = shapes["image"]
    S, A, L = shapes["state"][1], spec["action"]["dim"], spec["instruction"]["max_tokens"]
    schema = _act_body_schema(endpoint)
    props = schema["properties"]
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["image", "instruction", "state"]
    assert (props["state"]["minItems"], props["state"]["maxItems"]) == (S, S)
    limit = props["state"]["items"]["maximum"]
    assert (
        0 < limit <= float(np.finfo(np.float32).max)
        and props["state"]["items"]["minimum"] == -limit
    )
    act = props["previous_action"]
    assert (act["minItems"], act["maxItems"]) == (A, A)
    assert (act["items"]["minimum"], act["items"]["maximum"]) == (-1.0, 1.0)  # the shield's
    text = props["instruction"]
    assert (text["minLength"], text["maxLength"]) == (1, L)  # word-level: a char is <= 1 token
    png, nested = props["image"]["anyOf"]
    assert png["format"] == "image-base64" and png["x-image-size"] == [h, w]
    assert (nested["minItems"], nested["items"]["minItems"]) == (h, w)
    assert nested["items"]["items"]["items"] == {"type": "integer", "minimum": 0, "maximum": 255}
    # another app, another shield: the torch app's bounds are the tight ones
    torch_act = _act_body_schema(f"{endpoint}/torch")["properties"]["previous_action"]
    assert (torch_act["items"]["minimum"], torch_act["items"]["maximum"]) == (-TIGHT, TIGHT)
    assert request(f"{endpoint}/v1/spec")[1]["request_schema"] == schema

    obs, _ = observations[0]
    image = obs["image"].astype(int)
    image[0, 0], image[0, 1] = 0, 255
    edge = {
        "image": image.tolist(),
        "instruction": "!" * L,
        "state": [limit, -limit] * (S // 2),
        "previous_action": [1.0, -1.0],
    }
    beyond = float(np.nextafter(limit, np.inf)) if limit < 3e38 else 3.4028236e38
    # name: (body just outside the schema, the field the 422 names)
    outside = {
        "state value": ({**edge, "state": [beyond] + edge["state"][1:]}, "state"),
        "state length": ({**edge, "state": edge["state"][:-1]}, "state"),
        "previous_action": ({**edge, "previous_action": [1.0 + 1e-6, 0.0]}, "previous_action"),
        "instruction": ({**edge, "instruction": "!" * (L + 1)}, "instruction"),
        "blank instruction": ({**edge, "instruction": "   "}, "instruction"),
        "image rows": ({**edge, "image": image.tolist() + image[:1].tolist()}, "image"),
        "pixel": ({**edge, "image": (image + 1).tolist()}, "image"),
        "extra field": ({**edge, "note": 1}, "note"),
    }
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(edge)
    status, answer = request(f"{endpoint}/v1/act", edge)
    assert status == 200 and np.all(np.isfinite(answer["actions"])), answer
    for name, (body, field) in outside.items():
        assert not validator.is_valid(body), name
        status, answer = request(f"{endpoint}/v1/act", body)
        assert (status, answer["field"]) == (422, field), (name, answer)


FUZZ_EXAMPLES = 260  # per generation mode: 520 requests


def test_schema_fuzz_of_the_live_endpoint(endpoint, observations):
    """schemathesis generates /v1/act bodies from the endpoint's own /openapi.json, sent 8 at a
    time: every schema-valid (positive) body is answered 200, no body gets a 5xx, no body beyond
    the schema gets a 200 (but for the instruction's character bounds, the safe side of the token
    limit), and the replica answers normally afterwards. Images come from the schema's base64 branch (the test registers
    the ``image-base64`` format as real PNG/JPEG images of ``x-image-size``); the nested-list
    branch (64x64x3 integers per body) is left out of generation, too large for Hypothesis to
    build at speed, and is checked at its edges by the test above."""
    import collections
    import copy
    import functools

    import jsonschema
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    status, openapi = request(f"{endpoint}/openapi.json")
    body = openapi["paths"]["/v1/act"]["post"]["requestBody"]["content"]["application/json"]
    png_branch, _nested = body["schema"]["properties"]["image"]["anyOf"]
    h, w = png_branch["x-image-size"]

    @functools.cache
    def image(seed: int, fmt: str, data_url: bool) -> str:
        pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
        text = encode_image(pixels, fmt)
        return f"data:image/{fmt.lower()};base64,{text}" if data_url else text

    schemathesis.openapi.format(
        "image-base64",
        st.builds(image, st.integers(0, 7), st.sampled_from(["PNG", "JPEG"]), st.booleans()),
    )
    fuzz = copy.deepcopy(openapi)
    fuzz_body = fuzz["paths"]["/v1/act"]["post"]["requestBody"]["content"]["application/json"]
    fuzz_body["schema"]["properties"]["image"] = png_branch
    operation = schemathesis.openapi.from_dict(fuzz)["/v1/act"]["POST"]

    def generate(mode: GenerationMode) -> list:
        cases = []

        @settings(
            max_examples=FUZZ_EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(mode))
        def collect(case):
            cases.append(case)

        collect()
        return cases

    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=8))

    validator = jsonschema.Draft202012Validator(body["schema"])

    def beyond_schema(case) -> list[str]:
        """What the body breaks in the schema, except the instruction's character bounds
        (ASCII, maxLength): the schema's safe side of the token limit the server counts."""
        errors = validator.iter_errors(case.body)
        return [
            f"{list(e.path)}: {e.validator}"
            for e in errors
            if not (list(e.path) == ["instruction"] and e.validator in ("maxLength", "pattern"))
        ]

    def send(case) -> tuple[int, str]:
        answer = case.call(base_url=endpoint, session=session)
        code = answer.status_code
        if code == 200 and beyond_schema(case):  # a negative case mutated the body
            code = f"200 to a body beyond the schema: {beyond_schema(case)}"
        return code, f"{answer.text[:200]} <- {str(case.body)[:300]}"

    counts = {}
    for mode in GenerationMode:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(send, generate(mode)))
        counts[mode.value] = collections.Counter(code for code, _ in answers)
        assert all(code in (200, 400, 413, 422) for code, _ in answers), [
            a for a in answers if a[0] not in (200, 400, 413, 422)
        ][:3]
        if mode == GenerationMode.POSITIVE:
            assert all(code == 200 for code, _ in answers), [a for a in answers if a[0] != 200][:3]
    print(f"schema fuzz, status counts per generation mode: {counts}")
    assert sum(sum(c.values()) for c in counts.values()) >= 500, counts
    assert sum(n for code, n in counts["negative"].items() if code != 200) > 50, counts
    obs, text = observations[0]
    assert request(f"{endpoint}/v1/act", act_body(obs["image"], text, obs["state"]))[0] == 200


# ---- request validation without HTTP ----------------------------------------------------------
@pytest.fixture(scope="module")
def parser(tiny_export):
    from vla_ray.serve.schema import RequestParser
    from vla_ray.tokenizer import load_tokenizer

    spec = json.loads((tiny_export / "onnx" / "spec.json").read_text())
    return RequestParser(spec, load_tokenizer(str(tiny_export / "onnx" / "tokenizer")))


def _body(obs, text, **kw) -> bytes:
    return json.dumps({**act_body(obs["image"], text, obs["state"]), **kw}).encode()


def _state_only_parser(tokens_per_char: int = 1):
    """A RequestParser for a state-only model (4 state values, 2 actions, 8 tokens) whose
    tokenizer gives ``tokens_per_char`` tokens per non-space character."""
    from vla_ray.serve.schema import RequestParser

    spec = {
        "inputs": [{"name": "state", "shape": ["batch", 4]}],
        "instruction": {"max_tokens": 8},
        "action": {"dim": 2},
    }

    def tokenizer(text, add_special_tokens=False):
        return {"input_ids": [5] * (tokens_per_char * len(text.replace(" ", "")))}

    return RequestParser(spec, tokenizer)


def test_schema_bounds_come_from_the_model_and_its_probed_state_range():
    from vla_ray.serve.schema import (
        FLOAT32_MAX,
        RequestError,
        act_request_schema,
        instruction_max_length,
        probe_state_limit,
    )

    parser = _state_only_parser()
    assert instruction_max_length(parser) == 8
    assert instruction_max_length(_state_only_parser(tokens_per_char=2)) == 4

    def overflowing(batch):  # float32 overflow beyond |state| ~ 3.4e20
        return batch["state"][:, None, :2] * np.float32(1e18)

    assert probe_state_limit(lambda b: b["state"][:, None, :2], parser) == FLOAT32_MAX
    assert probe_state_limit(overflowing, parser) == pytest.approx(1e20 / 100)
    parser.state_limit = probe_state_limit(overflowing, parser)
    schema = act_request_schema(parser, [-1.0, -0.5], [1.0, 0.5])
    assert "image" not in schema["properties"] and schema["required"] == ["instruction", "state"]
    assert schema["properties"]["state"]["items"]["maximum"] == pytest.approx(1e18)
    per_dim = schema["properties"]["previous_action"]["prefixItems"]
    assert [(d["minimum"], d["maximum"]) for d in per_dim] == [(-1.0, 1.0), (-0.5, 0.5)]
    body = json.dumps({"instruction": "go", "state": [2e18, 0, 0, 0]}).encode()
    with pytest.raises(RequestError, match="state: .*output is finite.*2e\\+18 at index 0"):
        parser.parse(body)


def test_parser_rejects_float32_overflow_and_deep_json(parser, observations):
    from vla_ray.serve.schema import RequestError

    obs, text = observations[0]
    cases = {
        _body(obs, text, state=[0.0, 1e39, 0.0, 0.0]): (422, "state", "1e+39 at index 1"),
        _body(obs, text, previous_action=[-1e39, 0.0]): (422, "previous_action", "float32"),
        b"[" * 200_000 + b"]" * 200_000: (400, "body", "nested too deeply"),
        b'{"instruction": ' + b"[" * 5000 + b"]" * 5000 + b"}": (400, "body", "nested"),
        _body(obs, text, instruction=["go"]): (422, "instruction", "string"),
        _body(obs, text, image=7): (422, "image", "image"),
        _body(obs, text, state=[True, 0, 0, 0]): (422, "state", "number"),
    }
    for body, (status, field, words) in cases.items():
        with pytest.raises(RequestError) as err:
            parser.parse(body)
        e = err.value
        assert (e.status, e.field) == (status, field) and words in e.detail, (body[:60], e.detail)
        assert not any(w in e.detail for w in INTERNALS), e.detail
    assert parser.parse(_body(obs, text, state=[3e38, 0, 0, 0])).state[0] == np.float32(3e38)


def test_image_size_is_checked_before_any_pixel_is_decoded(parser, monkeypatch):
    """A palette PNG of 4000x4000 (tiny compressed, 48 MB as RGB) is refused from its header;
    beyond Pillow's limit (set to what the model needs) Image.open refuses it."""
    from PIL import Image

    from vla_ray.serve.schema import RequestError, limit_image_pixels

    big = Image.new("P", (4000, 4000))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    body = json.dumps({"image": base64.b64encode(buf.getvalue()).decode(), "instruction": "go"})
    decoded = []
    for name in ("convert", "load"):
        real = getattr(Image.Image, name)

        def spy(self, *a, _real=real, _name=name, **kw):
            decoded.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(Image.Image, name, spy)
    with pytest.raises(RequestError, match="expected size 64x64x3, got 4000x4000x3"):
        parser.parse(body.encode())
    assert decoded == []
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    limit_image_pixels(64, 64)
    assert Image.MAX_IMAGE_PIXELS == 4 * 64 * 64
    with pytest.raises(RequestError, match="oversized image") as err:
        parser.parse(body.encode())
    assert "Decompression" not in str(err.value)


def test_parsing_runs_off_the_event_loop():
    import asyncio
    import threading

    from vla_ray.serve.app import parse_off_loop

    async def main():
        with ThreadPoolExecutor(2) as pool:
            return threading.get_ident(), await parse_off_loop(pool, threading.get_ident)

    loop_thread, parse_thread = asyncio.run(main())
    assert parse_thread != loop_thread


def test_small_bodies_parse_inline_and_large_ones_off_the_loop():
    import asyncio
    import threading

    from vla_ray.serve.app import parse_body

    async def main():
        with ThreadPoolExecutor(2) as pool:
            here = threading.get_ident()
            small = await parse_body(pool, lambda b: threading.get_ident(), b"x" * 10, 10)
            large = await parse_body(pool, lambda b: threading.get_ident(), b"x" * 11, 10)
            return here, small, large

    here, small, large = asyncio.run(main())
    assert small == here and large != here


def test_one_failing_request_does_not_fail_its_batch():
    from vla_ray.serve.app import predict_each

    def predict(batch):
        if np.any(batch["state"] < 0):
            raise RuntimeError("model failed")
        return batch["state"][:, None, :2] * 2

    items = [{"state": np.full((1, 4), v, np.float32)} for v in (1.0, -1.0, 2.0)]
    out = predict_each(predict, items)
    np.testing.assert_allclose(out[0], [[2.0, 2.0]])
    assert isinstance(out[1], RuntimeError)
    np.testing.assert_allclose(out[2], [[4.0, 4.0]])


def test_int8_model_answers_do_not_depend_on_the_batch(tiny_export, observations):
    """INT8 dynamic quantisation computes its ranges over the whole input: batched with an
    extreme (valid) state, another request's answer would change; the backend runs such
    models one request at a time."""
    from vla_ray.serve.backends import load_backend
    from vla_ray.serve.schema import RequestParser

    backend = load_backend(tiny_export / "onnx-int8", "onnx")
    parse = RequestParser(backend.spec, backend.tokenizer).parse
    obs, text = observations[0]
    alone = backend.predict(parse(_body(obs, text)).inputs)
    extreme = parse(_body(obs, text, state=[1e30, -1e30, 1e30, -1e30])).inputs
    mixed = {k: np.concatenate([parse(_body(obs, text)).inputs[k], extreme[k]]) for k in extreme}
    np.testing.assert_array_equal(backend.predict(mixed)[0], alone[0])


def test_shield_checks_previous_action_and_starts_from_neutral():
    from vla_ray.serve.shield import ShieldInputError

    shield = Shield({"max_delta": 0.1}, SPEC)
    # no previous_action: the first step is limited from the midpoint of the bounds
    out, report = shield.apply(np.array([[0.9, -0.9]]))
    np.testing.assert_allclose(out, [[0.1, -0.1]], atol=1e-7)
    assert report["rate_limited"]
    for bad, words in (
        ([float("nan"), 0.0], "expected finite numbers, got [nan, 0]"),
        ([2.0, 0.0], "within the action bounds [-1, -1]..[1, 1], got [2, 0]"),
        ([0.0], "expected 2 numbers (one step), got shape (1,)"),
        ("ab", "expected 2 numbers"),
    ):
        with pytest.raises(ShieldInputError, match=re.escape(words)) as err:
            shield.check_previous_action(bad)
        assert err.value.field == "previous_action"
        with pytest.raises(ShieldInputError):
            shield.apply(np.zeros((1, 2)), previous_action=bad)
    with pytest.raises(ShieldInputError, match="non-finite"):
        shield.apply(np.array([[float("nan"), 0.0]]))  # NaN never passes
    shield = Shield({"max_delta": 0.1, "neutral_action": [0.5, 0.0]}, SPEC)
    np.testing.assert_allclose(shield.apply(np.array([[0.9, 0.0]]))[0], [[0.6, 0.0]], atol=1e-7)
    with pytest.raises(ShieldConfigError, match="neutral_action"):
        Shield({"neutral_action": [3.0, 0.0]}, SPEC)


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


def test_cli_serve_api_key_sources_and_exposure_warning(tmp_path, capsys, monkeypatch):
    from vla_ray.cli import main

    monkeypatch.delenv("VLA_RAY_API_KEY", raising=False)
    # every run below stops at the model check (not an export), after the key and the warning
    model = ["serve", "--model", str(tmp_path)]
    assert main([*model, "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0 accepts requests from other machines and no API key" in err
    assert main([*model, "--api-key-file", str(tmp_path / "missing")]) == 2
    assert "--api-key-file" in capsys.readouterr().err
    (tmp_path / "key").write_text("s3cret\n")
    assert main([*model, "--host", "0.0.0.0", "--api-key-file", str(tmp_path / "key")]) == 2
    assert "no API key" not in capsys.readouterr().err
    monkeypatch.setenv("VLA_RAY_API_KEY", "from-env")
    assert main([*model, "--host", "0.0.0.0"]) == 2
    assert "no API key" not in capsys.readouterr().err
    assert main([*model, "--api-key", "visible"]) == 2
    assert "--api-key VALUE is deprecated" in capsys.readouterr().err


def test_cli_serve_stops_cleanly_on_sigterm(tiny_export, tmp_path, observations):
    """`vla-ray serve` in its own process (own Ray): answers with the key from --api-key-file,
    then SIGTERM drains (a request in flight at the signal gets its 200 answer) and shuts Serve
    and Ray down: exit status 0, no abort."""
    import http.client
    import os
    import signal
    import subprocess
    import sys
    import time

    port = free_port()
    (tmp_path / "key").write_text("k3y\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1")
    log = (tmp_path / "serve.log").open("w+")
    args = ["serve", "--model", str(tiny_export), "--port", str(port), "--replica-cpus", "0.5"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vla_ray.cli", *args, "--api-key-file", str(tmp_path / "key")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                if request(f"{url}/v1/health")[0] == 200:
                    break
            except (OSError, ValueError):  # not listening yet; a 404 text until the app is up
                pass
            time.sleep(1)
        assert proc.poll() is None, log.seek(0) or log.read()
        assert request(f"{url}/v1/spec")[0] == 401
        assert request(f"{url}/v1/spec", api_key="k3y")[0] == 200
        # a request in flight when the signal comes: its body is half sent before, half after
        obs, text = observations[0]
        body = json.dumps(act_body(obs["image"], text, obs["state"])).encode()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.putrequest("POST", "/v1/act")
        for name, value in (
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("X-API-Key", "k3y"),
        ):
            conn.putheader(name, value)
        conn.endheaders()
        conn.send(body[: len(body) // 2])
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        conn.send(body[len(body) // 2 :])
        answer = conn.getresponse()
        in_flight = (answer.status, json.loads(answer.read() or b"{}"))
        conn.close()
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    out = log.read()
    assert rc == 0, out[-3000:]
    assert "Aborted" not in out and "Traceback" not in out, out[-3000:]
    assert "SIGTERM: draining in-flight requests" in out and "stopped" in out
    assert in_flight[0] == 200 and len(in_flight[1]["action"]) == 2, (in_flight, out[-3000:])


def test_torch_backend_takes_the_weights_only_vla_folder(tiny_vla_dir, tiny_vla, observations):
    """`vla-ray serve --backend torch --model CKPT/vla`: the safetensors folder, no pickle."""
    from vla_ray.serve.backends import load_backend
    from vla_ray.serve.schema import RequestParser

    backend = load_backend(tiny_vla_dir, "torch")
    obs, text = observations[0]
    inputs = RequestParser(backend.spec, backend.tokenizer).parse(_body(obs, text)).inputs
    np.testing.assert_allclose(backend.predict(inputs)[0], direct(tiny_vla, obs, text), atol=1e-5)
    assert not list(tiny_vla_dir.rglob("*.pkl")) and not list(tiny_vla_dir.rglob("*.pt"))


def _open_partial_request(url: str, path: str, sent: bytes, length: int):
    """A socket that has sent a POST's headers and the first bytes of a ``length``-byte body."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + sent)
    return sock


def _response(sock) -> tuple[int, str]:
    """Status and the raw text (headers + body) of the answer on ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split()[1]), data.decode("latin-1")


def _length(data: bytes) -> int:
    found = re.search(rb"content-length: *(\d+)", data, re.I)
    return int(found.group(1)) if found else 0


@pytest.mark.slow
def test_slow_bodies_get_408_and_a_full_queue_503_with_retry_after(endpoint, observations):
    """A client trickling its body is cut off after body_timeout_s (408, the replica's slot freed);
    beyond max_ongoing_requests + max_queued_requests a request gets 503 with Retry-After at
    once rather than waiting without end; afterwards the endpoint answers normally."""
    import time
    import urllib.error
    import urllib.request

    obs, instruction = observations[0]
    body = json.dumps(act_body(obs["image"], instruction, obs["state"])).encode()
    holder = _open_partial_request(endpoint, "/limits/v1/act", body[:10], len(body))
    time.sleep(0.5)  # the holder's request occupies the one replica slot
    waiter = _open_partial_request(endpoint, "/limits/v1/act", body[:10], len(body))
    time.sleep(0.5)  # the waiter's request is the one queued
    t0 = time.perf_counter()
    req = urllib.request.Request(
        f"{endpoint}/limits/v1/act", data=body, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
    assert time.perf_counter() - t0 < LIMIT_BODY_S  # refused at once, not after the queue
    status, text = _response(holder)  # cut off by the body deadline
    assert status == 408 and "not received within 2 s (body_timeout_s)" in text, text
    holder.close()
    status, text = _response(waiter)
    assert status == 408, text
    waiter.close()
    status, data = request(
        f"{endpoint}/limits/v1/act", act_body(obs["image"], instruction, obs["state"])
    )
    assert status == 200 and np.asarray(data["actions"]).shape[-1] == 2


def test_queue_bound_answers_503_with_retry_after(tiny_export):
    """build_app bounds the queue and tells Serve to answer 503 + Retry-After beyond it."""
    from vla_ray.serve.app import ServeSettings, build_app

    app = build_app(ServeSettings(model=str(tiny_export)), max_queued_requests=8)
    config = app._bound_deployment._deployment_config
    assert config.max_queued_requests == 8
    assert config.backpressure_config.status_code == 503
    assert config.backpressure_config.retry_after_s == 1.0
    with pytest.raises(ValueError, match="max_queued_requests: expected >= 1 or -1, got 0"):
        build_app(ServeSettings(model=str(tiny_export)), max_queued_requests=0)
    with pytest.raises(ValueError, match="body_timeout_s: expected > 0 seconds, got 0"):
        build_app(ServeSettings(model=str(tiny_export), body_timeout_s=0))


def test_cli_serve_limit_defaults_are_the_server_s():
    """vla-ray serve's --body-timeout/--request-timeout/--max-queued defaults are the server's
    (written out in the CLI so that --help does not import Serve)."""
    from vla_ray.cli import build_parser
    from vla_ray.serve.schema import (
        DEFAULT_BODY_TIMEOUT_S,
        DEFAULT_MAX_BATCH_BODY_BYTES,
        DEFAULT_MAX_BATCH_ROWS,
        DEFAULT_MAX_QUEUED_REQUESTS,
        DEFAULT_REQUEST_TIMEOUT_S,
    )

    args = build_parser().parse_args(["serve", "--model", "x"])
    assert args.body_timeout == DEFAULT_BODY_TIMEOUT_S
    assert args.request_timeout == DEFAULT_REQUEST_TIMEOUT_S
    assert args.max_queued == DEFAULT_MAX_QUEUED_REQUESTS
    assert args.max_batch_rows == DEFAULT_MAX_BATCH_ROWS
    assert args.max_batch_body_bytes == DEFAULT_MAX_BATCH_BODY_BYTES


def test_a_killed_replica_is_replaced_and_requests_recover(endpoint, ray_session, observations):
    """The ONNX app's replica actor killed while a client sends requests: Serve starts a new
    one and the requests after it are answered 200 (the one in flight on the killed replica may
    fail, the ones sent during the gap wait for the new replica; the test prints the recovery
    time). Last test on the module's endpoint: its counters restart."""
    import threading
    import time

    def replicas() -> list[str]:
        named = ray_session.util.list_named_actors(all_namespaces=True)
        return [a["name"] for a in named if a["name"].startswith("SERVE_REPLICA::onnx#")]

    obs, text = observations[0]
    body = act_body(obs["image"], text, obs["state"])
    log: list[tuple[float, float, int | str]] = []  # (sent, answered, status)
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                status = request(f"{endpoint}/v1/act", body, timeout=60)[0]
            except Exception as err:  # a dropped connection during the gap
                status = type(err).__name__
            log.append((sent, time.monotonic(), status))
            time.sleep(0.05)

    (old,) = replicas()
    thread = threading.Thread(target=client)
    thread.start()
    try:
        time.sleep(1.0)
        killed = time.monotonic()
        ray_session.kill(ray_session.get_actor(old, namespace="serve"), no_restart=True)
        while time.monotonic() - killed < 90:
            after = [s for t, _, s in log if t > killed]
            if len(after) >= 10 and all(s == 200 for s in after[-10:]):
                break
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    after = [(t, done, s) for t, done, s in log if done > killed]
    assert len(after) >= 10 and all(s == 200 for _, _, s in after[-10:]), after[-12:]
    # recovery: the first 200 to a request sent after the kill
    recovered = next(done for sent, done, s in after if s == 200 and sent > killed) - killed
    failed = [s for _, _, s in after if s != 200]
    print(f"replica killed: first 200 after {recovered:.1f} s, failed requests: {failed}")
    assert recovered < 90 and replicas() != [old]
    # answered before the kill: all 200 (one in flight on the killed replica may fail)
    assert all(s == 200 for _, done, s in log if done < killed)
