"""The safety layer: named rules that every action passes through, in eval, training and Serve.

A rules file (YAML or JSON) declares the rules in the order they apply::

    stop_action: [0.0, 0.0]        # optional; default: 0 clipped into the action bounds
    rules:
      - {id: bounds, kind: action_bounds, mode: clamp, low: -1.0, high: 1.0}
      - {id: smooth, kind: max_delta, mode: clamp, max_delta: 0.25}
      - {id: arena, kind: workspace, mode: clamp, state_indices: [0, 1],
         low: [-0.9, -0.9], high: [0.9, 0.9]}
      - {id: pillar, kind: keep_out, mode: clamp, state_indices: [0, 1],
         center: [0.0, 0.0], radius: 0.15}
      - {id: headway, kind: min_distance, mode: fallback, fallback: stop,
         source: "state[10]", min: 0.05}

Each rule has an ``id`` (its name in every count), a ``kind`` (see ``RULE_KINDS``) and a
``mode``:

- ``clamp``: the smallest change that satisfies the rule (clip, limit, zero a component);
- ``fallback``: the whole action is replaced by ``fallback: stop`` (the ``stop_action``) or
  ``fallback: hold`` (the previous action);
- ``reject``: no action is produced (Serve answers 409 naming the rule; an env wrapper cannot
  skip a step, so there the stop action is sent);
- ``monitor``: the action is unchanged; the violation is only counted (a safety cost).

A rule *intervenes* on a step when the action breaks it (in ``monitor`` mode: would break it);
every intervention is counted under the rule's id, and the number of rules that intervened on a
step is that step's safety cost. Positions, speeds and distances come from the observation's
state (``state[i]``) or, in an env, from the last ``info`` (``info.key``). Velocity-like
actions are assumed for ``workspace``/``keep_out``/``joint_limits``: action dim
``action_indices[j]`` moves the robot along state coordinate ``state_indices[j]``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from vla_ray.env_factory import SAFETY_KEY

MODES = ("clamp", "fallback", "reject", "monitor")
FALLBACKS = ("stop", "hold")
_SOURCE = re.compile(r"^(-?)(?:state\[(\d+)\]|info\.([A-Za-z_][\w.]*))$")


class SafetyConfigError(ValueError):
    """A rules file or rule setting is invalid: the rule id, the field, what was expected and
    what was given are in the message (and in the attributes of the same names)."""

    def __init__(self, rule: str, field: str, expected: str, given: Any):
        given_text = given if isinstance(given, str) and given.startswith("<") else repr(given)
        super().__init__(f"safety rule {rule!r}: {field}: expected {expected}, got {given_text}")
        self.rule, self.field, self.expected, self.given = rule, field, expected, given


class SafetyRejected(RuntimeError):
    """A rule in ``reject`` mode refused an action (``rule`` names it, ``step`` is the chunk row)."""

    def __init__(self, rule: str, step: int, reason: str):
        super().__init__(f"safety rule {rule!r} rejected the action at step {step}: {reason}")
        self.rule, self.step, self.reason = rule, step, reason


@dataclass
class Context:
    """What the rules see besides the action: the observation's state, the env's last info
    (None in Serve) and the previous action sent (for rate limits and ``hold``)."""

    state: np.ndarray | None
    info: dict[str, Any] | None
    previous: np.ndarray


# ---- value sources --------------------------------------------------------------------------
@dataclass
class Source:
    """``state[i]`` or ``info.key`` (dots go into nested dicts); a leading ``-`` negates."""

    text: str
    state_index: int | None
    info_key: str | None
    sign: float = 1.0

    def read(self, ctx: Context, rule: str, name: str) -> float:
        if self.state_index is not None:
            if ctx.state is None or self.state_index >= np.size(ctx.state):
                size = None if ctx.state is None else int(np.size(ctx.state))
                raise SafetyConfigError(
                    rule, name, f"a state with index {self.state_index}", f"<state of size {size}>"
                )
            return self.sign * float(np.ravel(ctx.state)[self.state_index])
        node: Any = ctx.info
        for part in str(self.info_key).split("."):
            if not isinstance(node, dict) or part not in node:
                raise SafetyConfigError(
                    rule, name, f"an info with key {self.info_key!r}", "<info without it>"
                )
            node = node[part]
        return self.sign * float(node)


# ---- parameter readers (errors name the rule and the field) ----------------------------------
class _Params:
    def __init__(self, rule: str, data: dict[str, Any], action_dim: int):
        self.rule, self.data, self.A, self.used = rule, data, action_dim, {"id", "kind", "mode"}

    def get(self, name: str, default: Any = ...) -> Any:
        self.used.add(name)
        if name in self.data:
            return self.data[name]
        if default is ...:
            raise SafetyConfigError(self.rule, name, "a value (required)", "<missing>")
        return default

    def number(self, name: str, default: Any = ..., positive: bool = False) -> float:
        value = self.get(name, default)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not np.isfinite(value) or (positive and value <= 0):
            raise SafetyConfigError(
                self.rule, name, "a number > 0" if positive else "a finite number", value
            )
        return float(value)

    def vector(self, name: str, size: int, default: Any = ...) -> np.ndarray:
        value = self.get(name, default)
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value] * size
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            arr = None
        if arr is None or arr.shape != (size,) or not np.all(np.isfinite(arr)):
            raise SafetyConfigError(self.rule, name, f"{size} finite numbers", value)
        return arr

    def indices(self, name: str, bound: int | None, default: Any = ...) -> np.ndarray:
        value = self.get(name, default)
        ok = (
            isinstance(value, list)
            and value
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
        )
        if not ok or (bound is not None and max(value) >= bound):
            what = "a non-empty list of indices" + (f" < {bound}" if bound is not None else "")
            raise SafetyConfigError(self.rule, name, what, value)
        return np.asarray(value, dtype=np.int64)

    def source(self, name: str) -> Source:
        text = self.get(name)
        match = _SOURCE.match(text) if isinstance(text, str) else None
        if match is None:
            raise SafetyConfigError(self.rule, name, '"state[INDEX]" or "info.KEY"', text)
        index = None if match.group(2) is None else int(match.group(2))
        return Source(text, index, match.group(3), -1.0 if match.group(1) else 1.0)

    def choice(self, name: str, choices: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(name, default)
        if value not in choices:
            raise SafetyConfigError(self.rule, name, f"one of {', '.join(choices)}", value)
        return value

    def check_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise SafetyConfigError(
                self.rule, unknown[0], f"one of {', '.join(sorted(self.used))}", "<unknown key>"
            )


# ---- rules ----------------------------------------------------------------------------------
@dataclass
class Rule:
    """One named rule: ``check`` says whether the action breaks it, ``fix`` is its clamp."""

    id: str
    mode: str
    fallback: str = "stop"
    describe_extra: dict[str, Any] = field(default_factory=dict)

    kind = ""

    def setup(self, p: _Params, low: np.ndarray, high: np.ndarray) -> None:
        """Read and check the kind's fields (``low``/``high``: the action bounds)."""
        raise NotImplementedError

    def check(self, action: np.ndarray, ctx: Context) -> bool:
        """True when ``action`` breaks the rule in ``ctx``."""
        return not np.array_equal(self.fix(action, ctx), action)

    def fix(self, action: np.ndarray, ctx: Context) -> np.ndarray:
        """The clamped action (the smallest change that satisfies the rule)."""
        raise NotImplementedError

    def uses_info(self) -> bool:
        return False

    def describe(self) -> dict[str, Any]:
        out = {"id": self.id, "kind": self.kind, "mode": self.mode}
        if self.mode == "fallback":
            out["fallback"] = self.fallback
        return {**out, **self.describe_extra}


