"""The Ray Serve deployment: a FastAPI ingress over a batched policy backend.

Routes: ``POST /v1/act`` (one observation -> shielded action chunk), ``POST /v1/act_batch``
(the observations of a vectorised client -> one shielded chunk or error per row), ``GET /v1/health``,
``GET /v1/spec`` (model spec, shield and serving settings), ``POST /v1/estop`` and
``POST /v1/resume`` (emergency stop of one session, header ``X-Session-Id``, or of all),
OpenAPI docs at ``/docs``.
Concurrent ``/v1/act`` requests are grouped by ``@serve.batch`` into one model call per batch.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time,
# inside replicas that unpickle this class by value.

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve

from vla_ray.safety import SafetyRejected
from vla_ray.serve.backends import BACKENDS, SequenceBackend, load_backend, resolve_model_dir
from vla_ray.serve.schema import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BATCH_BODY_BYTES,
    DEFAULT_MAX_BATCH_ROWS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_INSTRUCTION_CHARS,
    DEFAULT_MAX_QUEUED_REQUESTS,
    DEFAULT_REQUEST_TIMEOUT_S,
    RETRY_AFTER_S,
    ActBatchResponse,
    ActRequest,
    ActResponse,
    BatchParser,
    ErrorResponse,
    RequestError,
    RequestParser,
    act_request_schema,
    batch_request_schema,
    limit_image_pixels,
    probe_state_limit,
)
from vla_ray.serve.sessions import (
    SESSION_HEADER,
    TIMESTAMP_HEADER,
    SafetySessions,
    SessionError,
    SharedSessions,
    WatchdogSettings,
    delete_session_stores,
    new_store_name,
    session_store,
)
from vla_ray.serve.shield import Shield, ShieldInputError

API_KEY_HEADER = "X-API-Key"
API_KEY_ENV = "VLA_RAY_API_KEY"
# a PNG observation of a 64x64 camera is ~5-15 kB as base64 JSON: parsed inline
DEFAULT_INLINE_PARSE_BYTES = 32 * 1024
logger = logging.getLogger("ray.serve")
APP_NAME = "vla"

app = FastAPI(
    title="vla-ray policy endpoint",
    description="Vision-language-action policy served with Ray Serve: POST an observation "
    "(image, instruction, state) to /v1/act and get the shielded action chunk back.",
    version="1",
)


def _replica_openapi() -> dict[str, Any]:
    """``/openapi.json`` in a replica: the schema of the model it loaded (outside a replica,
    FastAPI's, whose ``/v1/act`` body is the model-independent ``ActRequest``)."""
    try:
        replica = serve.get_replica_context().servable_object
    except Exception:  # not in a Serve replica
        replica = None
    if replica is None or not hasattr(replica, "openapi_schema"):
        return FastAPI.openapi(app)
    return replica.openapi_schema()


app.openapi = _replica_openapi  # FastAPI's /openapi.json and /docs call app.openapi()
_api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False)
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "body is not JSON"),
        (401, "missing or wrong API key"),
        (
            408,
            "the body did not arrive within body_timeout_s, or the request took longer than "
            "the server's request timeout",
        ),
        (413, "body too large"),
        (409, "a safety rule in reject mode refused the action (named in the answer)"),
        (422, "invalid field (named in the answer)"),
        (500, "the model produced no usable action for this observation (named in the answer)"),
        (503, "too many requests queued: retry after the Retry-After header's seconds"),
    )
}


