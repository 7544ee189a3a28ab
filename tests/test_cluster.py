"""cluster.yaml against Ray's cluster-launcher schema; `ray job submit` against a local head node."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _cluster_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _cluster_config()
    jsonschema.validate(raw, _ray_schema())  # the file as written
    validate_config(prepare_config(raw))  # as `ray up` checks it, after merging AWS defaults

    assert raw["provider"]["type"] == "aws"
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) >= 1, "the head node is the GPU learner node"
    rollout = [
        t
        for name, t in types.items()
        if name != raw["head_node_type"] and not t["resources"].get("GPU")
    ]
    assert rollout, "CPU rollout-worker node types"
    assert all(t["min_workers"] < t["max_workers"] for t in rollout), "rollout nodes autoscale"
    setup = "\n".join(raw["setup_commands"])
    assert "pip install" in setup and "vla-ray" in setup  # installs this project


def test_cluster_schema_check_is_strict():
    bad = _cluster_config()
    bad["available_node_types"][bad["head_node_type"]]["min_worker"] = 1  # typo'd key
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(bad, _ray_schema())


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _worker_port_range(exclude: list[int], width: int = 200) -> int:
    """Start of a worker port range of ``width`` that contains none of ``exclude``."""
    for _ in range(100):
        (start,) = _free_ports(1)
        if start + width < 65535 and not any(start <= p <= start + width for p in exclude):
            return start
    raise RuntimeError("no worker port range clear of the other Ray ports")


@pytest.mark.slow
def test_ray_job_submit_to_local_head_node(tmp_path):
    """`ray start --head` on loopback (own temp dir and ports), `ray job submit`, logs, stop."""
    ports = _free_ports(9)
    (gcs, dash, client, nm, om, agent_http, agent_grpc, metrics, rte) = ports
    wmin = _worker_port_range(ports)  # Ray refuses a worker range that overlaps another port
    # a short temp dir: Ray's unix socket paths must stay under ~107 characters
    temp_dir = tempfile.mkdtemp(prefix="vrj", dir="/tmp")
    env = dict(os.environ)
    # the job's entrypoint (`vla-ray`) and Ray's workers use this interpreter's environment
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "2"  # the job is done: nothing to drain
    # token auth with a token of this test's own (the default would read ~/.ray/auth_token)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    head = subprocess.Popen(
        [
            *RAY_CLI,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}",
            f"--node-manager-port={nm}",
            f"--object-manager-port={om}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={rte}",
            f"--min-worker-port={wmin}",
            f"--max-worker-port={wmin + 200}",
            f"--temp-dir={temp_dir}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    out_dir = tmp_path / "job-run"

    def ray_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*RAY_CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )

    try:
        deadline = time.time() + 180
        while True:  # the job server answers once the dashboard is up
            assert head.poll() is None, f"ray start exited: {head.stdout.read()}"
            if ray_cli("job", "list", f"--address={address}").returncode == 0:
                break
            assert time.time() < deadline, "the head node's job server did not come up"
            time.sleep(3)

        job_id = "vla-ray-test-job"
        submit = ray_cli(
            "job",
            "submit",
            f"--address={address}",
            f"--submission-id={job_id}",
            "--working-dir",
            ".",
            "--no-wait",
            "--",
            "vla-ray",
            "train",
            "--preset",
            "langreach-ppo",
            "--stop-iters",
            "1",
            "--num-env-runners",
            "1",
            "--set",
            "training.train_batch_size_per_learner=128",
            "--set",
            "training.minibatch_size=64",
            "--set",
            "training.num_epochs=1",
            "--set",
            "env_runners.num_envs_per_env_runner=2",
            "--output",
            str(out_dir),
            "--quiet",
        )
        assert submit.returncode == 0, submit.stdout + submit.stderr

        deadline = time.time() + 420
        while True:
            status = ray_cli("job", "status", f"--address={address}", job_id).stdout
            # `ray job status` ends with "Job '<id>' succeeded|failed|was stopped"
            if any(f"{job_id}' {s}" in status for s in ("succeeded", "failed", "was stopped")):
                break
            assert time.time() < deadline, f"job still running after 420 s: {status}"
            time.sleep(5)
        logs = ray_cli("job", "logs", f"--address={address}", job_id).stdout
        assert f"Job '{job_id}' succeeded" in status, f"{status}\n{logs[-3000:]}"
        assert "training langreach-ppo (ppo on vla_ray/LangReach-v0)" in logs
        assert '"iteration": 1' in logs  # the summary the job printed
        assert (out_dir / "config.json").is_file()
        assert (
            json.loads((out_dir / "config.json").read_text())["env_runners"]["num_env_runners"] == 1
        )
        assert (out_dir / "checkpoints" / "last" / "vla" / "model.safetensors").is_file()
    finally:
        # SIGTERM to `ray start --block` stops every process of this node (and only those)
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=30)
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def test_cluster_yaml_carla_node_runs_one_server_per_carla_server_resource():
    """The CARLA node type starts as many servers as it offers `carla_server`, and the
    env.servers of the header's example are exactly those servers."""
    import re
    import shlex

    from vla_ray.envs.carla_servers import build_parser, servers_setting

    raw = _cluster_config()
    (name,) = [
        n for n, t in raw["available_node_types"].items() if "carla_server" in t["resources"]
    ]
    node = raw["available_node_types"][name]
    assert node["min_workers"] == 0 < node["max_workers"]
    commands = node["worker_setup_commands"]  # replaces setup_commands on this node type
    assert all(c in commands for c in raw["setup_commands"] if "pip install -q -e" not in c)
    assert any("pip install" in c and "carla]" in c for c in commands)  # + the CARLA client
    (start,) = [c for c in commands if "carla_servers --n" in c]
    args = build_parser().parse_args(shlex.split(start.split("carla_servers", 1)[1]))
    assert args.n == node["resources"]["carla_server"]
    header = (ROOT / "cluster.yaml").read_text()
    (example,) = re.findall(r"env\.servers=[\w.:,]+", header)
    assert example == servers_setting(args.n, args.base_port, args.port_stride)
    assert '{"carla_server": 1}' in header  # one EnvRunner (with one env) per server


def test_cluster_yaml_runs_every_node_in_the_project_images():
    """GPU nodes run docker/Dockerfile.cuda's image, CPU rollout nodes the Dockerfile's; the
    setup installs only the synced checkout (torch and the EGL libraries are in the images);
    the CARLA node reaches the host's Docker daemon for its server containers."""
    raw = _cluster_config()
    docker = raw["docker"]
    assert docker["image"].endswith(":cuda") and docker["container_name"]
    types = raw["available_node_types"]
    for name, node in types.items():
        image = (node.get("docker") or {}).get("worker_image", docker["image"])
        gpu_node = node["resources"].get("GPU", 0) > 0 or "carla_server" in node["resources"]
        assert image.endswith(":cuda" if gpu_node or name == raw["head_node_type"] else ":cpu")
    setup = "\n".join(raw["setup_commands"])
    assert "pip install -q -e" in setup and "torch" not in setup and "apt-get" not in setup
    carla = next(t for t in types.values() if "carla_server" in t["resources"])
    options = carla["docker"]["worker_run_options"]
    assert "--volume=/var/run/docker.sock:/var/run/docker.sock" in options
    assert "docker.io" in (ROOT / "docker" / "Dockerfile.cuda").read_text()  # the docker CLI
