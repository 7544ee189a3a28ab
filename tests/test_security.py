"""Repository-wide rules for untrusted input: no pickle-capable ``torch.load``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("vla_ray", "algorithms", "serve", "envs", "bench", "tests")


def _torch_loads_without_weights_only() -> list[str]:
    bad = []
    for folder in SOURCES:
        for f in sorted((ROOT / folder).rglob("*.py")):
            if any((ROOT / p).is_symlink() for p in f.relative_to(ROOT).parents[:-1]):
                continue
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                if node.func.attr != "load" or getattr(node.func.value, "id", None) != "torch":
                    continue
                flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    return bad


def test_every_torch_load_is_weights_only():
    assert _torch_loads_without_weights_only() == []
