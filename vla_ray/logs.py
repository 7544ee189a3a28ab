"""Quiet console output for the long-running commands (``train``, ``quickstart``).

Ray, RLlib and Ray Data write INFO lines, deprecation notices and warnings to the console, and
Ray forwards every worker's output to the driver's. Inside ``quiet_logs(run_dir)`` all of that
goes to ``run_dir/LOG_NAME`` instead: Python log records of the ``ray`` loggers and the root
logger, ``warnings`` (through ``logging.captureWarnings``), whatever is written to file
descriptor 2 (Ray's C++ core logs), and the workers' forwarded stdout/stderr. The console keeps
the progress bars (``sys.stderr`` is the console again inside the block) and vla-ray's own lines
on stdout. ``verbose=True`` changes nothing: everything is shown as before.
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
# the dispatcher entry under which ``ray.init`` prints the workers' output on the driver
_RAY_PRINT_HANDLER = "ray_print_logs"
_QUIET_HANDLER = "vla_ray_quiet_logs"

_log_file: TextIO | None = None
# Ray's own worker-output printer, removed by ``capture_worker_output`` and put back on exit
_removed_printer: list[tuple[str, Any]] = []


def _ray_logger_names() -> list[str]:
    names = ["ray"] + [
        n for n in logging.root.manager.loggerDict if n.startswith("ray.") or n == "ray"
    ]
    return sorted(set(names))


def _route_loggers(handler: logging.Handler) -> list[tuple[logging.Logger, list[Any], bool]]:
    """Replace the console handlers of Ray's loggers (and the root logger's) by ``handler``;
    returns what to restore."""
    saved = []
    loggers = [logging.getLogger(n) for n in _ray_logger_names()] + [logging.getLogger()]
    for lg in loggers:
        console = [
            h
            for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ]
        if lg is not logging.getLogger() and not console:
            continue
        saved.append((lg, list(lg.handlers), lg.propagate))
        for h in console:
            lg.removeHandler(h)
        lg.addHandler(handler)
    return saved


def _write_worker_lines(data: dict[str, Any]) -> None:
    """Ray's worker-output batch (``ray_print_logs`` payload) as lines of the log file."""
    if _log_file is None or data.get("pid") == "autoscaler":  # its status table every 5 s
        return
    name = data.get("actor_name") or data.get("task_name") or "worker"
    prefix = f"({name} pid={data.get('pid')}) "
    for line in data.get("lines", ()):
        _log_file.write(prefix + str(line) + "\n")
    _log_file.flush()


def capture_worker_output() -> None:
    """Called after ``ray.init``: inside ``quiet_logs``, print the workers' forwarded output to
    the log file instead of the console (no-op otherwise, or where Ray's dispatcher differs)."""
    if _log_file is None:
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: its workers' lines stay on the console
        return
    handlers = list(getattr(dispatcher, "handlers", []))
    for name, fn in handlers:
        if name == _RAY_PRINT_HANDLER:
            _removed_printer.append((name, fn))
            dispatcher.remove_handler(name)
    if _QUIET_HANDLER not in [name for name, _ in handlers]:
        dispatcher.add_handler(_QUIET_HANDLER, _write_worker_lines)


def _restore_worker_output() -> None:
    if not _removed_printer:
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler(_QUIET_HANDLER)
    while _removed_printer:
        dispatcher.add_handler(*_removed_printer.pop())


@contextlib.contextmanager
def quiet_logs(run_dir: str | os.PathLike, verbose: bool = False) -> Iterator[Path | None]:
    """Send Ray's, RLlib's and Ray Data's output to ``run_dir/LOG_NAME`` for the block (see the
    module doc); yields the log path (``None`` with ``verbose``)."""
    global _log_file
    if verbose or _log_file is not None:  # verbose, or already quiet (a nested stage)
        yield None
        return
    # Ray, RLlib and Ray Data add their console handlers on import: import them now, so that
    # those handlers exist and are routed below
    import ray.data
    import ray.rllib  # noqa: F401

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
    handler = logging.StreamHandler(log)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d %(message)s")
    )
    saved = _route_loggers(handler)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> root -> log
    ctx = ray.data.DataContext.get_current()
    old_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # Ray Data's bars: the run has its own
    _log_file = log
    if ray.is_initialized():  # a Ray started before the block: its workers' lines too
        capture_worker_output()
    try:
        yield path
    finally:
        _restore_worker_output()
        _log_file = None
        ctx.enable_progress_bars = old_bars
        logging.captureWarnings(False)
        for lg, handlers, propagate in saved:
            for h in list(lg.handlers):
                lg.removeHandler(h)
            for h in handlers:
                lg.addHandler(h)
            lg.propagate = propagate
        console.flush()
        sys.stderr = old_stderr
        os.dup2(console_fd, 2)
        console.close()
        log.close()