class ActionBounds(Rule):
    """Each action dim within ``[low, high]`` (scalars or one value per dim)."""

    kind = "action_bounds"

    def setup(self, p: _Params, low: np.ndarray, high: np.ndarray) -> None:
        self.low = p.vector("low", p.A, low.tolist())
        self.high = p.vector("high", p.A, high.tolist())
        if np.any(self.low >= self.high):
            raise SafetyConfigError(self.id, "low/high", "low < high per dim", "<not so>")
        self.describe_extra = {"low": self.low.tolist(), "high": self.high.tolist()}

    def fix(self, action: np.ndarray, ctx: Context) -> np.ndarray:
        return np.clip(action, self.low, self.high).astype(np.float32)


class MaxDelta(Rule):
    """Each action dim changes by at most ``max_delta`` from the previous action."""

    kind = "max_delta"

    def setup(self, p: _Params, low: np.ndarray, high: np.ndarray) -> None:
        self.max_delta = p.number("max_delta", positive=True)
        self.describe_extra = {"max_delta": self.max_delta}

    def fix(self, action: np.ndarray, ctx: Context) -> np.ndarray:
        prev = ctx.previous
        return (prev + np.clip(action - prev, -self.max_delta, self.max_delta)).astype(np.float32)


class Workspace(Rule):
    """A box over state coordinates; at or beyond a face, the action component that moves
    further out is set to 0 (velocity-like actions)."""

    kind = "workspace"

    def _setup_indices(self, p: _Params) -> int:
        """Read ``state_indices`` and ``action_indices`` (one action dim per state coordinate,
        by default the first ones); return their number."""
        self.state_idx = p.indices("state_indices", None)
        n = len(self.state_idx)
        self.action_idx = p.indices("action_indices", p.A, list(range(n)))
        if len(self.action_idx) != n:
            raise SafetyConfigError(
                self.id,
                "action_indices",
                f"{n} indices (one per state index)",
                p.get("action_indices"),
            )
        return n

    def setup(self, p: _Params, low: np.ndarray, high: np.ndarray) -> None:
        n = self._setup_indices(p)
        self.low = p.vector("low", n)
        self.high = p.vector("high", n)
        if np.any(self.low >= self.high):
            raise SafetyConfigError(self.id, "low/high", "low < high per coordinate", "<not so>")
        self.describe_extra = {
            "state_indices": self.state_idx.tolist(),
            "action_indices": self.action_idx.tolist(),
            "low": self.low.tolist(),
            "high": self.high.tolist(),
        }

    def _positions(self, ctx: Context) -> np.ndarray | None:
        if ctx.state is None:
            return None
        state = np.ravel(ctx.state)
        if self.state_idx.max() >= state.size:
            raise SafetyConfigError(
                self.id,
                "state_indices",
                f"indices < {state.size} (the state's size)",
                self.state_idx.tolist(),
            )
        return state[self.state_idx].astype(np.float32)

    def fix(self, action: np.ndarray, ctx: Context) -> np.ndarray:
        pos = self._positions(ctx)
        if pos is None:
            return action
        a = action[self.action_idx]
        # compared in float32, the dtype of observations
        low, high = self.low.astype(np.float32), self.high.astype(np.float32)
        block = ((pos <= low) & (a < 0)) | ((pos >= high) & (a > 0))
        out = action.copy()
        out[self.action_idx] = np.where(block, 0.0, a)
        return out


