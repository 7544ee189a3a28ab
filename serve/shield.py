"""Server-side safety shield: every action chunk passes through it before it leaves the server.

Applied in this order (the hard limits last, so they always hold):

1. rate limit (``max_delta``): each step may change each action dim by at most ``max_delta``
   from the step before it: the request's ``previous_action`` for the first step of the chunk,
   the chunk's own previous step after that;
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

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ShieldConfig:
        """Build from JSON-like data (``workspace`` as a dict); unknown keys are an error."""
        data = dict(data or {})
        known = {"low", "high", "max_delta", "workspace"}
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
        if np.any(self.low >= self.high):
            raise ShieldConfigError(
                f"shield.low/high: expected low < high per dim, got {self.low} and {self.high}"
            )
        if cfg.max_delta is not None and not float(cfg.max_delta) > 0:
            raise ShieldConfigError(f"shield.max_delta: expected > 0, got {cfg.max_delta}")
        self.max_delta = None if cfg.max_delta is None else float(cfg.max_delta)
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
        arr = np.asarray(value, dtype=np.float64)
        if arr.shape != (dim,):
            raise ShieldConfigError(f"shield.{name}: expected {dim} values, got {list(value)}")
        return arr

    def describe(self) -> dict[str, Any]:
        """The shield's effective settings (reported in ``/v1/spec``)."""
        return {
            "order": ["max_delta", "bounds", "workspace"],
            "bounds": {"low": self.low.tolist(), "high": self.high.tolist()},
            "max_delta": self.max_delta,
            "max_delta_reference": "the request's previous_action, then the chunk's previous step",
            "workspace": None if self.workspace is None else asdict(self.workspace),
        }

    def apply(
        self,
        chunk: np.ndarray,
        state: np.ndarray | None = None,
        previous_action: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, bool]]:
        """Shield one action chunk (K, A) -> (shielded chunk, which rules changed it)."""
        x = np.array(chunk, dtype=np.float32, copy=True)
        report = {"rate_limited": False, "clamped": False, "workspace_blocked": False}
        if self.max_delta is not None:
            prev = None if previous_action is None else np.asarray(previous_action, np.float32)
            for k in range(x.shape[0]):
                if prev is not None:
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
