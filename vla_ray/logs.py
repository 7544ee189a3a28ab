"""Quiet console output for the long-running commands (``train``, ``quickstart``).

Ray, RLlib, Ray Data and Ray Serve write INFO lines, deprecation notices and warnings to the
console, and Ray prints every worker's output (and the raylet's error messages) on the driver's.
Inside ``quiet_logs(run_dir)`` all of that goes to ``run_dir/LOG_NAME`` instead: the records of
the ``ray`` loggers and of the root logger, ``warnings`` (through ``logging.captureWarnings``),
whatever is written to file descriptor 2 (Ray's C++ core logs), and the lines Ray forwards from
its workers. The console keeps the progress bars (``sys.stderr`` is the console inside the block)
and vla-ray's own lines on stdout. ``verbose=True`` changes nothing: everything shows as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

# the log file in the run directory (``train.prepare_run_dir`` does not count it as a leftover)
LOG_NAME = "ray.log"

_log_file: TextIO | None = None
_handler: logging.Handler | None = None
# loggers whose console handlers were replaced, with what to put back on exit
_saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []


def route_ray_loggers() -> None:
    """Inside ``quiet_logs``: send the console handlers of Ray's loggers (and the root logger) to
    the log file. Libraries that add their own handler on import (Ray Serve does) are routed by
    calling this again after importing them; a no-op outside the block."""
    if _handler is None:
        return
    names = sorted({"ray", *(n for n in logging.root.manager.loggerDict if n.startswith("ray."))})
    done = {id(lg) for lg, _, _ in _saved}
    for lg in [logging.getLogger(n) for n in names] + [logging.getLogger()]:
        console = [
            h
            for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ]
        if id(lg) in done or (lg is not logging.getLogger() and not console):
            continue
        _saved.append((lg, list(lg.handlers), lg.propagate))
        for h in console:
            lg.removeHandler(h)
        lg.addHandler(_handler)


# RLlib 2.60's RLModule.__init__ builds the deprecated RLModuleConfig for every module, however it
# is constructed: a notice no caller can act on (vla-ray's modules pass no config)
_RLLIB_OWN_NOTICES = ("`RLModule(config=[RLModuleConfig object])` has been deprecated",)


class _DropRLlibOwnNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in _RLLIB_OWN_NOTICES)


def drop_rllib_own_deprecation_notices() -> None:
    """Drop, in this process, the deprecation notices that RLlib raises from its own code
    (``_RLLIB_OWN_NOTICES``); every other notice still shows. Idempotent."""
    lg = logging.getLogger("ray._common.deprecation")
    if not any(isinstance(f, _DropRLlibOwnNotices) for f in lg.filters):
        lg.addFilter(_DropRLlibOwnNotices())


@contextlib.contextmanager
def _ray_driver_prints_to(log: TextIO) -> Iterator[None]:
    """Ray prints the workers' output and the raylet's error messages on the driver through
    ``ray._private.worker.print_worker_logs(data, print_file)``: give it the log file instead of
    the console (where this private function differs, those lines stay on the console)."""
    try:
        from ray._private import worker
    except ImportError:
        yield
        return
    original = getattr(worker, "print_worker_logs", None)
    if original is None:
        yield
        return

    def to_log(data: dict[str, Any], print_file: Any, ignore_prefix: bool = False) -> None:
        original(data, log, ignore_prefix)

    worker.print_worker_logs = to_log
    try:
        yield
    finally:
        worker.print_worker_logs = original


@contextlib.contextmanager
def quiet_logs(run_dir: str | os.PathLike, verbose: bool = False) -> Iterator[Path | None]:
    """Send Ray's, RLlib's and Ray Data's output to ``run_dir/LOG_NAME`` for the block (see the
    module doc); yields the log path (``None`` with ``verbose`` or inside another block).

    Ray started inside the block is shut down at its end: its workers' last lines (Ray forwards
    them with a delay) would otherwise reach the console after the block. Ray running before
    the block keeps running."""
    global _log_file, _handler
    if verbose or _log_file is not None:
        yield None
        return
    # Ray, RLlib and Ray Data add their console handlers on import: import them now, so that
    # those handlers exist and are routed below
    import ray.data
    import ray.rllib  # noqa: F401

    started_inside = not ray.is_initialized()

    path = Path(run_dir) / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.open("a", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    sys.stderr.flush()
    console_fd = os.dup(2)
    console = os.fdopen(console_fd, "w", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(log.fileno(), 2)  # C++ logs and anything else written to fd 2
    old_stderr = sys.stderr
    sys.stderr = console  # progress bars and error messages stay on the console
    _log_file = log
    _handler = logging.StreamHandler(log)
    _handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d %(message)s")
    )
    route_ray_loggers()
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> root -> log
    ctx = ray.data.DataContext.get_current()
    old_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # Ray Data's bars: the run has its own
    try:
        with _ray_driver_prints_to(log):
            try:
                yield path
            finally:
                if started_inside and ray.is_initialized():
                    ray.shutdown()
    finally:
        ctx.enable_progress_bars = old_bars
        logging.captureWarnings(False)
        while _saved:
            lg, handlers, propagate = _saved.pop()
            for h in list(lg.handlers):
                lg.removeHandler(h)
            for h in handlers:
                lg.addHandler(h)
            lg.propagate = propagate
        _log_file, _handler = None, None
        console.flush()
        sys.stderr = old_stderr
        os.dup2(console_fd, 2)
        console.close()
        log.close()