class JointLimits(Workspace):
    """Joint positions (state coordinates) within ``[low, high]``: for ``action: velocity``
    (default) as ``workspace``; for ``action: position`` (absolute joint targets) the action
    dims are clipped to the limits."""

    kind = "joint_limits"

    def setup(self, p: _Params, low: np.ndarray, high: np.ndarray) -> None:
        super().setup(p, low, high)
        self.action_type = p.choice("action", ("velocity", "position"), "velocity")
        self.describe_extra["action"] = self.action_type

    def fix(self, action: np.ndarray, ctx: Context) -> np.ndarray:
        if self.action_type == "velocity":
            return super().fix(action, ctx)
        out = action.copy()
        out[self.action_idx] = np.clip(action[self.action_idx], self.low, self.high)
        return out


class KeepOut(Workspace):
    """A ball (``center``, ``radius``) the position must not enter: within ``radius + margin``
    of the centre, the action component pointing at the centre is removed.

    ``count`` says which steps break the rule (are counted, cost 1): ``inward`` (default) a
    step within ``radius + margin`` whose action points at the centre (the steps the clamp
    changes); ``inside`` every step that starts within ``radius + margin``, whatever the
    action (presence in the zone: in ``monitor`` mode, the number of steps spent inside)."""

    kind = "keep_out"
    COUNTS = ("inward", "inside")

    def setup(self, p: _Params, low: np.ndarray, high: np.ndarray) -> None:
        n = self._setup_indices(p)
        self.center = p.vector("center", n)
        self.radius = p.number("radius", positive=True)
        self.margin = p.number("margin", 0.0)
        if self.margin < 0:
            raise SafetyConfigError(self.id, "margin", "a number >= 0", self.margin)
        self.count = p.choice("count", self.COUNTS, "inward")
        self.describe_extra = {
            "state_indices": self.state_idx.tolist(),
            "action_indices": self.action_idx.tolist(),
            "center": self.center.tolist(),
            "radius": self.radius,
            "margin": self.margin,
            "count": self.count,
        }

    def check(self, action: np.ndarray, ctx: Context) -> bool:
        if self.count == "inward":
            return super().check(action, ctx)
        pos = self._positions(ctx)
        if pos is None:
            return False
        dist = float(np.linalg.norm(self.center - pos.astype(np.float64)))
        return dist <= self.radius + self.margin

    def fix(self, action: np.ndarray, ctx: Context) -> np.ndarray:
        pos = self._positions(ctx)
        if pos is None:
            return action
        to_center = self.center - pos.astype(np.float64)
        dist = float(np.linalg.norm(to_center))
        if dist > self.radius + self.margin:
            return action
        a = action[self.action_idx].astype(np.float64)
        if dist == 0.0:  # at the centre every direction is "in": stop along these dims
            inward = a
        else:
            u = to_center / dist
            along = float(a @ u)
            if along <= 0:
                return action
            inward = along * u
        out = action.copy()
        out[self.action_idx] = (a - inward).astype(np.float32)
        return out


