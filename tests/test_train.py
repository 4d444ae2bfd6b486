"""Training: loss falls, a kill -9 loses nothing (exact resume), divergence and bad resumes
are clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from memfit.cli import main
from runtime.checkpoint import CHECKSUMS, LATEST, STATE, latest_checkpoint

ARGS = ["gpt2-tiny", "--batch", "4", "--seq", "32", "--steps", "40", "--warmup", "5"]


@pytest.fixture(scope="module")
def data(compiler_data: Path) -> Path:
    """A small byte-level corpus: this repository's own Python sources."""
    return compiler_data


def _train(out: Path, data: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "memfit", "train", *ARGS, "--data", str(data)]
    cmd += ["--out", str(out), "--val-every", "10", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _final_tensors(out: Path) -> dict:
    path = latest_checkpoint(out / "checkpoints")
    assert path is not None
    return load_file(path / "tensors.safetensors")


def test_kill_minus_nine_then_resume_is_exact(data: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    proc = _train(straight, data)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()  # type: ignore[union-attr]

    crashed = tmp_path / "crashed"
    proc = _train(crashed, data, "--checkpoint-every", "5")
    metrics = crashed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 20:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = max(_losses(crashed))
    assert killed_at < 40

    resumed = _train(crashed, data, "--checkpoint-every", "5", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()  # type: ignore[union-attr]

    assert _losses(crashed) == _losses(straight)
    a, b = _final_tensors(straight), _final_tensors(crashed)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name
    first, last = _losses(crashed)[1], _losses(crashed)[40]
    assert last < first - 1.0


def test_divergence_stops_with_the_step_and_keeps_the_last_checkpoint(
    data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = [*ARGS[:-4], "--steps", "30", "--warmup", "0", "--data", str(data), "--out", str(out)]
    result = CliRunner().invoke(main, ["train", *args, "--lr", "1e6", "--checkpoint-every", "1"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "the loss is nan at step" in text or "the loss is inf at step" in text
    assert "last good checkpoint is" in text
    last = latest_checkpoint(out / "checkpoints")
    assert last is not None
    tensors = load_file(last / "tensors.safetensors")
    assert all(t.isfinite().all() for t in tensors.values())


def test_resume_with_other_tokenizer_is_refused(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", *ARGS[:-4], "--steps", "2", "--data", str(data), "--out", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    state_file = latest_checkpoint(out / "checkpoints") / "state.json"  # type: ignore[operator]
    state = json.loads(state_file.read_text())
    state["tokenizer"] = {"kind": "bpe", "vocab_size": 256}
    state_file.write_text(json.dumps(state))
    sums_file = state_file.parent / CHECKSUMS  # sealed again: the state is intact, but other
    sums = json.loads(sums_file.read_text())
    sums["files"][STATE] = {"bytes": state_file.stat().st_size, "sha256": _sha256(state_file)}
    sums_file.write_text(json.dumps(sums))
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 2
    assert "tokenizer" in result.output or "data" in result.output


def test_a_new_run_never_overwrites_an_old_one(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", *ARGS[:-4], "--steps", "2", "--data", str(data), "--out", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "already holds a run" in " ".join(result.output.split())


def run_and_resume_from_step_5(args: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """`memfit train` ARGS (10 steps, checkpoints every 5) straight, and again resumed from its
    step-5 checkpoint as if killed after it: the two run directories."""
    straight = tmp_path / "straight"
    result = CliRunner().invoke(main, [*args, "--out", str(straight)])
    assert result.exit_code == 0, result.output
    crashed = tmp_path / "crashed"
    shutil.copytree(straight, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-00000010")  # as if killed after step 5
    (crashed / "checkpoints" / LATEST).write_text("step-00000005\n")
    result = CliRunner().invoke(main, [*args, "--out", str(crashed), "--resume"])
    assert result.exit_code == 0, result.output
    return straight, crashed


def test_fp16_resume_restores_the_loss_scale(data: Path, tmp_path: Path) -> None:
    """The dynamic loss scale and its counters are part of a checkpoint: a resumed fp16 run
    carries on with the same scale (and so skips the same overflowing steps)."""
    args = ["train", "gpt2-tiny", "--batch", "4", "--seq", "32", "--steps", "10"]
    args += ["--warmup", "2", "--precision", "fp16", "--checkpoint-every", "5"]
    args += ["--val-every", "0", "--data", str(data)]
    straight, crashed = run_and_resume_from_step_5(args, tmp_path)
    scalers = [
        json.loads((run / "checkpoints" / "step-00000010" / "state.json").read_text())
        for run in (straight, crashed)
    ]
    counted = scalers[0]["loss_scaler"]  # the corpus is this repository's source: it moves
    assert counted["clean_steps"] + counted["skipped_steps"] == 10
    assert scalers[0]["loss_scaler"] == scalers[1]["loss_scaler"]
    want, got = _final_tensors(straight), _final_tensors(crashed)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert _losses(straight) == _losses(crashed)
