"""`memfit --help` answers without loading torch, scipy or matplotlib (seconds of imports):
commands are imported when used, and the listing's summaries are declared in memfit/cli.py.
Times are measured by hand (see the note in benchmarks), never asserted here."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from memfit.cli import COMMANDS, INSPECT_COMMANDS

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "scipy", "matplotlib", "pyarrow")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["compile"],
        ["plan"],
        ["train"],
        ["prepare"],
        ["prune"],
        ["inspect"],
        ["inspect", "kernels"],
    ],
)
def test_help_loads_no_heavy_library(args: list[str]) -> None:
    code = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from memfit.cli import main\n"
        f"result = CliRunner().invoke(main, {[*args, '--help']!r})\n"
        "assert result.exit_code == 0, result.output\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout) == []


@pytest.mark.parametrize("name", [*COMMANDS, *INSPECT_COMMANDS])
def test_the_listed_summary_is_the_commands_own(name: str) -> None:
    module, attribute, summary = {**COMMANDS, **INSPECT_COMMANDS}[name]
    command = getattr(importlib.import_module(module), attribute)
    assert command.get_short_help_str(limit=1000) == summary
