"""Quiet console output: Ray's, RLlib's and the workers' lines go to the run's log file."""

import logging
import os
import sys
import time
import warnings

from vla_ray.logs import LOG_NAME, quiet_logs


def test_quiet_logs_send_ray_lines_to_the_run_log_and_keep_ours(tmp_path, capfd):
    import ray.rllib  # noqa: F401  (its console handler exists before the block)

    rllib = logging.getLogger("ray.rllib")
    before = list(rllib.handlers)
    with quiet_logs(tmp_path) as log:
        assert log == tmp_path / LOG_NAME
        print("our line")
        sys.stderr.write("progress bar\n")  # tqdm writes to sys.stderr: still the console
        logging.getLogger("ray").info("ray info line")
        logging.getLogger("ray.rllib.algorithms").warning("rllib warning line")
        logging.getLogger("ray.data").warning("ray data line")
        warnings.warn("a warning line", UserWarning, stacklevel=1)
        os.write(2, b"core_worker.cc: C++ line\n")  # Ray's C++ logs write to fd 2
    out, err = capfd.readouterr()
    assert "our line" in out and "progress bar" in err
    text = log.read_text()
    for line in ("ray info line", "rllib warning line", "ray data line", "a warning line"):
        assert line in text and line not in out + err
    assert "C++ line" in text and "C++ line" not in err
    # after the block: Ray's handlers are back, fd 2 is the console again
    assert rllib.handlers == before
    rllib.warning("after the block")
    os.write(2, b"fd 2 after\n")
    assert "fd 2 after" in capfd.readouterr().err
    assert "after the block" not in log.read_text()


def test_verbose_changes_nothing(tmp_path):
    rllib = logging.getLogger("ray.rllib")
    before, stderr = list(rllib.handlers), sys.stderr
    with quiet_logs(tmp_path, verbose=True) as log:
        assert rllib.handlers == before and sys.stderr is stderr
    assert log is None and not (tmp_path / LOG_NAME).exists()


def test_quiet_logs_send_ray_worker_output_to_the_run_log(ray_session, tmp_path, capfd):
    ray = ray_session

    @ray.remote
    def noisy() -> int:
        print("worker stderr line", file=sys.stderr, flush=True)
        return 1

    with quiet_logs(tmp_path) as log:
        assert ray.get(noisy.remote()) == 1
        deadline = time.time() + 15  # the driver polls the workers' log files
        while "worker stderr line" not in log.read_text() and time.time() < deadline:
            time.sleep(0.2)
    assert "worker stderr line" in log.read_text()
    assert "worker stderr line" not in capfd.readouterr().err