class SpeedLimit(Rule):
    """Speed = norm of ``state_indices`` (measured) or of the action's ``action_indices`` (the
    commanded velocity, when ``state_indices`` is absent) at most ``max``. Clamp: a commanded
    velocity is scaled down to ``max``; with a measured speed over ``max``, the action dims are
    capped at ``action_max`` (default 0: no further acceleration)."""

    kind = "speed_limit"

    def setup(self, p: _Params, low: np.ndarray, high: np.ndarray) -> None:
        self.max = p.number("max", positive=True)
        self.state_idx = (
            None if p.get("state_indices", None) is None else p.indices("state_indices", None)
        )
        self.action_idx = p.indices("action_indices", p.A, list(range(p.A)))
        self.action_max = p.number("action_max", 0.0)
        self.describe_extra = {
            "max": self.max,
            "state_indices": None if self.state_idx is None else self.state_idx.tolist(),
            "action_indices": self.action_idx.tolist(),
        }

    def fix(self, action: np.ndarray, ctx: Context) -> np.ndarray:
        out = action.copy()
        if self.state_idx is None:
            a = action[self.action_idx].astype(np.float64)
            speed = float(np.linalg.norm(a))
            if speed > self.max:
                out[self.action_idx] = (a * (self.max / speed)).astype(np.float32)
            return out
        if ctx.state is None:
            return out
        state = np.ravel(ctx.state)
        if self.state_idx.max() >= state.size:
            raise SafetyConfigError(
                self.id,
                "state_indices",
                f"indices < {state.size} (the state's size)",
                self.state_idx.tolist(),
            )
        if float(np.linalg.norm(state[self.state_idx])) > self.max:
            out[self.action_idx] = np.minimum(action[self.action_idx], self.action_max)
        return out


class MinDistance(Rule):
    """A distance (``source``: ``state[i]`` or ``info.key``) at least ``min``. Clamp: the action
    dims ``action_indices`` capped at ``action_max`` (e.g. throttle <= -0.5: brake)."""

    kind = "min_distance"

    def setup(self, p: _Params, low: np.ndarray, high: np.ndarray) -> None:
        self.source = p.source("source")
        self.min = p.number("min")
        self._action(p)
        self.describe_extra = {"source": self.source.text, "min": self.min, **self._extra}

    def _action(self, p: _Params) -> None:
        self.action_idx = p.indices("action_indices", p.A, [0])
        self.action_max = p.number("action_max", 0.0)
        self._extra = {"action_indices": self.action_idx.tolist(), "action_max": self.action_max}

    def uses_info(self) -> bool:
        return self.source.info_key is not None

    def value(self, ctx: Context) -> float:
        return self.source.read(ctx, self.id, "source")

    def fix(self, action: np.ndarray, ctx: Context) -> np.ndarray:
        if self.value(ctx) >= self.min:
            return action
        out = action.copy()
        out[self.action_idx] = np.minimum(action[self.action_idx], self.action_max)
        return out

    def check(self, action: np.ndarray, ctx: Context) -> bool:
        # below the minimum is a violation whatever the action (the fallback must fire)
        return self.value(ctx) < self.min


