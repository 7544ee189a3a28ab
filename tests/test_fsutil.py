"""Directory replacement: an interrupted replace never leaves the target missing; temporary
paths are unique per writer; leftovers are recovered."""

from __future__ import annotations

import contextlib
import os

import pytest

from vla_ray import fsutil
from vla_ray.fsutil import replace_dir


def _folder(path, text):
    path.mkdir()
    (path / "file.txt").write_text(text)
    return path


def _crash_on_second_replace(monkeypatch):
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the two moves")
        return real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", replace)


def test_replace_dir_interrupted_between_moves_keeps_a_complete_target(tmp_path, monkeypatch):
    target = _folder(tmp_path / "data", "old")
    new = _folder(tmp_path / "new", "new")
    _crash_on_second_replace(monkeypatch)
    with contextlib.suppress(KeyboardInterrupt):
        replace_dir(new, target)
    # the old or the new directory, complete, at the target's path
    assert (target / "file.txt").read_text() in ("old", "new")
    monkeypatch.undo()
    replace_dir(_folder(tmp_path / "newer", "newer"), target)
    assert (target / "file.txt").read_text() == "newer"
    assert not (tmp_path / "newer").exists()


def test_replace_dir_without_exchange_is_recovered(tmp_path, monkeypatch):
    """Where the atomic exchange is not available, a crash between the moves leaves the old
    directory aside, and ``recover_dir`` puts it back."""
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    target = _folder(tmp_path / "data", "old")
    _crash_on_second_replace(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(_folder(tmp_path / "new", "new"), target)
    monkeypatch.undo()
    assert not target.exists()
    (tmp_path / ".data.tmp-1-dead").mkdir()  # an unfinished write of another (dead) writer
    fsutil.recover_dir(target)
    assert (target / "file.txt").read_text() == "old"
    assert not list(tmp_path.glob(".data.*"))


def test_writers_use_unique_temporary_paths(tmp_path):
    """A second writer of the same target does not delete the first one's temporary folder."""
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    from vla_ray.data.rllib_format import read_episodes, write_episodes

    other = tmp_path / ".data.tmp"  # the name every writer used before
    other.mkdir()
    (other / "part-000000.parquet").write_text("another writer's unfinished file")
    ep = SingleAgentEpisode()
    ep.add_env_reset(observation=[0.0])
    ep.add_env_step(observation=[1.0], action=[0.5], reward=1.0, terminated=True)
    out = write_episodes([ep], tmp_path / "data")
    assert (other / "part-000000.parquet").is_file()
    assert len(read_episodes(out)) == 1
    a, b = fsutil.temp_path(out), fsutil.temp_path(out)
    assert a != b and a.parent == out.parent and a.name.startswith(".data.tmp")
