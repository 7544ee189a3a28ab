"""pyproject.toml declares what the installed package imports, and imports what it declares."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ("vla_ray", "algorithms", "envs", "serve")  # the folders pyproject installs
# declared but used without an import statement of their own
USED_INDIRECTLY = {"imageio-ffmpeg": "imageio's ffmpeg plugin writes the eval mp4s"}
# imported but not installable with pip: they come with the system they run in
FROM_THE_SYSTEM = {"rclpy": "ROS 2's client library, from a ROS 2 install (vla-ray ros2-bridge)"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0])


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _imported_modules() -> dict[str, set[str]]:
    """Top-level third-party modules imported by the packaged code -> files importing them."""
    out: dict[str, set[str]] = {}
    for folder in PACKAGED:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "vla_ray":
                        out.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return out


def test_every_import_is_declared():
    project = _project()
    declared = {_requirement_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {_requirement_name(r) for r in extra}
    dists = importlib.metadata.packages_distributions()
    missing = []
    for module, files in sorted(_imported_modules().items()):
        if module in FROM_THE_SYSTEM:
            continue
        names = {_norm(d) for d in dists.get(module, [])}
        if not names & declared:
            missing.append(
                f"{module} ({', '.join(sorted(names)) or 'not installed'}): {sorted(files)}"
            )
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(missing)


def test_every_core_dependency_is_used():
    project = _project()
    dists = importlib.metadata.packages_distributions()
    imported = {_norm(d) for m in _imported_modules() for d in dists.get(m, [])}
    unused = [
        r
        for r in project["dependencies"]
        if _requirement_name(r) not in imported and _requirement_name(r) not in USED_INDIRECTLY
    ]
    assert not unused, f"declared but never imported by the package: {unused}"


def test_dependency_floors_cover_what_the_code_needs():
    """The shipped tokenizer needs transformers 5, FSDP2's fully_shard torch 2.6, and
    transformers 5 PEFT 0.18: no floor below those."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    reqs = {Requirement(r).name: Requirement(r) for r in _project()["dependencies"]}
    for name, floor in (("transformers", "5.0"), ("torch", "2.6"), ("peft", "0.18")):
        lowest = min(Version(s.version) for s in reqs[name].specifier if s.operator == ">=")
        assert lowest >= Version(floor), f"{name}: floor {lowest} < {floor}"
    tokenizer = (ROOT / "vla_ray" / "assets" / "tokenizer" / "tokenizer_config.json").read_text()
    assert '"TokenizersBackend"' in tokenizer  # a transformers 5 class: the reason for the floor