class MinTimeToCollision(MinDistance):
    """Time to collision = ``distance`` / ``closing_speed`` at least ``min`` seconds; both from
    ``state[i]`` or ``info.key`` (``-state[i]`` negates). Infinite when not closing
    (``closing_speed <= 0``) or when ``distance <= 0`` (the other is behind). Clamp as
    ``min_distance``."""

    kind = "min_time_to_collision"

    def setup(self, p: _Params, low: np.ndarray, high: np.ndarray) -> None:
        self.distance = p.source("distance")
        self.closing = p.source("closing_speed")
        self.min = p.number("min", positive=True)
        self._action(p)
        self.describe_extra = {
            "distance": self.distance.text,
            "closing_speed": self.closing.text,
            "min": self.min,
            **self._extra,
        }

    def uses_info(self) -> bool:
        return self.distance.info_key is not None or self.closing.info_key is not None

    def value(self, ctx: Context) -> float:
        dist = self.distance.read(ctx, self.id, "distance")
        closing = self.closing.read(ctx, self.id, "closing_speed")
        return float("inf") if closing <= 0 or dist <= 0 else dist / closing


RULE_KINDS: dict[str, type[Rule]] = {
    cls.kind: cls
    for cls in (
        ActionBounds,
        MaxDelta,
        Workspace,
        KeepOut,
        SpeedLimit,
        JointLimits,
        MinDistance,
        MinTimeToCollision,
    )
}


def build_rule(
    data: Any, position: int, action_dim: int, low: np.ndarray, high: np.ndarray
) -> Rule:
    """One rule from its mapping (``id``, ``kind``, ``mode`` and the kind's fields)."""
    if not isinstance(data, dict):
        raise SafetyConfigError(f"#{position}", "rule", "a mapping with id, kind, mode", data)
    rule_id = data.get("id")
    if not isinstance(rule_id, str) or not rule_id:
        raise SafetyConfigError(f"#{position}", "id", "a non-empty string", rule_id)
    kind = data.get("kind")
    if kind not in RULE_KINDS:
        raise SafetyConfigError(rule_id, "kind", f"one of {', '.join(RULE_KINDS)}", kind)
    mode = data.get("mode", "clamp")
    if mode not in MODES:
        raise SafetyConfigError(rule_id, "mode", f"one of {', '.join(MODES)}", mode)
    params = _Params(rule_id, data, action_dim)
    fallback = params.choice("fallback", FALLBACKS, "stop")
    rule = RULE_KINDS[kind](id=rule_id, mode=mode, fallback=fallback)
    rule.setup(params, low, high)
    params.check_unknown()
    return rule


# ---- the rule set -----------------------------------------------------------------------------
@dataclass
class SafetyResult:
    """Shielded actions (K, A), interventions per rule id (steps of the chunk it changed or
    flagged; every rule listed) and the safety cost (interventions summed over rules)."""

    actions: np.ndarray
    counts: dict[str, int]

    @property
    def cost(self) -> float:
        return float(sum(self.counts.values()))


