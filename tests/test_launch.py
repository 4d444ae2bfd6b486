"""`memfit train --nproc-per-node N`: memfit launches its own ranks (as torchrun --standalone
does), and a rank's user error stays one paragraph with exit status 2 — no launcher report or
traceback after it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _train(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "memfit", "train", "gpt2-tiny", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)


def test_a_rank_error_is_one_paragraph_and_exit_2(tmp_path: Path) -> None:
    done = _train("--seq", "0", "--out", str(tmp_path / "run"))
    assert done.returncode == 2, done.stderr
    assert "error (rank 0): bad training options: --seq must be ≥ 1, got 0" in done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_the_ranks_train_one_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--zero", "2", "--steps", "2", "--batch", "4", "--seq", "32", "--val-every", "0"]
    done = _train(*args, "--out", str(out))
    assert done.returncode == 0, done.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
