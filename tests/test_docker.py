"""The Docker images: the Dockerfiles install what CI installs; where Docker runs, the CPU image
builds and runs the quickstart's CLI and renders LangReach off-screen."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": ROOT / "Dockerfile", "cuda": ROOT / "docker" / "Dockerfile.cuda"}
TAG = "vla-ray-test:cpu"


def _ci_apt_packages() -> set[str]:
    (line,) = re.findall(
        r"apt-get install -y -qq ([\w\s.-]+?) >/dev/null", (ROOT / ".ci" / "run").read_text()
    )
    return set(line.split())


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_installs_what_ci_installs(variant):
    text = DOCKERFILES[variant].read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    (torch_pin,) = re.findall(r"torch==[\d.]+", ci)
    assert f'"{torch_pin}"' in text  # the same torch as CI
    index = "whl/cpu" if variant == "cpu" else "whl/cu"
    assert re.search(rf'pip install -q "{torch_pin}" --index-url \S+{index}', text)
    assert _ci_apt_packages() <= set(re.findall(r"[\w.-]+", text))  # EGL / OSMesa libraries
    assert re.search(r"^\s+MUJOCO_GL=egl", text, re.M)
    assert re.search(r'pip install -q "\.\[export[\w,]*\]"', text)  # this project, not editable
    # every folder pyproject installs from is copied into the image
    tomllib = pytest.importorskip("tomllib")
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for folder in set(package_dir["package-dir"].values()):
        assert re.search(rf"^COPY {folder} \./{folder}$", text, re.M), folder
    assert 'ENTRYPOINT ["vla-ray"]' in text


def test_dockerignore_keeps_runs_and_git_out_of_the_context():
    ignored = (ROOT / ".dockerignore").read_text().split("\n")
    assert {".git", "runs/", "wandb/", "**/__pycache__"} <= set(ignored)


def _docker_unavailable() -> str | None:
    """Why Docker cannot be used here, or None when it can."""
    if shutil.which("docker") is None:
        return "docker is not available: no docker CLI on PATH"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "docker is not available: `docker info` did not answer in 30 s"
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"docker is not available: the daemon does not answer `docker info` ({last})"
    (base,) = re.findall(r"^FROM (\S+)", DOCKERFILES["cpu"].read_text(), re.M)
    if subprocess.run(["docker", "image", "inspect", base], capture_output=True).returncode:
        # pulling needs Docker Hub, which CI machines here cannot reach (package registries only)
        return f"the base image {base} is not in the local Docker cache (`docker pull {base}`)"
    return None


@pytest.mark.slow
def test_cpu_image_builds_and_runs_the_quickstart_cli():
    """Builds the Dockerfile (needs the base image and PyPI: minutes on first build, cached
    after), then runs `vla-ray quickstart --help` and one off-screen LangReach render in it."""
    reason = _docker_unavailable()
    if reason:
        pytest.skip(reason)
    subprocess.run(["docker", "build", "-q", "-t", TAG, "."], cwd=ROOT, check=True, timeout=3600)
    run = subprocess.run(
        ["docker", "run", "--rm", TAG, "quickstart", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "usage: vla-ray quickstart" in run.stdout and "--rl" in run.stdout
    render = (
        "import gymnasium as gym, vla_ray.envs; "
        "obs, _ = gym.make('vla_ray/LangReach-v0').reset(seed=0); "
        "print(obs['image'].shape, int(obs['image'].max()))"
    )
    run = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "python", TAG, "-c", render],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    height, width, peak = map(int, re.match(r"\((\d+), (\d+), 3\) (\d+)", run.stdout).groups())
    assert height > 0 and width > 0 and peak > 0  # rendered off-screen (MUJOCO_GL=egl), not black
