"""The layering rule, checked from the source: data flows one way through the packages.

pipelines/ and compiler/ import nothing above them, runtime/ builds on both, and memfit/ (the
command line) is the only package that imports click. examples/ is the leaf model zoo.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = {"examples", "pipelines", "compiler", "runtime", "memfit"}
# package → the project packages it may import (itself included)
ALLOWED = {
    "examples": {"examples"},
    "pipelines": {"pipelines"},
    "compiler": {"compiler", "examples"},
    "runtime": {"runtime", "compiler", "pipelines", "examples"},
    "memfit": PROJECT,
}
CLI_ONLY = {"click": "memfit"}  # a third-party package only one project package may import
LEAF_THIRD_PARTY = {"examples": {"torch"}}  # the leaf imports nothing outside these and stdlib


def imported(tree: ast.Module, package: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in a module, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.partition(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            top = package if node.level else (node.module or "").partition(".")[0]
            found.append((node.lineno, top))
    return found


def violations(root: Path) -> list[str]:
    """`file:line: package imports X` for every import that breaks the rule."""
    found = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for line, top in imported(tree, package):
                if top in PROJECT:
                    bad = top not in allowed
                elif top in CLI_ONLY:
                    bad = CLI_ONLY[top] != package
                else:
                    leaf = LEAF_THIRD_PARTY.get(package)
                    bad = leaf is not None and top not in leaf | sys.stdlib_module_names
                if bad:
                    found.append(f"{path.relative_to(root)}:{line}: {package}/ imports {top}")
    return found


def test_the_tree_keeps_the_layering() -> None:
    assert violations(ROOT) == []


def test_checker_finds_each_kind_of_violation(tmp_path: Path) -> None:
    for package in ALLOWED:
        (tmp_path / package).mkdir()
    (tmp_path / "compiler" / "passes").mkdir()
    (tmp_path / "compiler" / "passes" / "p.py").write_text(
        "import torch\nfrom compiler.ir import Graph\n\n\n"
        "def f():\n    from runtime.eager import x\n"
    )
    (tmp_path / "pipelines" / "cmd.py").write_text("import click\nfrom . import errors\n")
    (tmp_path / "examples" / "m.py").write_text("import os\nimport torch\nimport numpy\n")
    (tmp_path / "runtime" / "t.py").write_text("from memfit.models import resolve_model\n")
    (tmp_path / "memfit" / "cli.py").write_text("import click\nfrom runtime import train\n")
    assert violations(tmp_path) == [
        "examples/m.py:3: examples/ imports numpy",
        "pipelines/cmd.py:1: pipelines/ imports click",
        "compiler/passes/p.py:6: compiler/ imports runtime",
        "runtime/t.py:1: runtime/ imports memfit",
    ]