class RuleSet:
    """Ordered rules over actions of ``action_dim`` dims within ``[low, high]``."""

    def __init__(
        self,
        rules: list[Rule],
        action_dim: int,
        low: np.ndarray,
        high: np.ndarray,
        stop_action: np.ndarray | None = None,
        neutral_action: np.ndarray | None = None,
    ):
        ids = [r.id for r in rules]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise SafetyConfigError(dup[0], "id", "a unique id", "<used twice>")
        self.rules, self.A = rules, int(action_dim)
        self.low = np.asarray(low, np.float64)
        self.high = np.asarray(high, np.float64)
        zero = np.clip(0.0, self.low, self.high)
        self.stop_action = (zero if stop_action is None else stop_action).astype(np.float32)
        self.neutral = (zero if neutral_action is None else neutral_action).astype(np.float32)

    @classmethod
    def from_config(
        cls, config: str | Path | dict[str, Any] | RuleSet, action_space: gym.spaces.Box
    ) -> RuleSet:
        """Rules for ``action_space`` from a rules file path (YAML or JSON), its parsed mapping,
        or an existing ``RuleSet`` (returned as is)."""
        if isinstance(config, RuleSet):
            return config
        if not isinstance(action_space, gym.spaces.Box):
            raise SafetyConfigError(
                "<file>", "action space", "a Box (continuous actions)", f"<{action_space}>"
            )
        low, high = (
            np.asarray(action_space.low, np.float64),
            np.asarray(action_space.high, np.float64),
        )
        return cls.from_dict(
            load_rules_file(config) if not isinstance(config, dict) else config,
            int(np.prod(action_space.shape)),
            low,
            high,
        )

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], action_dim: int, low: np.ndarray, high: np.ndarray
    ) -> RuleSet:
        """Rules from a parsed rules file ``{"rules": [...], "stop_action": [...]}``."""
        if not isinstance(data, dict):
            raise SafetyConfigError("<file>", "top level", "a mapping with a rules list", data)
        unknown = sorted(set(data) - {"rules", "stop_action"})
        if unknown:
            raise SafetyConfigError("<file>", unknown[0], "rules or stop_action", "<unknown key>")
        rules = data.get("rules")
        if not isinstance(rules, list):
            raise SafetyConfigError("<file>", "rules", "a list of rules", rules)
        low = np.broadcast_to(np.asarray(low, np.float64), (action_dim,))
        high = np.broadcast_to(np.asarray(high, np.float64), (action_dim,))
        built = [build_rule(r, i, action_dim, low, high) for i, r in enumerate(rules)]
        stop = None
        if data.get("stop_action") is not None:
            stop = _Params("<file>", data, action_dim).vector("stop_action", action_dim)
            if np.any((stop < low) | (stop > high)):
                raise SafetyConfigError(
                    "<file>", "stop_action", "values within the action bounds", stop.tolist()
                )
        return cls(built, action_dim, low, high, stop)

    def uses_info(self) -> list[str]:
        """Ids of the rules that read the env's ``info`` (unavailable in Serve)."""
        return [r.id for r in self.rules if r.uses_info()]

    def describe(self) -> list[dict[str, Any]]:
        return [r.describe() for r in self.rules]

    def apply(
        self,
        chunk: np.ndarray,
        state: np.ndarray | None = None,
        info: dict[str, Any] | None = None,
        previous: np.ndarray | None = None,
    ) -> SafetyResult:
        """Shield a chunk (K, A): each row through every rule in order; a row's previous action
        is the row before it (the first row's: ``previous``, else the neutral action).

        ``SafetyRejected`` when a ``reject`` rule is broken."""
        x = np.array(chunk, dtype=np.float32, copy=True).reshape(-1, self.A)
        counts = dict.fromkeys((r.id for r in self.rules), 0)
        prev = self.neutral if previous is None else np.asarray(previous, np.float32)
        for k in range(x.shape[0]):
            ctx = Context(state, info, prev)
            a = x[k]
            for rule in self.rules:
                if not rule.check(a, ctx):
                    continue
                counts[rule.id] += 1
                if rule.mode == "clamp":
                    a = rule.fix(a, ctx).astype(np.float32)
                elif rule.mode == "fallback":
                    a = (self.stop_action if rule.fallback == "stop" else prev).copy()
                elif rule.mode == "reject":
                    raise SafetyRejected(rule.id, k, f"{rule.kind} broken")
            x[k] = a
            prev = a
        return SafetyResult(x, counts)


