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

These three are rules of the safety layer (``vla_ray.safety``, ids ``max_delta``, ``bounds``,
``workspace``); ``rules`` (a rules file or its mapping, as for ``env.safety``) adds that file's
rules after the rate limit and before the bounds. Every rule's interventions are counted by id.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vla_ray.safety import (
    ActionBounds,
    RuleSet,
    SafetyConfigError,
    SafetyResult,
    build_rule,
    load_rules_file,
)


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
    # a safety rules file (path) or its mapping: more rules, applied before the bounds
    rules: str | dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ShieldConfig:
        """Build from JSON-like data (``workspace`` as a dict); unknown keys are an error."""
        data = dict(data or {})
        known = {"low", "high", "max_delta", "workspace", "neutral_action", "rules"}
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
        self.rules = self._rule_set(cfg, A, state_dim)

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
            "rules": self.rules.describe(),
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

    def _rule_set(self, cfg: ShieldConfig, A: int, state_dim: int) -> RuleSet:
        """max_delta, the file's rules, bounds, workspace: one ``RuleSet`` (clamp mode)."""
        lo, hi = self.low, self.high
        rules = []
        try:
            if self.max_delta is not None:
                spec = {"id": "max_delta", "kind": "max_delta", "max_delta": self.max_delta}
                rules.append(build_rule(spec, 0, A, lo, hi))
            if cfg.rules is not None:
                data = cfg.rules if isinstance(cfg.rules, dict) else load_rules_file(cfg.rules)
                extra = RuleSet.from_dict(data, A, lo, hi)
                needs_info = extra.uses_info()
                if needs_info:
                    raise SafetyConfigError(
                        needs_info[0], "source", "state[INDEX] (Serve has no env info)", "info.*"
                    )
                rules.extend(extra.rules)
            bounds = ActionBounds(id="bounds", mode="clamp")
            bounds.low, bounds.high = lo, hi  # may be infinite: the model's own bounds
            bounds.describe_extra = {"low": lo.tolist(), "high": hi.tolist()}
            rules.append(bounds)
            if self.workspace is not None:
                ws = asdict(self.workspace)
                spec = {"id": "workspace", "kind": "workspace", **ws}
                rules.append(build_rule(spec, len(rules), A, lo, hi))
            for rule in rules:
                for name, attr in (("source", "source"), ("distance", "distance"),
                                   ("closing_speed", "closing")):  # fmt: skip
                    src = getattr(rule, attr, None)
                    if src is not None and (src.state_index or 0) >= state_dim:
                        raise SafetyConfigError(
                            rule.id, name, f"state[i] with i < {state_dim}", src.text
                        )
                idx = getattr(rule, "state_idx", None)
                if idx is not None and idx.max() >= state_dim:
                    raise SafetyConfigError(
                        rule.id,
                        "state_indices",
                        f"indices < {state_dim} (the model's state size)",
                        idx.tolist(),
                    )
            return RuleSet(rules, A, lo, hi, neutral_action=self.neutral)
        except SafetyConfigError as err:
            raise ShieldConfigError(f"shield: {err}") from None

    def apply(
        self,
        chunk: np.ndarray,
        state: np.ndarray | None = None,
        previous_action: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, bool]]:
        """Shield one action chunk (K, A) -> (shielded chunk, which rules changed it).

        ``ShieldInputError``: a ``previous_action`` that ``check_previous_action`` refuses, or
        a chunk that is not finite (field ``actions``): NaN never passes the shield."""
        result = self.run(chunk, state, previous_action)
        return result.actions, self.report(result)

    def run(
        self,
        chunk: np.ndarray,
        state: np.ndarray | None = None,
        previous_action: np.ndarray | None = None,
    ) -> SafetyResult:
        """As ``apply``, with the interventions counted per rule id (``SafetyRejected`` when a
        ``reject`` rule of the rules file is broken)."""
        x = np.array(chunk, dtype=np.float32, copy=True)
        if not np.all(np.isfinite(x)):
            raise ShieldInputError(
                "actions", f"the model returned non-finite actions {_show(x)}; nothing was sent"
            )
        prev = self.check_previous_action(previous_action)
        return self.rules.apply(x, state, None, prev)

    @staticmethod
    def report(result: SafetyResult) -> dict[str, bool]:
        """The three built-in rules as booleans (the answer's ``shield`` field)."""
        c = result.counts
        return {
            "rate_limited": c.get("max_delta", 0) > 0,
            "clamped": c.get("bounds", 0) > 0,
            "workspace_blocked": c.get("workspace", 0) > 0,
        }
