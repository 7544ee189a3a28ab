"""File-system helpers shared by everything that writes directories (checkpoints, datasets,
exports, ``save_pretrained``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished directory ``tmp`` to ``target``, replacing any old ``target``.

    The old directory is first moved aside, so at every moment either the old or the new one
    is complete at ``target``'s path (an interrupted write never leaves a half-written one).
    """
    tmp, target = Path(tmp), Path(target)
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target
