"""Server-side safety shield: every action chunk passes through it before it leaves the server.

Applied in this order (the hard limits last, so they always hold):

1. rate limit (``max_delta``): each step may change each action dim by at most ``max_delta``
   from the step before it: the request's ``previous_action`` for the first step of the chunk
   (checked first: finite, one value per dim, within the bounds), else the configured
   ``neutral_action`` (default: the midpoint of the bounds), the chunk's own previous step
   after that;
2. bounds: clamp to ``[low, high]`` per dim (default: the model's action-space bounds);
3. workspace (optional): for velocity-like actions, action dim ``j`` moves the robot along state
   index ``state_indices[j]``; when that coordinate is at or beyond the workspace bound, the
   component that would push further out is set to 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


class ShieldConfigError(ValueError):
    """A shield setting is invalid (the message names it)."""


class ShieldInputError(ValueError):
    """A value given to the shield is unusable: ``field``, what was expected and what was given
    are in the message (the server answers 422 for a request's, 500 for the model's)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _show(values: np.ndarray) -> str:
    return (
        "["
        + ", ".join(f"{float(v):.6g}" for v in np.ravel(values)[:8])
        + (", ...]" if np.size(values) > 8 else "]")
    )


@dataclass
class Workspace:
    """Axis-aligned workspace box over some state coordinates (one per action dim)."""

    state_indices: list[int]
    low: list[float]
    high: list[float]


