"""Per-client safety state of a Serve replica: emergency stop, the observation watchdog and the
last action answered, keyed by the client's session id (header ``X-Session-Id``).

The state lives in the replica's memory: with several replicas, an e-stop reaches the replica
that received it only (serve one replica where an e-stop must hold for every request).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SESSION_HEADER = "X-Session-Id"
TIMESTAMP_HEADER = "X-Obs-Timestamp"
DEFAULT_SESSION = "default"
MAX_SESSION_ID_CHARS = 128


@dataclass
class WatchdogSettings:
    """``max_age_s``: an observation whose client timestamp (header ``X-Obs-Timestamp``, Unix
    seconds) is older than this is answered with the stop action (None: no age check; when set,
    the header is required). ``stop_on_model_error``: a model failure or non-finite output is
    answered with the stop action (200) instead of a 500."""

    max_age_s: float | None = None
    stop_on_model_error: bool = False
    max_sessions: int = 10_000

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> WatchdogSettings:
        data = dict(data or {})
        known = {"max_age_s", "stop_on_model_error", "max_sessions"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"watchdog: unknown key(s) {unknown}; valid keys are {sorted(known)}")
        out = cls(**data)
        if out.max_age_s is not None and not (
            isinstance(out.max_age_s, int | float)
            and math.isfinite(out.max_age_s)
            and out.max_age_s > 0
        ):
            raise ValueError(f"watchdog.max_age_s: expected a number > 0, got {out.max_age_s!r}")
        if not isinstance(out.max_sessions, int) or out.max_sessions < 1:
            raise ValueError(f"watchdog.max_sessions: expected >= 1, got {out.max_sessions!r}")
        return out


class SessionError(ValueError):
    """A session header is unusable (``field`` names the header)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass
class Session:
    stopped: bool = False
    last_action: np.ndarray | None = None
    counts: dict[str, int] = field(default_factory=dict)


class SafetySessions:
    """E-stop flags (per session and global), watchdog checks and last actions."""

    def __init__(self, watchdog: WatchdogSettings, clock: Any = time.time):
        self.watchdog = watchdog
        self.clock = clock
        self.global_stop = False
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    @staticmethod
    def session_id(value: str | None) -> str:
        """The header's session id (``default`` when absent); ``SessionError`` when unusable."""
        if value is None:
            return DEFAULT_SESSION
        if not value or len(value) > MAX_SESSION_ID_CHARS or not value.isprintable():
            raise SessionError(
                SESSION_HEADER, f"expected 1-{MAX_SESSION_ID_CHARS} printable characters"
            )
        return value

    def get(self, sid: str) -> Session:
        """The session's state (created on first use; the least recently used one is dropped
        beyond ``max_sessions``, unless it is stopped)."""
        session = self._sessions.get(sid)
        if session is None:
            session = self._sessions[sid] = Session()
            while len(self._sessions) > self.watchdog.max_sessions:
                # an e-stop is never forgotten: only running sessions are dropped
                victim = next(
                    (k for k, s in self._sessions.items() if not s.stopped and k != sid), None
                )
                if victim is None:
                    break
                del self._sessions[victim]
        self._sessions.move_to_end(sid)
        return session

    def estop(self, sid: str | None) -> None:
        """Stop one session, or every session (``None``)."""
        if sid is None:
            self.global_stop = True
        else:
            self.get(sid).stopped = True

    def resume(self, sid: str | None) -> None:
        """Resume one session, or everything (``None``: the global stop and every session)."""
        if sid is None:
            self.global_stop = False
            for session in self._sessions.values():
                session.stopped = False
        elif sid in self._sessions:
            self._sessions[sid].stopped = False

    def stopped(self, sid: str) -> bool:
        return self.global_stop or (sid in self._sessions and self._sessions[sid].stopped)

    def stale(self, timestamp: str | None) -> str | None:
        """``"stale_observation"`` when the observation is older than ``max_age_s``, else None;
        ``SessionError`` for a missing (when required) or unreadable timestamp."""
        limit = self.watchdog.max_age_s
        if timestamp is None:
            if limit is None:
                return None
            raise SessionError(
                TIMESTAMP_HEADER, "required by this server's watchdog (Unix seconds)"
            )
        try:
            ts = float(timestamp)
        except ValueError:
            raise SessionError(
                TIMESTAMP_HEADER, "expected Unix seconds, e.g. 1765000000.25"
            ) from None
        if not math.isfinite(ts):
            raise SessionError(TIMESTAMP_HEADER, "expected a finite number of Unix seconds")
        if limit is not None and self.clock() - ts > limit:
            return "stale_observation"
        return None
