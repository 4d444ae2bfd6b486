"""README's "Using it" section, run top to bottom in an empty directory as a new user would.

Only step counts are made small (each run must still exit 0); every other flag is the
README's own, so a command that stops working, or two that collide, fail here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = {  # flag: the value the walk uses instead of the README's
    "--steps": "3",
    "--finetune-steps": "2",
}
ADDED = {  # subcommand: flags added to keep the walk short (unless the README sets them)
    "train": ["--steps", "3", "--val-every", "0"],
    "prune": ["--steps", "3", "--finetune-steps", "2", "--val-batches", "1"],
}


def using_it_commands() -> list[str]:
    """The command lines of the first sh block under "## Using it", comments removed."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using it", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "README: no sh block under 'Using it'"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def _argv(line: str, cwd: Path) -> list[str]:
    words = shlex.split(line)
    assert words[0] == "memfit", f"README: {line!r} does not run memfit"
    argv = [sys.executable, "-m", "memfit"]
    for i, word in enumerate(words[1:], 1):
        if words[i - 1] in SMALL:
            word = SMALL[words[i - 1]]
        argv += sorted(str(p.relative_to(cwd)) for p in cwd.glob(word)) if "*" in word else [word]
    command = next((w for w in words[1:] if w in ADDED), None)
    if command is not None:
        extra = ADDED[command]
        for flag, value in zip(extra[::2], extra[1::2], strict=True):
            if flag not in words:
                argv += [flag, value]
    return argv


def _my_docs(directory: Path) -> None:
    """A JSONL corpus: this repository's Python sources, one document per file."""
    directory.mkdir()
    sources = sorted((ROOT / "compiler").rglob("*.py"))
    for part in range(2):
        lines = [json.dumps({"text": p.read_text()}) for p in sources[part::2]]
        (directory / f"part{part}.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_using_it_runs_top_to_bottom(tmp_path: Path) -> None:
    _my_docs(tmp_path / "my_docs")
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    for line in using_it_commands():
        argv = _argv(line, tmp_path)
        print(f"README: {shlex.join(argv[1:])}", flush=True)  # progress, with pytest -s
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{line}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


def test_the_walk_keeps_the_readme_flags(tmp_path: Path) -> None:
    """What the slow walk runs: the README's words, only smaller step counts."""
    lines = using_it_commands()
    assert any(line.startswith("memfit prepare") for line in lines)
    fresh = [line for line in lines if " train " in f" {line} " and "--resume" not in line]
    outs = [re.search(r"--out (\S+)", line) for line in fresh]
    assert all(outs), "each training run names its --out"
    assert len({m.group(1) for m in outs if m}) == len(fresh), "each run needs its own --out"
    argv = _argv("memfit train gpt2-mini --steps 1000 --grad-accum 4", tmp_path)
    assert argv[3:] == ["train", "gpt2-mini", "--steps", "3", "--grad-accum", "4"] + [
        "--val-every",
        "0",
    ]
