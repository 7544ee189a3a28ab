"""The layout of a run directory and its checkpoints, known here only.

A run directory (``vla-ray train --output OUT``) holds ``config.json`` (the resolved settings),
``metrics.jsonl`` (one JSON line per iteration), ``summary.json`` and ``checkpoints/``:
``last`` and ``best`` (and, with ``keep_checkpoints=true``, ``iter_NNNNNN``). Each checkpoint
is an RLlib checkpoint (the policy's module under :data:`MODULE_SUBDIR`) with a
``vla_ray_meta.json`` (:data:`META_NAME`: env, env config, preset, training settings, iteration,
metric) and, for algorithms whose policy is a VLA, a ``vla/`` ``save_pretrained`` export with
the same meta and a model card. Saves are atomic (a temporary folder replaces the old one);
an interrupted save is recovered or cleaned up before the next run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vla_ray.fsutil import OutputExistsError, recover_dir, replace_dir, temp_path
from vla_ray.logs import LOG_NAME
from vla_ray.model_card import META_NAME

if TYPE_CHECKING:
    from vla_ray.run_spec import RunSpec

__all__ = [
    "BEST",
    "CHECKPOINTS_DIR",
    "DEFAULT_MODULE_ID",
    "LAST",
    "META_NAME",
    "MODULE_SUBDIR",
    "VLA_DIR",
    "ResumeError",
    "copy_checkpoint",
    "export_vla",
    "kept_name",
    "prepare_run_dir",
    "recover_checkpoints",
    "restore_algorithm",
    "run_checkpoints",
    "save_checkpoint",
    "write_checkpoint",
]

DEFAULT_MODULE_ID = "default_policy"
# the policy's RLModule inside an RLlib checkpoint
MODULE_SUBDIR = Path("learner_group") / "learner" / "rl_module" / DEFAULT_MODULE_ID
CHECKPOINTS_DIR = "checkpoints"  # in a run directory
LAST, BEST = "last", "best"  # checkpoints of a run: the latest, and the best by its metric
VLA_DIR = "vla"  # in a checkpoint: the policy's save_pretrained export


def run_checkpoints(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """A run directory's checkpoints in order of preference: ``best``, then ``last``."""
    ckpts = Path(run_dir) / CHECKPOINTS_DIR
    return ckpts / BEST, ckpts / LAST


def kept_name(iteration: int) -> str:
    """The name of a kept periodic checkpoint (``keep_checkpoints=true``)."""
    return f"iter_{iteration:06d}"


def export_vla(algo, directory: Path) -> None:
    """``save_pretrained`` of the policy's VLA, from an EnvRunner or (offline) the learner."""
    if algo.env_runner_group is not None:
        algo.get_module().vla.save_pretrained(directory)
        return
    target = str(directory.resolve())
    algo.learner_group.foreach_learner(
        lambda learner: learner.module[DEFAULT_MODULE_ID].vla.save_pretrained(target)
    )


def write_checkpoint(algo, spec: RunSpec, directory: Path, info: dict[str, Any]) -> Path:
    """Write an RLlib checkpoint + ``vla_ray_meta.json`` + ``vla/`` export into ``directory``."""
    directory = Path(directory)
    algo.save_to_path(str(directory.resolve()))
    meta = dict(
        env=spec.env,
        env_config=spec.settings["env_config"],
        preset=spec.preset,
        # what a sequence policy needs to be run again (the Decision Transformer's window)
        training=spec.settings["training"],
        **info,
    )
    (directory / META_NAME).write_text(json.dumps(meta, indent=2, default=str))
    from vla_ray.algorithms import get_algorithm

    # algorithms whose policy is more than a VLA (e.g. the Decision Transformer) set
    # EXPORTS_VLA = False: their RLlib checkpoint is the policy
    if get_algorithm(spec.algorithm).EXPORTS_VLA:
        export_vla(algo, directory / VLA_DIR)
        (directory / VLA_DIR / META_NAME).write_text(json.dumps(meta, indent=2, default=str))
        from vla_ray.model_card import write_model_card

        write_model_card(directory / VLA_DIR, meta=json.loads(json.dumps(meta, default=str)))
    return directory


