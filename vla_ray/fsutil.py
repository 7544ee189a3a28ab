"""File-system helpers shared by everything that writes directories (checkpoints, datasets,
exports, ``save_pretrained``)."""

from __future__ import annotations

import ctypes
import os
import shutil
import uuid
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


class OutputExistsError(ValueError):
    """An output path already holds data and the caller did not ask to overwrite it."""


def check_output(
    path: str | os.PathLike, overwrite: bool, hint: str = "pass --overwrite to replace it"
) -> None:
    """Refuse an existing non-empty ``path`` (a file, or a folder with anything in it) unless
    ``overwrite``; the error names the path and ends with ``hint``."""
    p = Path(path)
    if overwrite or not p.exists():
        return
    if p.is_dir() and not any(p.iterdir()):
        return
    raise OutputExistsError(
        f"output: {p} already exists and is not empty; expected a new or empty path ({hint})"
    )


def temp_path(target: str | os.PathLike, kind: str = "tmp") -> Path:
    """A unique hidden sibling of ``target`` (``.NAME.tmp-PID-RANDOM``): two writers of the same
    target never share a temporary path. Nothing is created."""
    target = Path(target)
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temp_dir(target: str | os.PathLike) -> Path:
    """Create and return a unique empty temporary directory beside ``target``."""
    tmp = temp_path(target)
    tmp.mkdir(parents=True)
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False when the
    platform or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished directory ``tmp`` to ``target``, replacing any old ``target``.

    At every moment ``target``'s path holds either the complete old or the complete new
    directory: an existing ``target`` is swapped with ``tmp`` in one atomic exchange (Linux),
    else moved aside to ``.NAME.old-*`` first, which ``recover_dir`` puts back if the process
    dies before the new one is in place.
    """
    tmp, target = Path(tmp), Path(target)
    if not target.exists():
        os.replace(tmp, target)
        return target
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
        return target
    old = temp_path(target, "old")
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def recover_dir(target: str | os.PathLike) -> list[Path]:
    """Clean up after an interrupted ``replace_dir``/temporary write of ``target``: a missing
    ``target`` with a moved-aside ``.NAME.old-*`` gets it back; leftover ``.NAME.tmp-*`` and
    ``.NAME.old-*`` paths are removed. Returns the removed paths."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    olds = sorted(target.parent.glob(f".{target.name}.old*"), key=lambda p: p.stat().st_mtime)
    if not target.exists() and olds:
        os.replace(olds.pop(), target)  # the newest moved-aside copy was the complete target
    removed = [*olds, *target.parent.glob(f".{target.name}.tmp*")]
    for p in removed:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return removed