@dataclass
class ShieldConfig:
    """Shield settings; ``low``/``high`` default to the model's action bounds."""

    low: list[float] | None = None
    high: list[float] | None = None
    max_delta: float | None = None
    workspace: Workspace | None = None
    # where the rate limit starts when a request has no previous_action (default: midpoint)
    neutral_action: list[float] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ShieldConfig:
        """Build from JSON-like data (``workspace`` as a dict); unknown keys are an error."""
        data = dict(data or {})
        known = {"low", "high", "max_delta", "workspace", "neutral_action"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ShieldConfigError(
                f"shield: unknown key(s) {unknown}; valid keys are {', '.join(sorted(known))}"
            )
        ws = data.get("workspace")
        if isinstance(ws, dict):
            missing = [k for k in ("state_indices", "low", "high") if k not in ws]
            if missing:
                raise ShieldConfigError(
                    f"shield.workspace: missing {missing}; expected "
                    '{"state_indices": [0, 1], "low": [-1, -1], "high": [1, 1]}'
                )
            data["workspace"] = Workspace(
                [int(i) for i in ws["state_indices"]],
                [float(v) for v in ws["low"]],
                [float(v) for v in ws["high"]],
            )
        return cls(**data)


class Shield:
    """The shield for one model: resolves and checks the config against the model's spec."""

    def __init__(self, config: ShieldConfig | dict[str, Any] | None, spec: dict[str, Any]):
        cfg = config if isinstance(config, ShieldConfig) else ShieldConfig.from_dict(config)
        A = int(spec["action"]["dim"])
        state_dim = next((i["shape"][1] for i in spec["inputs"] if i["name"] == "state"), 0)
        self.low = self._vector("low", cfg.low, spec["action"]["low"], A)
        self.high = self._vector("high", cfg.high, spec["action"]["high"], A)
        if np.any(np.isnan(self.low)) or np.any(np.isnan(self.high)):
            raise ShieldConfigError(
                f"shield.low/high: expected numbers, got {_show(self.low)} and {_show(self.high)}"
            )
        if np.any(self.low >= self.high):
            raise ShieldConfigError(
                f"shield.low/high: expected low < high per dim, got {self.low} and {self.high}"
            )
        if cfg.max_delta is not None and not float(cfg.max_delta) > 0:
            raise ShieldConfigError(f"shield.max_delta: expected > 0, got {cfg.max_delta}")
        self.max_delta = None if cfg.max_delta is None else float(cfg.max_delta)
        if cfg.neutral_action is None:
            mid = (self.low + self.high) / 2  # an unbounded dim: 0 (within its bounds)
            mid = np.where(np.isfinite(mid), mid, np.clip(0.0, self.low, self.high))
            self.neutral = mid.astype(np.float32)
        else:
            neutral = self._vector("neutral_action", cfg.neutral_action, [], A)
            if not (
                np.all(np.isfinite(neutral))
                and np.all((neutral >= self.low) & (neutral <= self.high))
            ):
                raise ShieldConfigError(
                    f"shield.neutral_action: expected {A} finite values within the bounds "
                    f"{_show(self.low)}..{_show(self.high)}, got {_show(neutral)}"
                )
            self.neutral = neutral.astype(np.float32)
        self.workspace = cfg.workspace
        if self.workspace is not None:
            ws = self.workspace
            if not (len(ws.state_indices) == len(ws.low) == len(ws.high) == A):
                raise ShieldConfigError(
                    f"shield.workspace: state_indices, low and high need one entry per action "
                    f"dim ({A}), got {len(ws.state_indices)}, {len(ws.low)}, {len(ws.high)}"
                )
            bad = [i for i in ws.state_indices if not 0 <= i < state_dim]
            if bad:
                raise ShieldConfigError(
                    f"shield.workspace.state_indices: {bad} out of range for a state of "
                    f"{state_dim} dims"
                )
            self._ws_idx = np.asarray(ws.state_indices)
            self._ws_low = np.asarray(ws.low, dtype=np.float32)
            self._ws_high = np.asarray(ws.high, dtype=np.float32)

    @staticmethod
    def _vector(name: str, given: Any, default: list[float], dim: int) -> np.ndarray:
        value = default if given is None else given
        if np.isscalar(value):
            value = [float(value)] * dim
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise ShieldConfigError(
                f"shield.{name}: expected {dim} numbers, got {value!r}"
            ) from None
        if arr.shape != (dim,):
            raise ShieldConfigError(f"shield.{name}: expected {dim} values, got {list(value)}")
        return arr

    def describe(self) -> dict[str, Any]:
        """The shield's effective settings (reported in ``/v1/spec``)."""
        return {
            "order": ["max_delta", "bounds", "workspace"],
            "bounds": {"low": self.low.tolist(), "high": self.high.tolist()},
            "max_delta": self.max_delta,
            "max_delta_reference": "the request's previous_action (else neutral_action), then "
            "the chunk's previous step",
            "neutral_action": self.neutral.tolist(),
            "workspace": None if self.workspace is None else asdict(self.workspace),
        }

    def check_previous_action(self, value: Any) -> np.ndarray | None:
        """A client's ``previous_action`` as float32 (A,); ``ShieldInputError`` naming
        ``previous_action`` unless it has one finite value per action dim within the bounds."""
        if value is None:
            return None
        A = self.low.shape[0]
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise ShieldInputError(
                "previous_action", f"expected {A} numbers, got {type(value).__name__}"
            ) from None
        if arr.shape != (A,):
            raise ShieldInputError(
                "previous_action", f"expected {A} numbers (one step), got shape {arr.shape}"
            )
        if not np.all(np.isfinite(arr)):
            raise ShieldInputError("previous_action", f"expected finite numbers, got {_show(arr)}")
        outside = (arr < self.low) | (arr > self.high)
        if np.any(outside):
            raise ShieldInputError(
                "previous_action",
                f"expected values within the action bounds {_show(self.low)}..{_show(self.high)}, "
                f"got {_show(arr)}",
            )
        return arr.astype(np.float32)

    def apply(
        self,
        chunk: np.ndarray,
        state: np.ndarray | None = None,
        previous_action: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, bool]]:
        """Shield one action chunk (K, A) -> (shielded chunk, which rules changed it).

        ``ShieldInputError``: a ``previous_action`` that ``check_previous_action`` refuses, or
        a chunk that is not finite (field ``actions``): NaN never passes the shield."""
        x = np.array(chunk, dtype=np.float32, copy=True)
        if not np.all(np.isfinite(x)):
            raise ShieldInputError(
                "actions", f"the model returned non-finite actions {_show(x)}; nothing was sent"
            )
        report = {"rate_limited": False, "clamped": False, "workspace_blocked": False}
        if self.max_delta is not None:
            prev = self.check_previous_action(previous_action)
            if prev is None:
                prev = self.neutral
            for k in range(x.shape[0]):
                limited = prev + np.clip(x[k] - prev, -self.max_delta, self.max_delta)
                report["rate_limited"] |= bool(np.any(limited != x[k]))
                x[k] = limited
                prev = x[k]
        clamped = np.clip(x, self.low, self.high).astype(np.float32)
        report["clamped"] = bool(np.any(clamped != x))
        x = clamped
        if self.workspace is not None and state is not None:
            pos = np.asarray(state, dtype=np.float32)[self._ws_idx]
            block = ((pos <= self._ws_low)[None] & (x < 0)) | (
                (pos >= self._ws_high)[None] & (x > 0)
            )
            report["workspace_blocked"] = bool(np.any(block))
            x = np.where(block, 0.0, x).astype(np.float32)
        return x, report
