"""pyproject says Python >= 3.11: every module must compile on each newer interpreter this host
has (3.12, 3.13), and import nothing those versions removed from the standard library (PEP 594:
distutils, imp, asynchat, cgi, pipes, ...). CI installs with 3.11; this checks the others without
installing torch for them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Run by the other interpreter: compile every file, then list imports of stdlib modules this
# interpreter no longer has (the names come from 3.11's list, passed on stdin).
CHECK = r"""
import ast, sys
from pathlib import Path
ours = set(sys.stdin.read().split())
problems = []
for path in sorted(p for root in sys.argv[1:] for p in Path(root).rglob("*.py")):
    tree = compile(path.read_text(), str(path), "exec", ast.PyCF_ONLY_AST)
    compile(tree, str(path), "exec")
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        for name in names:
            top = name.split(".")[0]
            if top in ours and top not in sys.stdlib_module_names:
                problems.append(f"{path}:{node.lineno}: imports {name}, removed in {sys.version.split()[0]}")
print("\n".join(problems))
sys.exit(1 if problems else 0)
"""


def _interpreter(version: str) -> str | None:
    """python3.X on PATH, or under pyenv's versions (whose shims refuse versions not selected)."""
    found = [shutil.which(f"python{version}")]
    found += sorted(str(p) for p in Path("~/.pyenv/versions").expanduser().glob(f"{version}*/bin/python{version}"))
    for python in filter(None, found):
        if subprocess.run([python, "--version"], capture_output=True, timeout=30).returncode == 0:
            return python
    return None


def test_pyproject_declares_311_and_newer() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    assert {f"Programming Language :: Python :: 3.{m}" for m in (11, 12, 13)} <= set(project["classifiers"])
    assert any(dep.startswith("nvidia-ml-py") for dep in project["optional-dependencies"]["gpu"])


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_sources_compile_and_use_no_removed_stdlib_module(version: str) -> None:
    python = _interpreter(version)
    if python is None:
        pytest.skip(f"no python{version} on this host")
    run = subprocess.run([python, "-c", CHECK, str(ROOT / "infscaled"), str(ROOT / "tests")],
                         input=" ".join(sorted(sys.stdlib_module_names)), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
