"""A minimal HTTP client for the endpoint (standard library only) and the quickstart's serve stage."""

from __future__ import annotations

import base64
import io
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np


def encode_image(image: np.ndarray, fmt: str = "PNG") -> str:
    """uint8 (H, W, 3) -> base64 PNG (lossless) or JPEG text for the ``image`` field."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def act_body(
    image: np.ndarray,
    instruction: str,
    state: Any | None = None,
    previous_action: Any | None = None,
) -> dict[str, Any]:
    """The JSON body of ``POST /v1/act`` for one observation."""
    body: dict[str, Any] = {"image": encode_image(image), "instruction": instruction}
    if state is not None:
        body["state"] = [float(x) for x in np.asarray(state).ravel()]
    if previous_action is not None:
        body["previous_action"] = [float(x) for x in np.asarray(previous_action).ravel()]
    return body


def act_batch_body(
    images: Any,
    instructions: list[str],
    states: Any | None = None,
    previous_actions: Any | None = None,
) -> dict[str, Any]:
    """The JSON body of ``POST /v1/act_batch`` for a vectorised client's observations: images
    (N, H, W, 3), N instructions, states (N, S) and previous actions (N, A) or None."""
    n = len(instructions)
    for name, value in (
        ("images", images),
        ("states", states),
        ("previous_actions", previous_actions),
    ):
        if value is not None and len(value) != n:
            raise ValueError(f"{name}: expected {n} rows (one per instruction), got {len(value)}")
    return {
        "observations": [
            act_body(
                images[i],
                instructions[i],
                None if states is None else states[i],
                None if previous_actions is None else previous_actions[i],
            )
            for i in range(n)
        ]
    }


def request(
    url: str,
    body: dict[str, Any] | bytes | None = None,
    api_key: str | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, Any]]:
    """GET (no body) or POST JSON to ``url``; returns (status, decoded JSON answer)."""
    data = body if isinstance(body, bytes | type(None)) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve_demo(
    checkpoint: str | Path,
    export_dir: str | Path,
    *,
    port: int | None = None,
    env_id: str | None = None,
    env_config: dict[str, Any] | None = None,
    seed: int = 123,
    backend: str = "onnx",
    progress: bool = True,
) -> dict[str, Any]:
    """Export ``checkpoint`` to ONNX, start the endpoint, send one real observation, stop it.

    Returns the request summary (instruction, state, URL) and the endpoint's answer.
    """
    import gymnasium as gym

    import vla_ray.envs  # noqa: F401  (registers the env ids)
    from vla_ray.evaluate import _read_meta
    from vla_ray.export import export
    from vla_ray.serve.app import ServeSettings, shutdown, start

    say = print if progress else (lambda *_a, **_k: None)
    summary = export(checkpoint, "onnx", export_dir, progress=say if progress else None)
    meta = _read_meta(Path(checkpoint))
    env_id = env_id or meta.get("env") or "vla_ray/LangReach-v0"
    cfg = dict(meta.get("env_config", {}) if env_config is None else env_config)
    from vla_ray.setting_keys import ENV_FACTORY_KEYS

    for key in ENV_FACTORY_KEYS:  # training-time wrappers (DAgger's expert mixing, chunks ...)
        cfg.pop(key, None)
    env = gym.make(env_id, **cfg)
    try:
        obs, info = env.reset(seed=seed)
        instruction = str(info.get("instruction") or env.unwrapped.instruction)
    finally:
        env.close()
    port = port or free_port()
    say(f"serve: starting the endpoint on http://127.0.0.1:{port} (backend {backend}) ...")
    url = start(ServeSettings(model=str(export_dir), backend=backend), port=port)
    try:
        body = act_body(obs["image"], instruction, obs.get("state"))
        status, answer = request(f"{url}/v1/act", body)
    finally:
        shutdown()
    if status != 200:
        raise RuntimeError(f"serve: POST /v1/act answered {status}: {answer}")
    say(f"serve: POST {url}/v1/act  instruction={instruction!r}  state={body.get('state')}")
    say(f"serve: answer {json.dumps(answer)}")
    return {
        "url": url,
        "instruction": instruction,
        "state": body.get("state"),
        "answer": answer,
        "export": summary,
    }
