"""Per-client safety state of a Serve replica: emergency stop, the observation watchdog and the
last action answered, keyed by the client's session id (header ``X-Session-Id``).

Local (one replica): the state lives in the replica's memory. Shared (``SessionStore``, a named
Ray actor the replicas of one application share): e-stop flags are pushed to every replica,
which keeps a copy and reads it per request at no cost; ``/v1/estop`` returns only once every
live replica has applied the stop (or after ``ACK_TIMEOUT_S``, dropping a replica that did not
answer: a dead one serves nothing). A replica that cannot reach the store answers the stop
action (fail closed). Last actions (the rate limit's start for a named session) are read and
written through the store per request when ``shared_last_action`` (several replicas), since a
session's next request may reach another replica. The store outlives a replica restart, so an
e-stop also survives one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SESSION_HEADER = "X-Session-Id"
TIMESTAMP_HEADER = "X-Obs-Timestamp"
DEFAULT_SESSION = "default"
MAX_SESSION_ID_CHARS = 128
STORE_NAMESPACE = "vla_ray"
STORE_PREFIX = "vla_ray_sessions_"
ACK_TIMEOUT_S = 2.0  # how long /v1/estop waits for every replica to apply the stop
POLL_TIMEOUT_S = 10.0  # a replica's long poll returns at least this often
logger = logging.getLogger("ray.serve")


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

    def stop_reason(self, sid: str) -> str | None:
        """Why ``sid`` gets the stop action (``estop``), or None."""
        return "estop" if self.stopped(sid) else None

    async def set_stop(self, sid: str | None, stop: bool) -> dict[str, Any]:
        """E-stop (``stop``) or resume ``sid`` (None: all); the same call as the shared one."""
        (self.estop if stop else self.resume)(sid)
        return {"replicas": 1}

    async def last_action(self, sid: str) -> np.ndarray | None:
        """The session's last answered action (its chunk's last step), or None."""
        return self.get(sid).last_action

    async def set_last_action(self, sid: str, action: np.ndarray) -> None:
        self.get(sid).last_action = action

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


class SessionStore:
    """The e-stop flags and last actions of one Serve application, shared by its replicas (a
    named, detached Ray actor: ``session_store``). Replicas long-poll ``poll`` for changes;
    ``set_stop`` returns once every polling replica has applied the change."""

    def __init__(self, max_sessions: int = 10_000):
        self.version = 0
        self.global_stop = False
        self.stopped: set[str] = set()
        self.last: OrderedDict[str, list[float]] = OrderedDict()
        self.max_sessions = max_sessions
        self.seen: dict[str, int] = {}  # replica id -> the version it has applied
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # created in the actor's event loop
            self._cond = asyncio.Condition()
        return self._cond

    async def snapshot(self, replica: str | None = None) -> dict[str, Any]:
        """The e-stop state: ``version``, ``global_stop``, ``stopped`` (session ids); with
        ``replica``, that replica is registered as having applied it (later changes wait for
        its acknowledgement)."""
        if replica is not None:
            self.seen[replica] = self.version
        return {
            "version": self.version,
            "global_stop": self.global_stop,
            "stopped": sorted(self.stopped),
        }

    async def poll(self, replica: str, seen: int, timeout: float = POLL_TIMEOUT_S) -> dict:
        """Record that ``replica`` has applied version ``seen``; return the snapshot once the
        version is newer than ``seen`` (or after ``timeout`` s)."""
        cond = self._condition()
        async with cond:
            self.seen[replica] = seen
            cond.notify_all()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(cond.wait_for(lambda: self.version > seen), timeout)
        return await self.snapshot()

    async def set_stop(
        self, sid: str | None, stop: bool, ack_timeout: float = ACK_TIMEOUT_S
    ) -> dict[str, Any]:
        """E-stop (``stop``) or resume one session (``sid``) or all (None); returns
        ``{"version", "replicas"}``: how many replicas had applied it when this returned."""
        cond = self._condition()
        async with cond:
            if sid is None:
                self.global_stop = stop
                if not stop:
                    self.stopped.clear()
            elif stop:
                self.stopped.add(sid)
            else:
                self.stopped.discard(sid)
            self.version += 1
            version = self.version
            cond.notify_all()
            try:
                await asyncio.wait_for(
                    cond.wait_for(lambda: all(v >= version for v in self.seen.values())),
                    ack_timeout,
                )
            except asyncio.TimeoutError:  # a replica that did not answer: dead or stuck
                for replica in [r for r, v in self.seen.items() if v < version]:
                    del self.seen[replica]
            return {"version": version, "replicas": len(self.seen)}

    async def forget(self, replica: str) -> None:
        self.seen.pop(replica, None)

    async def get_last(self, sid: str) -> list[float] | None:
        return self.last.get(sid)

    async def set_last(self, sid: str, action: list[float]) -> None:
        self.last[sid] = action
        self.last.move_to_end(sid)
        while len(self.last) > self.max_sessions:
            self.last.popitem(last=False)


def session_store(name: str, max_sessions: int = 10_000) -> Any:
    """The named store actor ``name`` (created on first use; detached, so it outlives the
    replica that created it: ``delete_session_stores`` removes it)."""
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=0)(SessionStore)
    return actor.options(
        name=name, namespace=STORE_NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(max_sessions)


def delete_session_stores() -> int:
    """Kill every session store of this Ray cluster; returns how many."""
    import ray

    if not ray.is_initialized():
        return 0
    n = 0
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == STORE_NAMESPACE and entry["name"].startswith(STORE_PREFIX):
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=STORE_NAMESPACE))
                n += 1
            except ValueError:  # gone meanwhile
                pass
    return n


def new_store_name() -> str:
    """A fresh store name for one application build."""
    return STORE_PREFIX + uuid.uuid4().hex[:12]


class SharedSessions(SafetySessions):
    """``SafetySessions`` whose e-stop flags (and, with ``shared_last_action``, last actions)
    live in a ``SessionStore``: every replica of the application sees the same state."""

    def __init__(
        self,
        watchdog: WatchdogSettings,
        store: Any,
        shared_last_action: bool,
        clock: Any = time.time,
    ):
        import ray

        super().__init__(watchdog, clock)
        self.store = store
        self.shared_last_action = shared_last_action
        self.replica = uuid.uuid4().hex
        self.version = -1
        self.stopped_ids: set[str] = set()
        self.store_error: str | None = None
        self._apply(ray.get(store.snapshot.remote(self.replica)))
        self._task: asyncio.Task | None = None

    def _apply(self, snap: dict[str, Any]) -> None:
        self.version = int(snap["version"])
        self.global_stop = bool(snap["global_stop"])
        self.stopped_ids = set(snap["stopped"])
        self.store_error = None

    def start(self) -> None:
        """Start following the store (in the replica's event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            try:
                self._apply(await self.store.poll.remote(self.replica, self.version))
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the store is gone: fail closed, retry
                if self.store_error is None:
                    logger.error("session store unreachable (%s): answering stop", err)
                self.store_error = type(err).__name__
                await asyncio.sleep(0.5)

    def stopped(self, sid: str) -> bool:
        return self.store_error is not None or self.global_stop or sid in self.stopped_ids

    def stop_reason(self, sid: str) -> str | None:
        if self.store_error is not None:  # the e-stop state is unknown: fail closed
            return "session_store_unreachable"
        return "estop" if self.global_stop or sid in self.stopped_ids else None

    def estop(self, sid: str | None) -> None:
        raise RuntimeError("shared sessions: use set_stop (async)")

    resume = estop

    async def set_stop(self, sid: str | None, stop: bool) -> dict[str, Any]:
        """E-stop or resume through the store; applied here at once, and on every replica by
        the time this returns (``replicas``: how many had applied it)."""
        if sid is None:
            self.global_stop = stop
            if not stop:
                self.stopped_ids.clear()
        elif stop:
            self.stopped_ids.add(sid)
        else:
            self.stopped_ids.discard(sid)
        return await self.store.set_stop.remote(sid, stop)

    async def last_action(self, sid: str) -> np.ndarray | None:
        if not self.shared_last_action:
            return self.get(sid).last_action
        value = await self.store.get_last.remote(sid)
        return None if value is None else np.asarray(value, np.float32)

    async def set_last_action(self, sid: str, action: np.ndarray) -> None:
        if not self.shared_last_action:
            self.get(sid).last_action = action
            return
        await self.store.set_last.remote(sid, np.asarray(action, np.float64).tolist())