def save_checkpoint(algo, spec: RunSpec, target: Path, info: dict[str, Any]) -> Path:
    """Write an RLlib checkpoint + meta + ``vla/`` export to ``target``, replacing it atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    try:
        write_checkpoint(algo, spec, tmp, info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, target)


def copy_checkpoint(source: Path, target: Path) -> Path:
    """Copy the finished checkpoint ``source`` to ``target``, replacing it atomically: a
    checkpoint of the same iteration as one just written is copied, not serialised again."""
    tmp = temp_path(target)
    try:
        shutil.copytree(source, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, target)


class ResumeError(FileNotFoundError):
    """``--resume`` was asked for but the run directory has no checkpoint to resume from."""


# entries created in the run directory before training starts: a tracker's (``--wandb``) and
# the log file of ``vla_ray.logs.quiet_logs``
_TRACKER_ENTRIES = frozenset({"wandb", LOG_NAME})
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)(?:-.*)?$")


def recover_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Recover or clean up after an interrupted checkpoint save in ``ckpt_dir``: a checkpoint
    moved aside but not yet replaced is put back, unfinished temporary ones are removed.
    Returns the removed paths."""
    if not ckpt_dir.is_dir():
        return []
    names = {m["name"] for p in ckpt_dir.iterdir() if (m := _LEFTOVER.match(p.name))}
    return [p for name in sorted(names) for p in recover_dir(ckpt_dir / name)]


def restore_algorithm(algo: Any, path: str | os.PathLike) -> None:
    """``algo.restore_from_path(path)``, also for offline algorithms (BC, CQL, ...): RLlib
    2.60's override then pushes the restored weights to ``env_runner_group``, which an offline
    algorithm does not have (``None``: AttributeError). For them the checkpoint is restored by
    the base ``Checkpointable`` and the weights go to the evaluation EnvRunners, if any."""
    path = str(Path(path).resolve())
    if algo.env_runner_group is not None:
        algo.restore_from_path(path)
        return
    from ray.rllib.utils.checkpoints import Checkpointable

    Checkpointable.restore_from_path(algo, path)
    if algo.eval_env_runner_group is not None:
        algo.eval_env_runner_group.sync_weights(
            from_worker_or_learner_group=algo.learner_group, inference_only=True
        )


def prepare_run_dir(
    output: str | os.PathLike, resume: bool, resume_if_exists: bool = False
) -> bool:
    """Check ``output`` before a run and say whether the run resumes.

    ``resume``: ``OUTPUT/checkpoints/last`` must exist (``ResumeError`` otherwise);
    ``resume_if_exists``: resume when it exists, else start fresh; neither: ``output`` must be
    new or empty (``OutputExistsError``; a tracker's ``wandb/`` folder does not count).
    Interrupted checkpoint saves are recovered or cleaned up first.
    """
    out = Path(output)
    ckpt_dir = out / CHECKPOINTS_DIR
    recover_checkpoints(ckpt_dir)
    has_last = (ckpt_dir / LAST / META_NAME).is_file()
    if resume and not has_last:
        raise ResumeError(
            f"--resume: no checkpoint to resume from at {ckpt_dir / LAST}; expected the run "
            "directory of an earlier `vla-ray train` (--resume-if-exists starts fresh when "
            "there is none)"
        )
    if resume or (resume_if_exists and has_last):
        return True
    leftover = (
        sorted(p.name for p in out.iterdir() if p.name not in _TRACKER_ENTRIES)
        if out.is_dir()
        else []
    )
    if leftover and not resume_if_exists:
        raise OutputExistsError(
            f"--output: {out} is not empty (holds {', '.join(leftover[:5])}); pass --resume to "
            "continue that run, or choose another --output"
        )
    return False