def public_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` without server file-system paths (the export's ``source`` and any absolute
    path): what ``/v1/spec`` shows."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k != "source"}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str) and (value.startswith(("/", "~", "\\")) or value[1:3] == ":\\"):
            return "<server path>"
        return value

    return clean(spec)


async def parse_off_loop(executor: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
    """Run ``fn(*args)`` (request parsing: JSON, base64, image decoding) on ``executor``, off
    the event loop, so one large or slow body does not stall the replica's other requests."""
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


async def parse_body(executor: ThreadPoolExecutor, fn: Any, body: bytes, inline_bytes: int) -> Any:
    """``fn(body)``: inline for a body of at most ``inline_bytes`` (its decoding is bounded by
    the image pixel limit and takes ~0.1 ms, less than the thread hand-off), else off the event
    loop (``parse_off_loop``)."""
    if len(body) <= inline_bytes:
        return fn(body)
    return await parse_off_loop(executor, fn, body)


@dataclass
class ServeSettings:
    """What every replica needs (JSON-serialisable: it travels to the replicas)."""

    model: str
    backend: str = "onnx"
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.002
    threads: int = 1
    shield: dict[str, Any] | None = None
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_instruction_chars: int = DEFAULT_MAX_INSTRUCTION_CHARS
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    # e-stop/watchdog settings (serve/sessions.py WatchdogSettings)
    watchdog: dict[str, Any] | None = None
    # POST /v1/act_batch: rows per request and its body limit
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS
    max_batch_body_bytes: int = DEFAULT_MAX_BATCH_BODY_BYTES
    # the return a sequence policy (Decision Transformer) conditions on; None: the trained one
    target_return: float | None = None
    # bodies up to this size are parsed on the event loop (0: every body in the parse threads)
    inline_parse_bytes: int = DEFAULT_INLINE_PARSE_BYTES
    # e-stop state shared by the replicas (serve/sessions.py SessionStore): True, False, or None
    # (build_app: shared when there can be several replicas)
    shared_sessions: bool | None = None
    # set by build_app: the store's actor name (None: replica-local state) and whether last
    # actions go through it too (several replicas)
    session_store: str | None = None
    shared_last_action: bool = False


def _example_body(spec: dict[str, Any]) -> bytes:
    """A valid request body for ``spec`` (grey image, zero state): warm-up and health checks.

    Defined above ``VLAPolicy``: Serve pickles the deployment class by value when it is declared.
    """

    shapes = {i["name"]: i["shape"] for i in spec["inputs"]}
    body: dict[str, Any] = {"instruction": "go"}
    if "image" in shapes:
        h, w = shapes["image"][1:3]
        body["image"] = np.full((h, w, 3), 128, np.uint8).tolist()
    if "state" in shapes:
        body["state"] = [0.0] * int(shapes["state"][1])
    return json.dumps(body).encode()


def predict_each(predict: Any, items: list[dict[str, np.ndarray]]) -> list[np.ndarray | Exception]:
    """One model call over a batch of requests (each a batch of one); if that call fails, each
    request alone, so a request that breaks the model fails only itself (its slot holds the
    exception)."""
    try:
        batch = {k: np.concatenate([it[k] for it in items]) for k in items[0]}
        return list(predict(batch))
    except Exception as err:
        if len(items) == 1:
            return [err]
        return [predict_failure(predict, it) for it in items]


def predict_failure(predict: Any, item: dict[str, np.ndarray]) -> np.ndarray | Exception:
    """``predict(item)[0]``, or the exception it raised."""
    try:
        return predict(item)[0]
    except Exception as err:
        return err


@serve.deployment(name="VLAPolicy")
@serve.ingress(app)
class VLAPolicy:
    """One replica: backend + request parser + shield, behind the FastAPI routes."""

    def __init__(self, settings: dict[str, Any], scaling: dict[str, Any] | None = None):
        self.settings = ServeSettings(**settings)
        self.scaling = scaling or {}
        self.backend = load_backend(
            self.settings.model,
            self.settings.backend,
            self.settings.threads,
            target_return=self.settings.target_return,
        )
        self.spec = self.backend.spec
        self.parser = RequestParser(
            self.spec,
            self.backend.tokenizer,
            self.settings.max_body_bytes,
            self.settings.max_instruction_chars,
        )
        self.batch_parser = BatchParser(
            self.parser, self.settings.max_batch_rows, self.settings.max_batch_body_bytes
        )
        self.shield = Shield(self.settings.shield, self.spec)
        watchdog = WatchdogSettings.from_dict(self.settings.watchdog)
        if self.settings.session_store:
            store = session_store(self.settings.session_store, watchdog.max_sessions)
            self.sessions = SharedSessions(watchdog, store, self.settings.shared_last_action)
        else:
            self.sessions = SafetySessions(watchdog)
        if self.parser.has_image:
            limit_image_pixels(self.parser.height, self.parser.width)
        self._parse_pool = ThreadPoolExecutor(
            max_workers=max(2, int(self.settings.threads)), thread_name_prefix="parse"
        )
        self._batched.set_max_batch_size(self.settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}
        self._active = 0  # /v1/act requests inside this replica's handler now
        # warm-up: the first call of a runtime allocates its buffers
        warm = self.parser.parse(_example_body(self.spec))
        self.backend.predict(warm.inputs)
        self.parser.state_limit = probe_state_limit(self.backend.predict, self.parser)
        # /v1/act's body schema for this model (in /openapi.json and /v1/spec)
        self.request_schema = act_request_schema(
            self.parser, self.shield.low.tolist(), self.shield.high.tolist()
        )
        self._openapi: dict[str, Any] | None = None
        self._follow_sessions()

    def _follow_sessions(self) -> None:
        """Follow the shared session store from this replica's event loop (Serve runs the
        constructor in it; else the first request starts it)."""
        if isinstance(self.sessions, SharedSessions) and self.sessions._task is None:
            with contextlib.suppress(RuntimeError):  # no running event loop yet
                self.sessions.start()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _batched(self, items: list[dict[str, np.ndarray]]) -> list[np.ndarray | Exception]:
        self.stats["requests"] += len(items)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
        # called inline: Serve already runs this code on its own event-loop thread, and a
        # thread hand-off per batch costs more than the model (~0.3 ms for the default policy)
        return predict_each(self.backend.predict, items)

    def _authorize(self, key: str | None) -> None:
        expected = self.settings.api_key
        if not expected:
            return
        if not key:
            raise RequestError(401, API_KEY_HEADER, "header missing; this server needs an API key")
        if not hmac.compare_digest(key.encode(), expected.encode()):
            raise RequestError(401, API_KEY_HEADER, "wrong API key")

    async def _read_body(self, request: Request, parser: Any = None) -> bytes:
        """The body, size-checked (by ``parser``, default the /v1/act parser) as it arrives;
        408 when it is not all there within ``body_timeout_s`` (a client trickling bytes must
        not hold a replica's slot)."""
        check_size = (parser or self.parser).check_size
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit():
            check_size(int(declared))
        body = bytearray()

        async def receive() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                check_size(len(body))

        limit = self.settings.body_timeout_s
        try:
            await asyncio.wait_for(receive(), timeout=limit)
        except asyncio.TimeoutError:
            raise RequestError(
                408, "body", f"not received within {limit:g} s (body_timeout_s)"
            ) from None
        return bytes(body)

    @app.post(
        "/v1/act",
        response_model=ActResponse,
        responses=_ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ActRequest.model_json_schema()}},
            }
        },
        summary="Action chunk for one observation",
    )
    async def act(
        self, request: Request, api_key: str | None = Security(_api_key_header)
    ) -> JSONResponse:
        self._active += 1
        self._follow_sessions()
        try:
            return await self._act(request, api_key)
        finally:
            self._active -= 1

    def _predict_now(self, inputs: dict[str, np.ndarray]) -> np.ndarray | Exception:
        """One request's model call without the batch window (counted as a batch of one)."""
        self.stats["requests"] += 1
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], 1)
        return predict_each(self.backend.predict, [inputs])[0]

    def _predict_session(self, sid: str, parsed: Any) -> np.ndarray | Exception:
        """A sequence policy's step for session ``sid`` (its context advances; not batched:
        each step depends on the session's previous one)."""
        self.stats["requests"] += 1
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], 1)

        def step(inputs: dict[str, np.ndarray]) -> np.ndarray:
            return self.backend.act_session(sid, inputs, parsed.reward, parsed.episode_start)

        return predict_each(step, [parsed.inputs])[0]

    async def _act(self, request: Request, api_key: str | None) -> JSONResponse:
        t0 = time.perf_counter()
        try:
            self._authorize(api_key)
            body = await self._read_body(request)
            parsed = await parse_body(
                self._parse_pool, self.parser.parse, body, self.settings.inline_parse_bytes
            )
            previous = self.shield.check_previous_action(parsed.previous_action)
            sid = self.sessions.session_id(request.headers.get(SESSION_HEADER))
            stale = self.sessions.stale(request.headers.get(TIMESTAMP_HEADER))
        except RequestError as err:
            return JSONResponse(err.payload(), status_code=err.status)
        except (ShieldInputError, SessionError) as err:
            payload = RequestError(422, err.field, err.message).payload()
            return JSONResponse(payload, status_code=422)
        except Exception as err:  # a parser gap must not become a 500: it is still bad input
            # one line, no traceback and no exception text in the answer: a client can send
            # such bodies at will
            logger.warning("unreadable /v1/act body (%s)", type(err).__name__)
            payload = RequestError(422, "body", "could not be read as an observation").payload()
            return JSONResponse(payload, status_code=422)
        stop = self.sessions.stop_reason(sid) or stale
        if stop:
            return self._stop_answer(sid, stop, t0)
        if previous is None and SESSION_HEADER in request.headers:
            previous = await self.sessions.last_action(sid)  # a named session's last answer
        if isinstance(self.backend, SequenceBackend):  # the session's own context window
            chunk = self._predict_session(sid, parsed)
        elif self._active == 1:  # alone in this replica: nothing to wait for in a batch window
            chunk = self._predict_now(parsed.inputs)
        else:
            chunk = await self._batched(parsed.inputs)
        status, payload, actions = self._shielded(chunk, parsed.state, previous, sid, "/v1/act")
        if actions is not None and SESSION_HEADER in request.headers:
            await self.sessions.set_last_action(sid, actions[-1].copy())
        if status == 200:
            payload = {**payload, **self._meta(t0)}
        return JSONResponse(payload, status_code=status)

    def _meta(self, t0: float) -> dict[str, Any]:
        """The answer fields every action answer carries besides its actions."""
        return {
            "model_version": self.spec["model_version"],
            "backend": self.backend.name,
            "latency_ms": round((time.perf_counter() - t0) * 1e3, 3),
        }

    def _shielded(
        self,
        chunk: np.ndarray | Exception,
        state: np.ndarray | None,
        previous: np.ndarray | None,
        sid: str,
        route: str,
    ) -> tuple[int, dict[str, Any], np.ndarray | None]:
        """One observation's model output through the shield: (HTTP status, answer fields,
        the shielded chunk or None). A model error or unusable output is a 500 for this
        observation (or the stop action, when the watchdog stops on model errors); a reject
        rule's refusal a 409."""
        try:
            if isinstance(chunk, Exception):
                raise chunk
            result = self.shield.run(chunk, state, previous)
            actions, report = result.actions, self.shield.report(result)
        except SafetyRejected as err:
            payload = {"detail": f"safety.{err.rule}: {err.reason}", "field": f"safety.{err.rule}"}
            return 409, payload, None
        except ShieldInputError as err:  # the model's output for this observation is unusable
            logger.warning("no action for a %s observation: %s", route, err)
            if self.sessions.watchdog.stop_on_model_error:
                return 200, self._stop_payload(sid, "model_error"), None
            return 500, {"detail": str(err), "field": err.field}, None
        except Exception as err:
            logger.warning("the model failed on a %s observation (%s)", route, type(err).__name__)
            if self.sessions.watchdog.stop_on_model_error:
                return 200, self._stop_payload(sid, "model_error"), None
            return 500, {"detail": "model: failed on this observation", "field": "model"}, None
        return (
            200,
            {
                "action": actions[0].tolist(),
                "actions": actions.tolist(),
                "chunk_size": int(actions.shape[0]),
                "shield": report,
                "safety": {"session": sid, "interventions": result.counts, "stopped_by": None},
            },
            actions,
        )

    def _stop_payload(self, sid: str, reason: str) -> dict[str, Any]:
        """The stop action for the whole chunk, without the model (``reason``: ``estop``,
        ``stale_observation`` or ``model_error``): the answer's action fields."""
        K = int(self.spec["action"].get("chunk_size", 1))
        actions = np.tile(self.shield.rules.stop_action, (K, 1))
        counts = dict.fromkeys((r.id for r in self.shield.rules.rules), 0)
        return {
            "action": actions[0].tolist(),
            "actions": actions.tolist(),
            "chunk_size": K,
            "shield": {"rate_limited": False, "clamped": False, "workspace_blocked": False},
            "safety": {"session": sid, "interventions": counts, "stopped_by": reason},
        }

    def _stop_answer(self, sid: str, reason: str, t0: float) -> JSONResponse:
        """The /v1/act answer with the stop action (see ``_stop_payload``)."""
        return JSONResponse({**self._stop_payload(sid, reason), **self._meta(t0)})

    @app.post(
        "/v1/act_batch",
        response_model=ActBatchResponse,
        responses=_ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": batch_request_schema()}},
            }
        },
        summary="Action chunks for the observations of a vectorised client: each row is "
        "validated and shielded as /v1/act does and answered in order with its own status; a "
        "bad row fails only itself. X-Session-Id's e-stop and X-Observation-Timestamp apply "
        "to every row; the rate limit starts from each row's previous_action (else the "
        "neutral action)",
    )
    async def act_batch(
        self, request: Request, api_key: str | None = Security(_api_key_header)
    ) -> JSONResponse:
        t0 = time.perf_counter()
        try:
            self._authorize(api_key)
            body = await self._read_body(request, self.batch_parser)
            rows = await parse_off_loop(self._parse_pool, self.batch_parser.parse, body)
            sid = self.sessions.session_id(request.headers.get(SESSION_HEADER))
            stale = self.sessions.stale(request.headers.get(TIMESTAMP_HEADER))
        except RequestError as err:
            return JSONResponse(err.payload(), status_code=err.status)
        except SessionError as err:
            payload = RequestError(422, err.field, err.message).payload()
            return JSONResponse(payload, status_code=422)
        except Exception as err:  # as for /v1/act: bad input, one log line, no traceback
            logger.warning("unreadable /v1/act_batch body (%s)", type(err).__name__)
            payload = RequestError(422, "body", "could not be read as observations").payload()
            return JSONResponse(payload, status_code=422)
        stop = self.sessions.stop_reason(sid) or stale
        results: list[dict[str, Any] | None] = [None] * len(rows)
        todo = []
        for i, row in enumerate(rows):
            if isinstance(row, RequestError):
                results[i] = {"status": row.status, **row.payload()}
                continue
            try:
                previous = self.shield.check_previous_action(row.previous_action)
            except ShieldInputError as err:
                results[i] = {"status": 422, **RequestError(422, err.field, err.message).payload()}
                continue
            if stop:
                results[i] = {"status": 200, **self._stop_payload(sid, stop)}
                continue
            todo.append((i, row, previous))
        if todo:
            self.stats["requests"] += len(todo)
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(todo))
            chunks = predict_each(self.backend.predict, [row.inputs for _, row, _ in todo])
            for (i, row, previous), chunk in zip(todo, chunks, strict=True):
                status, payload, _ = self._shielded(
                    chunk, row.state, previous, sid, "/v1/act_batch"
                )
                results[i] = {"status": status, **payload}
        return JSONResponse({"results": results, **self._meta(t0)})

    async def _stop_route(self, request: Request, api_key: str | None, stop: bool) -> JSONResponse:
        try:
            self._authorize(api_key)
            header = request.headers.get(SESSION_HEADER)
            sid = None if header is None else self.sessions.session_id(header)
        except RequestError as err:
            return JSONResponse(err.payload(), status_code=err.status)
        except SessionError as err:
            return JSONResponse(RequestError(422, err.field, err.message).payload(), 422)
        self._follow_sessions()
        applied = await self.sessions.set_stop(sid, stop)
        logger.warning("%s: session %s", "e-stop" if stop else "resume", sid or "* (all)")
        stopped = self.sessions.global_stop if sid is None else self.sessions.stopped(sid)
        answer: dict[str, Any] = {"session": sid or "*", "stopped": stopped}
        if isinstance(self.sessions, SharedSessions):  # replicas that had applied it
            answer["replicas"] = applied["replicas"]
        return JSONResponse(answer)

    @app.post(
        "/v1/estop",
        responses={401: _ERRORS[401], 422: _ERRORS[422]},
        summary="Emergency stop: the session of header X-Session-Id (or every session) gets "
        "the stop action until /v1/resume",
    )
    async def estop(
        self, request: Request, api_key: str | None = Security(_api_key_header)
    ) -> JSONResponse:
        return await self._stop_route(request, api_key, True)

    @app.post(
        "/v1/resume",
        responses={401: _ERRORS[401], 422: _ERRORS[422]},
        summary="Lift the emergency stop of the session of header X-Session-Id (or of all)",
    )
    async def resume(
        self, request: Request, api_key: str | None = Security(_api_key_header)
    ) -> JSONResponse:
        return await self._stop_route(request, api_key, False)

    @app.get("/v1/health", summary="Liveness, model version and this replica's batching counters")
    async def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model_version": self.spec["model_version"],
            "backend": self.backend.name,
            **self.stats,
        }

    @app.get("/v1/spec", responses={401: _ERRORS[401]}, summary="Model, shield and serving spec")
    async def get_spec(self, api_key: str | None = Security(_api_key_header)) -> JSONResponse:
        try:
            self._authorize(api_key)
        except RequestError as err:
            return JSONResponse(err.payload(), status_code=err.status)
        serving = {
            k: v
            for k, v in asdict(self.settings).items()
            if k not in ("api_key", "shield", "model", "watchdog", "session_store")
        }
        serving.update(api_key_required=bool(self.settings.api_key), **self.scaling)
        serving["watchdog"] = asdict(self.sessions.watchdog)
        serving["sessions"] = "shared" if isinstance(self.sessions, SharedSessions) else "local"
        return JSONResponse(
            {
                **public_spec(self.spec),
                "shield": self.shield.describe(),
                "serving": serving,
                "request_schema": self.request_schema,
            }
        )

    def openapi_schema(self) -> dict[str, Any]:
        """FastAPI's OpenAPI schema with ``/v1/act``'s body, and each row of
        ``/v1/act_batch``'s, replaced by the loaded model's (built once per replica)."""
        if self._openapi is None:
            schema = json.loads(json.dumps(FastAPI.openapi(self.app)))
            body = schema["paths"]["/v1/act"]["post"]["requestBody"]["content"]
            body["application/json"]["schema"] = self.request_schema
            batch = schema["paths"]["/v1/act_batch"]["post"]["requestBody"]["content"]
            rows = batch["application/json"]["schema"]["properties"]["observations"]
            rows.update(items=self.request_schema, maxItems=self.batch_parser.max_rows)
            self._openapi = schema
        return self._openapi

    def check_health(self) -> None:
        """Serve's replica health check: the backend must still answer."""
        self.backend.predict(self.parser.parse(_example_body(self.spec)).inputs)


def build_app(
    settings: ServeSettings,
    *,
    num_replicas: int = 1,
    autoscaling: tuple[int, int] | None = None,
    replica_cpus: float = 1.0,
    max_ongoing_requests: int | None = None,
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
    access_log: bool = True,
):
    """The bound Serve application for ``settings``; checks the model and shield here first,
    so a bad setting is a clear error in the caller rather than a failing replica.
    ``access_log=False`` drops Serve's per-request log line (costs CPU at high request rates).
    Beyond ``max_queued_requests`` waiting requests (-1: no bound) Serve answers 503 with a
    ``Retry-After`` header rather than queueing without end."""
    folder = resolve_model_dir(settings.model, settings.backend)
    settings = ServeSettings(**{**asdict(settings), "model": str(Path(settings.model).resolve())})
    if (folder / "spec.json").is_file():
        from vla_ray.runtime import read_spec

        Shield(settings.shield, read_spec(folder))  # raises ShieldConfigError on a bad setting
    WatchdogSettings.from_dict(settings.watchdog)  # ValueError naming a bad watchdog setting
    if settings.max_batch_size < 1:
        raise ValueError(f"max_batch_size: expected >= 1, got {settings.max_batch_size}")
    if settings.max_batch_rows < 1:
        raise ValueError(f"max_batch_rows: expected >= 1, got {settings.max_batch_rows}")
    if settings.max_batch_body_bytes < 1:
        raise ValueError(
            f"max_batch_body_bytes: expected >= 1, got {settings.max_batch_body_bytes}"
        )
    if not settings.body_timeout_s > 0:
        raise ValueError(f"body_timeout_s: expected > 0 seconds, got {settings.body_timeout_s}")
    if max_queued_requests != -1 and max_queued_requests < 1:
        raise ValueError(f"max_queued_requests: expected >= 1 or -1, got {max_queued_requests}")
    from ray.serve.config import BackpressureConfig

    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": float(replica_cpus)},
        "max_ongoing_requests": int(max_ongoing_requests or max(64, 4 * settings.max_batch_size)),
        "max_queued_requests": int(max_queued_requests),
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
    }
    if not access_log:
        options["logging_config"] = {"enable_access_log": False}
    if autoscaling is not None:
        lo, hi = autoscaling
        if not 0 <= lo <= hi or hi < 1:
            raise ValueError(f"autoscale: expected 0 <= MIN <= MAX, MAX >= 1; got {lo}:{hi}")
        options["autoscaling_config"] = {
            "min_replicas": lo,
            "max_replicas": hi,
            "initial_replicas": max(lo, 1),
            "target_ongoing_requests": max(2, settings.max_batch_size // 2),
        }
        scaling = {"autoscaling": {"min_replicas": lo, "max_replicas": hi}}
    else:
        if num_replicas < 1:
            raise ValueError(f"replicas: expected >= 1, got {num_replicas}")
        options["num_replicas"] = int(num_replicas)
        scaling = {"replicas": int(num_replicas)}
    several = autoscaling is not None or num_replicas > 1
    if settings.shared_sessions or (settings.shared_sessions is None and several):
        # one store per build: replicas of this application share it (and it outlives them)
        settings = ServeSettings(
            **{
                **asdict(settings),
                "session_store": settings.session_store or new_store_name(),
                "shared_last_action": several,
            }
        )
    return VLAPolicy.options(**options).bind(asdict(settings), scaling)


class BuildArgs(BaseModel):
    """The arguments of :func:`build`, as ``serve run vla_ray.serve.app:build KEY=VALUE`` or the
    ``args:`` of a Serve config file give them (validated by Serve before ``build`` runs; an
    unknown key is an error that names it)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="export folder (or one format folder; torch: a checkpoint)")
    backend: Literal[BACKENDS] = "onnx"  # type: ignore[valid-type]
    replicas: int = Field(1, ge=1)
    min_replicas: int | None = Field(None, ge=0, description="autoscale from (with max_replicas)")
    max_replicas: int | None = Field(None, ge=1, description="autoscale up to")
    replica_cpus: float = Field(1.0, gt=0)
    threads: int = Field(1, ge=1, description="intra-op threads per replica")
    max_batch_size: int = Field(32, ge=1)
    batch_wait_ms: float = Field(2.0, ge=0)
    max_delta: float | None = Field(None, description="shield: max change per action dim")
    shield: dict[str, Any] | None = Field(None, description="shield settings (JSON on the CLI)")
    api_key_file: str | None = Field(None, description=f"the API key's file (else ${API_KEY_ENV})")
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1)
    max_instruction_chars: int = Field(DEFAULT_MAX_INSTRUCTION_CHARS, ge=1)
    max_batch_rows: int = Field(DEFAULT_MAX_BATCH_ROWS, ge=1, description="/v1/act_batch rows")
    max_batch_body_bytes: int = Field(DEFAULT_MAX_BATCH_BODY_BYTES, ge=1)
    body_timeout_s: float = Field(DEFAULT_BODY_TIMEOUT_S, gt=0, description="else 408")
    max_queued_requests: int = Field(
        DEFAULT_MAX_QUEUED_REQUESTS, ge=-1, description="then 503 + Retry-After (-1: no bound)"
    )
    access_log: bool = True
    target_return: float | None = Field(
        None, description="Decision Transformer (torch backend): the return it conditions on"
    )

    @field_validator("shield", mode="before")
    @classmethod
    def _shield_json(cls, value: Any) -> Any:
        # `serve run ... shield={"low":-0.5}` passes text
        return json.loads(value) if isinstance(value, str) else value


def build(args: BuildArgs) -> serve.Application:
    """Ray Serve application builder: ``serve run vla_ray.serve.app:build model=EXPORT_DIR``
    (``key=value`` pairs, see :class:`BuildArgs`), or the ``import_path`` of a ``serve
    build``/``serve deploy`` config file with the same keys under ``args:``. The same app as
    ``vla-ray serve``; host and port come from Serve's own options."""
    if isinstance(args, dict):  # called directly rather than by Serve
        args = BuildArgs.model_validate(args)
    shield = dict(args.shield or {})
    if args.max_delta is not None:
        shield["max_delta"] = args.max_delta
    api_key = os.environ.get(API_KEY_ENV) or None
    if args.api_key_file:
        path = Path(args.api_key_file)
        if not path.is_file():
            raise FileNotFoundError(f"api_key_file: {path} does not exist")
        api_key = path.read_text().strip()
        if not api_key:
            raise ValueError(f"api_key_file: {path} is empty; expected the key")
    autoscaling = None
    if args.min_replicas is not None or args.max_replicas is not None:
        if args.min_replicas is None or args.max_replicas is None:
            raise ValueError(
                "min_replicas, max_replicas: autoscaling needs both; got "
                f"min_replicas={args.min_replicas}, max_replicas={args.max_replicas}"
            )
        autoscaling = (args.min_replicas, args.max_replicas)
    settings = ServeSettings(
        model=args.model,
        backend=args.backend,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_ms / 1000.0,
        threads=args.threads,
        shield=shield or None,
        api_key=api_key,
        max_body_bytes=args.max_body_bytes,
        max_instruction_chars=args.max_instruction_chars,
        body_timeout_s=args.body_timeout_s,
        max_batch_rows=args.max_batch_rows,
        max_batch_body_bytes=args.max_batch_body_bytes,
        target_return=args.target_return,
    )
    return build_app(
        settings,
        num_replicas=args.replicas,
        autoscaling=autoscaling,
        replica_cpus=args.replica_cpus,
        max_queued_requests=args.max_queued_requests,
        access_log=args.access_log,
    )


def start(
    settings: ServeSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = APP_NAME,
    request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S,
    **app_options: Any,
) -> str:
    """Start Ray (if needed) and Serve on ``host:port`` with the app; returns its base URL.
    Serve's proxy answers 408 to a request not done within ``request_timeout_s`` (None: no
    limit)."""
    from vla_ray.train import init_ray

    application = build_app(settings, **app_options)
    # a server's replicas run at normal priority (Ray's default worker niceness is 15)
    os.environ.setdefault("RAY_worker_niceness", "0")
    init_ray()
    if request_timeout_s is not None and not request_timeout_s > 0:
        raise ValueError(f"request_timeout_s: expected > 0 seconds, got {request_timeout_s}")
    http = {"host": host, "port": int(port)}
    if request_timeout_s is not None:
        http["request_timeout_s"] = float(request_timeout_s)
    serve.start(http_options=http)
    serve.run(application, name=name, route_prefix="/")
    return f"http://{host}:{int(port)}"


def shutdown() -> None:
    """Stop every Serve application and the Serve instance, and remove the applications' session
    stores (Ray itself keeps running)."""
    serve.shutdown()
    delete_session_stores()