def load_rules_file(path: str | Path) -> dict[str, Any]:
    """A rules file (``.yaml``/``.yml``/``.json``) as a mapping; errors name the file. A relative
    path that is not found from the working directory is looked up in the repository (the
    examples: ``envs/safety/langreach.yaml``)."""
    path = Path(path)
    bundled = Path(__file__).resolve().parent.parent / path
    if not path.is_file() and not path.is_absolute() and bundled.is_file():
        path = bundled
    if not path.is_file():
        raise SafetyConfigError("<file>", "path", "an existing rules file", str(path))
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # a parse error: say where, not a traceback
        raise SafetyConfigError(
            "<file>", str(path), "valid YAML/JSON", f"<{type(err).__name__}: {str(err)[:200]}>"
        ) from None
    return data


# ---- the env wrapper ------------------------------------------------------------------------
SAFETY_INFO_KEY = "safety"  # {rule_id: interventions so far this episode}
COST_INFO_KEY = "cost"  # this step's safety cost
EPISODE_COST_INFO_KEY = "episode_cost"  # the cost summed over the episode so far


class SafetyWrapper(gym.Wrapper):
    """Every action through the rules before the env sees it (training and eval).

    ``info["safety"]``: interventions per rule id so far in the episode (all ids, 0 included);
    ``info["cost"]``: this step's cost; ``info["episode_cost"]``: the episode's so far. A
    ``reject`` rule sends the stop action (an env step cannot be skipped). ``last_action``: the
    action the env was last sent (the neutral action after a reset)."""

    def __init__(self, env: gym.Env, rules: str | Path | dict[str, Any] | RuleSet):
        super().__init__(env)
        self.rules = RuleSet.from_config(rules, env.action_space)
        self._state: np.ndarray | None = None
        self._info: dict[str, Any] = {}
        self._prev = self.rules.neutral
        self._counts = dict.fromkeys((r.id for r in self.rules.rules), 0)
        self._cost = 0.0

    @property
    def last_action(self) -> np.ndarray:
        """The action the env was last sent, after the rules (flat, float32)."""
        return self._prev.copy()

    @staticmethod
    def _state_of(obs: Any) -> np.ndarray | None:
        if isinstance(obs, dict):
            return None if "state" not in obs else np.asarray(obs["state"])
        return np.asarray(obs)

    def _annotate(self, info: dict[str, Any], step_cost: float) -> dict[str, Any]:
        info = dict(info)
        info[SAFETY_INFO_KEY] = dict(self._counts)
        info[COST_INFO_KEY] = step_cost
        info[EPISODE_COST_INFO_KEY] = self._cost
        return info

    def reset(self, **kwargs: Any):
        obs, info = self.env.reset(**kwargs)
        self._state, self._info = self._state_of(obs), info
        self._prev = self.rules.neutral.copy()
        self._counts = dict.fromkeys(self._counts, 0)
        self._cost = 0.0
        return obs, self._annotate(info, 0.0)

    def step(self, action: Any):
        try:
            result = self.rules.apply(np.asarray(action)[None], self._state, self._info, self._prev)
            safe = result.actions[0]
            counts = result.counts
        except SafetyRejected as err:
            safe = self.rules.stop_action.copy()
            counts = dict.fromkeys(self._counts, 0)
            counts[err.rule] = 1
        for k, n in counts.items():
            self._counts[k] += n
        step_cost = float(sum(counts.values()))
        self._cost += step_cost
        self._prev = safe
        obs, reward, terminated, truncated, info = self.env.step(
            safe.reshape(self.env.action_space.shape)
        )
        self._state, self._info = self._state_of(obs), info
        return obs, reward, terminated, truncated, self._annotate(info, step_cost)


SAFETY_CONFIG_KEY = SAFETY_KEY  # env_config key: the rules file (train: env.safety=PATH)


def make_env(
    env_id: str, env_config: dict[str, Any] | None, make: Callable[..., gym.Env] | None = None
) -> gym.Env:
    """``gym.make(env_id, **env_config)`` with ``env_config["safety"]`` (a rules file or mapping)
    taken out and applied as ``SafetyWrapper``."""
    kwargs = dict(env_config or {})
    rules = kwargs.pop(SAFETY_CONFIG_KEY, None)
    env = (make or gym.make)(env_id, **kwargs)
    return env if rules is None else SafetyWrapper(env, rules)
