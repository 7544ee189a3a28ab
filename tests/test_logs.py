"""Quiet console output: Ray's, RLlib's and the workers' lines go to the run's log file."""

import logging
import os
import subprocess
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


# Two workers print the same line: Ray's log deduplication forwards the first at once and holds
# the repeat for up to 5 s, so the repeat came after the block (as a short `vla-ray train` run's
# second EnvRunner's RLlib deprecation notice did)
LATE_LINES = """
import sys
import time

import ray

from vla_ray.logs import quiet_logs
from vla_ray.train import init_ray

with quiet_logs(sys.argv[1]) as log:
    init_ray(num_cpus=1)  # started inside the block, as `vla-ray train` starts it

    @ray.remote(num_cpus=0)
    class Noisy:
        def say(self):
            print("the same worker line", file=sys.stderr, flush=True)

    actors = [Noisy.remote() for _ in range(2)]
    ray.get([a.say.remote() for a in actors])
    deadline = time.time() + 30
    while "the same worker line" not in log.read_text() and time.time() < deadline:
        time.sleep(0.1)
print("after the block", ray.is_initialized())
"""


def test_ray_started_inside_the_block_ends_with_it_and_its_late_lines_stay_off_the_console(
    tmp_path,
):
    done = subprocess.run(
        [sys.executable, "-c", LATE_LINES, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "after the block False" in done.stdout
    assert "the same worker line" not in done.stdout + done.stderr
    assert "the same worker line" in (tmp_path / LOG_NAME).read_text()


def test_only_rllib_s_own_deprecation_notices_are_dropped(caplog):
    from ray._common.deprecation import deprecation_warning

    from vla_ray.logs import drop_rllib_own_deprecation_notices

    lg = logging.getLogger("ray._common.deprecation")
    drop_rllib_own_deprecation_notices()
    drop_rllib_own_deprecation_notices()  # idempotent: one filter
    assert sum(type(f).__name__ == "_DropRLlibOwnNotices" for f in lg.filters) == 1
    lg.addHandler(caplog.handler)  # Ray's loggers do not propagate to the root
    try:
        # what RLModule.__init__ raises for every module (RLlib builds an RLModuleConfig)
        deprecation_warning(
            old="RLModule(config=[RLModuleConfig object])",
            new="RLModule(observation_space=.., action_space=.., inference_only=.., "
            "model_config=.., catalog_class=..)",
        )
        deprecation_warning(old="some_user_call()", new="another_call()")
    finally:
        lg.removeHandler(caplog.handler)
    assert "RLModuleConfig" not in caplog.text and "some_user_call()" in caplog.text
