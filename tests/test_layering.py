"""The layering rule, checked from the source: data flows one way through the packages.

pipelines/ and compiler/ import nothing above them, runtime/ builds on both, and memfit/ (the
command line) is the only package that imports click. examples/ is the leaf model zoo; the one
module of memfit's it may call is the attention op library, itself a leaf (checked here too).
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
# modules every package may import: memfit::attention, which models call (torch and numpy only)
SHARED_LEAVES = {"compiler.attention": {"torch", "numpy"}}


def imported(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a module, at any depth; `from a import b` gives
    `a.b`, a relative import its package."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else node.module or ""
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def run_time_imports(tree: ast.Module, package: str) -> list[tuple[int, str]]:
    """`imported`, less the imports only a type checker reads (in `if TYPE_CHECKING:`)."""
    typing_only = {
        n.lineno
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for stmt in block.body
        for n in ast.walk(stmt)
        if isinstance(n, ast.Import | ast.ImportFrom)
    }
    return [(line, m) for line, m in imported(tree, package) if line not in typing_only]


def violations(root: Path) -> list[str]:
    """`file:line: package imports X` for every import that breaks the rule."""
    found = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for line, module in imported(tree, package):
                top = module.partition(".")[0]
                if any(module == m or module.startswith(m + ".") for m in SHARED_LEAVES):
                    bad = False
                elif top in PROJECT:
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


def test_shared_leaves_import_only_what_they_declare() -> None:
    for module, third_party in SHARED_LEAVES.items():
        tree = ast.parse((ROOT / f"{module.replace('.', '/')}.py").read_text())
        tops = {m.partition(".")[0] for _, m in run_time_imports(tree, module.split(".")[0])}
        assert tops <= third_party | sys.stdlib_module_names, (module, sorted(tops))


def test_checker_finds_each_kind_of_violation(tmp_path: Path) -> None:
    for package in ALLOWED:
        (tmp_path / package).mkdir()
    (tmp_path / "compiler" / "passes").mkdir()
    (tmp_path / "compiler" / "passes" / "p.py").write_text(
        "import torch\nfrom compiler.ir import Graph\n\n\n"
        "def f():\n    from runtime.eager import x\n"
    )
    (tmp_path / "pipelines" / "cmd.py").write_text("import click\nfrom . import errors\n")
    (tmp_path / "examples" / "m.py").write_text(
        "import os\nimport torch\nimport numpy\n"
        "from compiler import attention\nfrom compiler import ir\n"
    )
    (tmp_path / "runtime" / "t.py").write_text("from memfit.models import resolve_model\n")
    (tmp_path / "memfit" / "cli.py").write_text("import click\nfrom runtime import train\n")
    assert violations(tmp_path) == [
        "examples/m.py:3: examples/ imports numpy",
        "examples/m.py:5: examples/ imports compiler",
        "pipelines/cmd.py:1: pipelines/ imports click",
        "compiler/passes/p.py:6: compiler/ imports runtime",
        "runtime/t.py:1: runtime/ imports memfit",
    ]
