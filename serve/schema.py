"""Request/response schema of ``POST /v1/act`` and the request parser.

The parser turns a raw body into model inputs (batch of one) or raises ``RequestError`` with an
HTTP status and a message that names the offending field, the expected value and what was given:
400 for a body that is not JSON (or nested too deeply), 413 for an oversized body, 422 for
everything else (missing or extra fields, wrong types, NaN/inf or numbers beyond float32,
undecodable base64, wrong image size or channels, too-long instructions). Messages never carry
Python exception text.

Images are checked by their header's size before any pixel is decoded or converted.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError

from vla_ray.sequence import CONTEXT_KEY


def _json_number(value: Any) -> Any:
    """Only JSON numbers are numbers (pydantic's lax mode would take true and "1.5")."""
    if isinstance(value, (bool, str)):
        raise ValueError(f"expected a number, got a {type(value).__name__}")
    return value


FiniteFloat = Annotated[float, BeforeValidator(_json_number), Field(allow_inf_nan=False)]
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a 64x64 image as a JSON list is ~50 kB
DEFAULT_MAX_INSTRUCTION_CHARS = 512
# limits on slow and piled-up requests (vla-ray serve --body-timeout / --request-timeout /
# --max-queued)
DEFAULT_BODY_TIMEOUT_S = 10.0  # the whole body must arrive within this (else 408)
DEFAULT_REQUEST_TIMEOUT_S = 30.0  # end to end, enforced by Serve's proxy (408)
DEFAULT_MAX_QUEUED_REQUESTS = 256  # per deployment handle beyond the ongoing ones (then 503)
RETRY_AFTER_S = 1.0  # the Retry-After of a 503 for a full queue
# POST /v1/act_batch: observations per request and the body limit (64x64 PNG rows are ~8 kB,
# nested-list rows ~50 kB)
DEFAULT_MAX_BATCH_ROWS = 128
DEFAULT_MAX_BATCH_BODY_BYTES = 8 << 20
FLOAT32_MAX = float(np.finfo(np.float32).max)


def limit_image_pixels(height: int, width: int) -> None:
    """Set Pillow's decompression-bomb limit to what a model of ``height`` x ``width`` needs
    (4x its pixel count warns, 8x is refused by ``Image.open``): for a server process."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max(4 * int(height) * int(width), 1024)


def float32_vector(
    field: str, values: list[float], n: int, limit: float = FLOAT32_MAX
) -> np.ndarray:
    """``values`` as float32 (n,): 422 naming ``field`` for a wrong length, a non-finite value
    or one beyond ``limit`` (at most float32's range: finite in float64, infinite in float32)."""
    if len(values) != n:
        raise RequestError(422, field, f"expected {n} numbers, got {len(values)}")
    arr = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(arr) | (np.abs(arr) > limit)
    if np.any(bad):
        i = int(np.argmax(bad))
        model = "" if limit >= FLOAT32_MAX else " and the range this model's output is finite for"
        raise RequestError(
            422,
            field,
            f"expected finite numbers within float32 range{model} (|x| <= {limit:.4g}), "
            f"got {float(arr[i])!r} at index {i}",
        )
    return arr.astype(np.float32)


class ActRequest(BaseModel):
    """Body of ``POST /v1/act``: one observation."""

    model_config = ConfigDict(extra="forbid")

    image: str | list[Any] | None = Field(
        default=None,
        description="(omitted for state-only models) "
        "RGB image of the model's size (see /v1/spec): base64 PNG or JPEG "
        "(a data: URL prefix is allowed), or a nested list H x W x 3 of integers 0-255",
    )
    instruction: Annotated[str, Strict()] = Field(
        description="task instruction; at most the model's max_tokens tokens"
    )
    state: list[FiniteFloat] | None = Field(
        default=None, description="proprioceptive state (required when the model takes one)"
    )
    previous_action: list[FiniteFloat] | None = Field(
        default=None,
        description="the action executed last (one step, A values): the shield's max_delta "
        "limits the change from it",
    )
    reward: FiniteFloat | None = Field(
        default=None,
        description="(sequence policies only: the Decision Transformer) the reward of this "
        "session's previous action; its return-to-go is the target return minus the rewards "
        "so far (omitted: 0)",
    )
    episode_start: Annotated[bool, Strict()] | None = Field(
        default=None,
        description="(sequence policies only) true: this observation starts a new episode, "
        "the session's context window starts again (a new session starts one too)",
    )


class ShieldReport(BaseModel):
    """Which shield rules changed the model's action."""

    rate_limited: bool
    clamped: bool
    workspace_blocked: bool


class ActResponse(BaseModel):
    """Answer of ``POST /v1/act``."""

    action: list[float] = Field(description="the first step of the chunk (A values)")
    actions: list[list[float]] = Field(description="the whole action chunk (K x A)")
    chunk_size: int
    model_version: str
    backend: str
    latency_ms: float = Field(description="server-side time from request to answer")
    shield: ShieldReport
    safety: dict[str, Any] | None = Field(
        None,
        description="session id, interventions per safety rule id for this request, and "
        "stopped_by (estop, stale_observation, model_error) when the stop action was answered",
    )


class ErrorResponse(BaseModel):
    """Every 4xx answer: a message naming the field, and the field."""

    detail: str
    field: str


class RequestError(Exception):
    """A request the server rejects: HTTP ``status``, the offending ``field`` and a message."""

    def __init__(self, status: int, field: str, message: str, detail: str | None = None):
        self.detail = detail or f"{field}: {message}"
        super().__init__(self.detail)
        self.status, self.field, self.message = status, field, message

    def payload(self) -> dict[str, str]:
        """The JSON body of the error answer."""
        return {"detail": self.detail, "field": self.field}


@dataclass
class ParsedRequest:
    """Model inputs for one observation (arrays with a batch axis of 1) + shield inputs."""

    inputs: dict[str, np.ndarray]
    state: np.ndarray | None
    previous_action: np.ndarray | None
    # a sequence policy's: the reward of the session's previous action, a new episode
    reward: float | None = None
    episode_start: bool = False


def _json_error(err: ValueError) -> str:
    """Where a body stopped being JSON, without echoing the body."""
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at line {err.lineno} column {err.colno}"
    return "not UTF-8 text"


def load_json(body: bytes, expected: str) -> Any:
    """``body`` decoded as JSON; 400 naming ``body`` (and ``expected``) when it is not JSON or
    is nested too deeply."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, "body", f"not valid JSON ({_json_error(err)})") from None
    except RecursionError:
        raise RequestError(400, "body", f"JSON nested too deeply; expected {expected}") from None


class RequestParser:
    """Validates ``/v1/act`` bodies against a model's spec and tokenizer."""

    def __init__(
        self,
        spec: dict[str, Any],
        tokenizer: Any,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_instruction_chars: int = DEFAULT_MAX_INSTRUCTION_CHARS,
    ):
        shapes = {i["name"]: i["shape"] for i in spec["inputs"]}
        self.has_image = "image" in shapes
        self.height, self.width = (
            (int(shapes["image"][1]), int(shapes["image"][2])) if self.has_image else (0, 0)
        )
        self.state_dim = int(shapes["state"][1]) if "state" in shapes else 0
        self.max_tokens = int(spec["instruction"]["max_tokens"])
        self.action_dim = int(spec["action"]["dim"])
        self.noise_dim = int(shapes["noise"][1]) if "noise" in shapes else None
        # a sequence policy (spec "context"): requests may carry reward and episode_start
        self.sequence = CONTEXT_KEY in spec
        self.tokenizer = tokenizer
        self.max_body_bytes = int(max_body_bytes)
        self.max_instruction_chars = int(max_instruction_chars)
        # the largest |state| value accepted: float32's range, or less where the model's output
        # overflows before it (see probe_state_limit)
        self.state_limit = FLOAT32_MAX
        self._encode = functools.lru_cache(maxsize=4096)(self._encode_uncached)

    # ---- pieces --------------------------------------------------------------------------------
    def check_size(self, size: int) -> None:
        """413 when a body of ``size`` bytes is over the limit."""
        if size > self.max_body_bytes:
            raise RequestError(
                413,
                "body",
                f"{size} bytes is over the limit of {self.max_body_bytes} bytes",
            )

    def _encode_uncached(self, text: str) -> tuple[np.ndarray, np.ndarray, int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        n = len(ids)
        row = np.zeros((1, self.max_tokens), dtype=np.int64)
        mask = np.zeros((1, self.max_tokens), dtype=np.int64)
        row[0, : min(n, self.max_tokens)] = ids[: self.max_tokens]
        mask[0, : min(n, self.max_tokens)] = 1
        return row, mask, n

    def instruction(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask (1, L); 422 for empty, too long (chars or tokens)."""
        if not text.strip():
            raise RequestError(422, "instruction", "is empty; expected the task in words")
        if len(text) > self.max_instruction_chars:
            raise RequestError(
                422,
                "instruction",
                f"{len(text)} characters, the limit is {self.max_instruction_chars}",
            )
        ids, mask, n = self._encode(text)
        if n > self.max_tokens:
            raise RequestError(
                422,
                "instruction",
                f"{n} tokens, the model reads at most {self.max_tokens}; shorten it",
            )
        return ids, mask

    def image(self, value: Any) -> np.ndarray:
        """uint8 (1, H, W, 3) from base64 PNG/JPEG or a nested list; 422 naming the problem."""
        want = f"{self.height}x{self.width}x3"
        if isinstance(value, str):
            arr = self._decode_image(value)
        else:
            try:
                arr = np.asarray(value)
            except ValueError:
                raise RequestError(
                    422, "image", f"nested list is ragged; expected {want} integers 0-255"
                ) from None
            if arr.dtype == object or arr.ndim != 3:
                raise RequestError(
                    422,
                    "image",
                    f"expected a nested list {want} of integers 0-255, got "
                    f"{arr.ndim if arr.dtype != object else 'ragged'} nesting levels",
                )
            if arr.size and arr.dtype.kind not in "iu":
                raise RequestError(
                    422, "image", f"expected integers 0-255, got values of type {arr.dtype}"
                )
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise RequestError(
                    422,
                    "image",
                    f"values must be 0-255, got range {int(arr.min())}..{int(arr.max())}",
                )
        if arr.ndim == 3 and arr.shape[2] != 3:
            raise RequestError(
                422,
                "image",
                f"expected 3 channels (RGB), got {arr.shape[2]}; image must be {want}",
            )
        if arr.shape != (self.height, self.width, 3):
            got = "x".join(str(s) for s in arr.shape)
            raise RequestError(422, "image", f"expected size {want}, got {got}")
        return np.ascontiguousarray(arr, dtype=np.uint8)[None]

    def _decode_image(self, text: str) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:
            raise RequestError(422, "image", f"not valid base64 ({err})") from None
        try:
            # reads the header only: no pixel is decoded before the size is checked
            img = Image.open(io.BytesIO(raw), formats=("PNG", "JPEG"))
        except (UnidentifiedImageError, OSError):
            raise RequestError(
                422, "image", "base64 decodes to bytes that are not a PNG or JPEG image"
            ) from None
        except Exception:  # e.g. PIL's DecompressionBombError: far too many pixels
            raise RequestError(
                422, "image", f"unreadable or oversized image; expected {self.height}x{self.width}"
            ) from None
        w, h = img.size
        channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4, "I": 1, "I;16": 1, "F": 1}
        if (h, w) != (self.height, self.width):
            n = 3 if img.mode in ("RGB", "P") else channels.get(img.mode, "?")
            raise RequestError(
                422, "image", f"expected size {self.height}x{self.width}x3, got {h}x{w}x{n}"
            )
        if img.mode not in ("RGB", "P"):  # a palette image is an RGB image stored compactly
            n = channels.get(img.mode, "?")
            raise RequestError(
                422,
                "image",
                f"expected 3 channels (RGB), got {n} (mode {img.mode}); "
                f"image must be {self.height}x{self.width}x3",
            )
        try:
            if img.mode == "P":
                img = img.convert("RGB")
            return np.asarray(img, dtype=np.uint8)
        except Exception:
            raise RequestError(422, "image", "truncated or corrupt image data") from None

    # ---- whole body ----------------------------------------------------------------------------
    def parse(self, body: bytes) -> ParsedRequest:
        """Raw body -> ParsedRequest; RequestError otherwise."""
        self.check_size(len(body))
        return self.parse_object(load_json(body, "an object of image, instruction, state"))

    def parse_object(self, data: Any) -> ParsedRequest:
        """A decoded JSON body (one observation) -> ParsedRequest; RequestError otherwise."""
        if not isinstance(data, dict):
            raise RequestError(
                422,
                "body",
                f"expected a JSON object with image, instruction, state; got {type(data).__name__}",
            )
        try:
            req = ActRequest.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            messages = [
                f"{'.'.join(str(p)[:64] for p in e['loc']) or 'body'}: {e['msg']}"
                for e in err.errors()[:10]
            ]
            field = str(first["loc"][0])[:64] if first["loc"] else "body"
            raise RequestError(422, field, first["msg"], detail="; ".join(messages)) from None
        inputs: dict[str, np.ndarray] = {}
        if self.has_image:
            if req.image is None:
                raise RequestError(
                    422, "image", f"field required: a {self.height}x{self.width} RGB image"
                )
            inputs["image"] = self.image(req.image)
        elif req.image is not None:
            raise RequestError(422, "image", "this model is state-only and takes no image")
        state = None
        if self.state_dim:
            if req.state is None:
                raise RequestError(422, "state", f"field required: {self.state_dim} finite numbers")
            state = float32_vector("state", req.state, self.state_dim, self.state_limit)
            inputs["state"] = state[None]
        elif req.state is not None:
            raise RequestError(422, "state", "this model takes no state; leave it out")
        ids, mask = self.instruction(req.instruction)
        inputs["instruction"], inputs["instruction_mask"] = ids, mask
        if self.noise_dim is not None:
            inputs["noise"] = np.zeros((1, self.noise_dim), dtype=np.float32)
        previous = None
        if req.previous_action is not None:
            previous = float32_vector("previous_action", req.previous_action, self.action_dim)
        if not self.sequence:
            for name in ("reward", "episode_start"):
                if getattr(req, name) is not None:
                    raise RequestError(
                        422,
                        name,
                        "this model keeps no episode context (not a sequence policy); leave it out",
                    )
        return ParsedRequest(inputs, state, previous, req.reward, bool(req.episode_start))


# ---- the request schema of the loaded model ----------------------------------------------------
# Instructions in the schema: printable ASCII with at least one non-space character. For the
# tokenizers we ship and load (word-level, byte-level BPE, SentencePiece) an ASCII character is
# at most one token, so a character bound is a token bound; other text is accepted too when it is
# within the token limit, but its token count cannot be stated in a JSON schema.
INSTRUCTION_PATTERN = "^[ -~]*[!-~][ -~]*$"
IMAGE_FORMAT = "image-base64"  # the OpenAPI format name of a base64 PNG/JPEG image string


def instruction_max_length(parser: RequestParser) -> int:
    """The longest printable-ASCII instruction (characters) that stays within the model's
    ``max_tokens`` whatever its characters: probed with each printable character repeated (every
    character a token for word-level tokenizers with punctuation split) and with alternations."""
    probes = [chr(c) for c in range(0x21, 0x7F)] + ["a!", "a ", "!a", "ab "]
    n = min(parser.max_instruction_chars, parser.max_tokens)
    while n > 1:
        texts = [(p * n)[:n] for p in probes]
        if all(parser._encode(t)[2] <= parser.max_tokens for t in texts):
            break
        n -= 1
    return n


def probe_state_limit(predict: Any, parser: RequestParser, margin: float = 100.0) -> float:
    """The largest |state| value (a power of ten over ``margin``, at most float32's range) for
    which ``predict`` gives finite actions at every sign pattern probed: states beyond it are
    rejected with 422 naming ``state`` rather than answered with a 500."""
    if not parser.state_dim:
        return FLOAT32_MAX
    signs = np.ones((4, parser.state_dim), np.float32)
    signs[1] = -1.0
    signs[2, 1::2] = -1.0
    signs[3] = -signs[2]
    base = {k: v for k, v in _probe_inputs(parser).items() if k != "state"}
    batch = {k: np.repeat(v, len(signs), axis=0) for k, v in base.items()}
    for scale in [FLOAT32_MAX] + [10.0**e for e in range(38, -1, -1)]:
        with np.errstate(all="ignore"):
            out = np.asarray(predict({**batch, "state": signs * np.float32(scale)}))
        if np.all(np.isfinite(out)):
            return FLOAT32_MAX if scale == FLOAT32_MAX else scale / margin
    return 1.0


def _probe_inputs(parser: RequestParser) -> dict[str, np.ndarray]:
    """Model inputs of a grey image, zero state and the instruction "go" (batch of one)."""
    body: dict[str, Any] = {"instruction": "go"}
    if parser.has_image:
        body["image"] = np.full((parser.height, parser.width, 3), 128, np.uint8).tolist()
    if parser.state_dim:
        body["state"] = [0.0] * parser.state_dim
    return parser.parse(json.dumps(body).encode()).inputs


def _number_list(n: int, low: list[float], high: list[float], description: str) -> dict[str, Any]:
    """An array of exactly ``n`` numbers within [low[i], high[i]] each."""
    schema: dict[str, Any] = {"type": "array", "minItems": n, "maxItems": n}
    if len(set(low)) == 1 and len(set(high)) == 1:
        schema["items"] = {"type": "number", "minimum": low[0], "maximum": high[0]}
    else:  # per-dimension bounds (JSON Schema 2020-12, OpenAPI 3.1)
        schema["prefixItems"] = [
            {"type": "number", "minimum": lo, "maximum": hi}
            for lo, hi in zip(low, high, strict=True)
        ]
        schema["items"] = False
    return {**schema, "description": description}


def act_request_schema(
    parser: RequestParser, action_low: list[float], action_high: list[float]
) -> dict[str, Any]:
    """The JSON schema of a ``/v1/act`` body for the loaded model: exact state and action
    lengths, numeric bounds (the accepted state range, the shield's action bounds), the
    instruction's length, the image's encodings and size; fields the model takes no value for
    are left out (``additionalProperties: false``). A body valid under it is accepted."""
    h, w = parser.height, parser.width
    properties: dict[str, Any] = {}
    required = ["instruction"]
    if parser.has_image:
        pixel = {"type": "integer", "minimum": 0, "maximum": 255}
        row = {"type": "array", "minItems": 3, "maxItems": 3, "items": pixel}
        line = {"type": "array", "minItems": w, "maxItems": w, "items": row}
        properties["image"] = {
            "description": f"RGB image of {h}x{w} pixels: base64 PNG or JPEG (a data: URL "
            f"prefix is allowed), or a nested list {h} x {w} x 3 of integers 0-255",
            "anyOf": [
                {
                    "type": "string",
                    "format": IMAGE_FORMAT,
                    "contentEncoding": "base64",
                    "contentMediaType": "image/png",
                    "maxLength": parser.max_body_bytes,
                    "x-image-size": [h, w],
                },
                {"type": "array", "minItems": h, "maxItems": h, "items": line},
            ],
        }
        required.insert(0, "image")
    properties["instruction"] = {
        "type": "string",
        "minLength": 1,
        "maxLength": instruction_max_length(parser),
        "pattern": INSTRUCTION_PATTERN,
        "description": f"task instruction; the model reads at most {parser.max_tokens} tokens "
        f"(the schema's bound is for printable ASCII: other text is accepted within "
        f"{parser.max_tokens} tokens and {parser.max_instruction_chars} characters)",
    }
    if parser.state_dim:
        lim = float(parser.state_limit)
        properties["state"] = _number_list(
            parser.state_dim,
            [-lim] * parser.state_dim,
            [lim] * parser.state_dim,
            "proprioceptive state: finite numbers within float32 range (and within the range "
            "this model's output stays finite for)",
        )
        required.append("state")
    properties["previous_action"] = _number_list(
        parser.action_dim,
        [float(v) for v in action_low],
        [float(v) for v in action_high],
        "the action executed last (one step), within the action bounds: the shield's "
        "max_delta limits the change from it",
    )
    if parser.sequence:
        properties["reward"] = {
            "type": "number",
            "description": ActRequest.model_fields["reward"].description,
        }
        properties["episode_start"] = {
            "type": "boolean",
            "description": ActRequest.model_fields["episode_start"].description,
        }
    return {
        "title": "ActRequest",
        "description": "Body of POST /v1/act for the loaded model: one observation.",
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


# ---- POST /v1/act_batch -------------------------------------------------------------------------
class ActBatchRequest(BaseModel):
    """Body of ``POST /v1/act_batch``: the observations of a vectorised client, one per row."""

    model_config = ConfigDict(extra="forbid")

    observations: list[ActRequest] = Field(
        min_length=1,
        max_length=DEFAULT_MAX_BATCH_ROWS,
        description="one /v1/act body per row (at most the server's max_batch_rows, see "
        "/v1/spec); each row is validated on its own",
    )


def batch_request_schema() -> dict[str, Any]:
    """The JSON schema of ``ActBatchRequest`` with the row schema inlined (a ``$defs`` reference
    would not resolve inside the OpenAPI document)."""
    schema = ActBatchRequest.model_json_schema()
    defs = schema.pop("$defs", {})
    schema["properties"]["observations"]["items"] = defs["ActRequest"]
    return schema


class ActBatchRow(BaseModel):
    """One row's answer: the /v1/act answer's action fields (``status`` 200), or that row's
    error (``status`` 4xx/5xx with ``detail`` and ``field``)."""

    status: int = Field(description="the HTTP status /v1/act would give this observation")
    action: list[float] | None = None
    actions: list[list[float]] | None = None
    chunk_size: int | None = None
    shield: ShieldReport | None = None
    safety: dict[str, Any] | None = None
    detail: str | None = None
    field: str | None = None


class ActBatchResponse(BaseModel):
    """Answer of ``POST /v1/act_batch``: one result per observation, in order."""

    results: list[ActBatchRow]
    model_version: str
    backend: str
    latency_ms: float = Field(description="server-side time from request to answer")


class BatchParser:
    """Validates ``/v1/act_batch`` bodies: the envelope as a whole (4xx for the request), each
    row as ``RequestParser`` validates a ``/v1/act`` body (an error for that row only)."""

    def __init__(
        self,
        parser: RequestParser,
        max_rows: int = DEFAULT_MAX_BATCH_ROWS,
        max_body_bytes: int = DEFAULT_MAX_BATCH_BODY_BYTES,
    ):
        self.parser = parser
        self.max_rows = int(max_rows)
        self.max_body_bytes = int(max_body_bytes)

    def check_size(self, size: int) -> None:
        """413 when a body of ``size`` bytes is over the batch limit."""
        if size > self.max_body_bytes:
            raise RequestError(
                413, "body", f"{size} bytes is over the limit of {self.max_body_bytes} bytes"
            )

    def parse(self, body: bytes) -> list[ParsedRequest | RequestError]:
        """Raw body -> per row a ParsedRequest or the RequestError of that row; RequestError
        for a body that is not ``{"observations": [1..max_rows objects]}``."""
        self.check_size(len(body))
        data = load_json(body, 'an object {"observations": [...]}')
        if not isinstance(data, dict):
            raise RequestError(
                422,
                "body",
                f'expected a JSON object {{"observations": [...]}}, got {type(data).__name__}',
            )
        extra = sorted(str(k)[:64] for k in data if k != "observations")
        if extra:
            raise RequestError(422, extra[0], "extra field; the body holds only observations")
        rows = data.get("observations")
        if not isinstance(rows, list):
            got = "nothing" if rows is None else f"a {type(rows).__name__}"
            raise RequestError(422, "observations", f"expected a list of observations, got {got}")
        if not 1 <= len(rows) <= self.max_rows:
            raise RequestError(
                422, "observations", f"expected 1 to {self.max_rows} rows, got {len(rows)}"
            )
        out: list[ParsedRequest | RequestError] = []
        for row in rows:
            try:
                out.append(self.parser.parse_object(row))
            except RequestError as err:
                out.append(err)
            except Exception:  # a parser gap is still bad input, and only this row's
                out.append(RequestError(422, "body", "could not be read as an observation"))
        return out
