"""Fault injection: kill -9 at random moments, half of them inside a checkpoint write, then
`--resume`; the run ends with the same loss at every step and the same final tensors as a
run that was never interrupted. (ENOSPC mid-checkpoint: tests/test_resume.py.)"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from compiler.mesh import Mesh
from runtime.checkpoint import find_resumable
from runtime.distributed import Parallel

ARGS = ["gpt2-tiny", "--batch", "2", "--seq", "16", "--warmup", "2", "--val-every", "0"]
ARGS += ["--checkpoint-every", "1"]


def _start(out: Path, data: Path, steps: int, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "memfit", "train", *ARGS, "--steps", str(steps)]
    cmd += ["--data", str(data), "--out", str(out), *extra]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _steps_logged(out: Path) -> int:
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _kill_when(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float = 300
) -> bool:
    """Poll `ready()` every millisecond; SIGKILL the run once it holds. False if it ended."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()  # type: ignore[union-attr]
    return False


def _losses(out: Path) -> list[tuple[int, float]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def _writing(checkpoints: Path, pattern: str) -> Callable[[], bool]:
    return lambda: any(checkpoints.glob(pattern))


def _after_a_new_step(out: Path, delay: float) -> Callable[[], bool]:
    """True `delay` seconds after the run logged a step beyond those logged now."""
    logged, seen = _steps_logged(out), []

    def ready() -> bool:
        if not seen and _steps_logged(out) > logged:
            seen.append(time.time())
        return bool(seen) and time.time() - seen[0] >= delay

    return ready


def _kill_and_resume(data: Path, tmp_path: Path, kills: int, steps: int, seed: int) -> None:
    """`kills` kill -9s, alternately at a random instant after the run has taken a new step
    and the instant a checkpoint's temporary directory appears; then the run finishes."""
    straight = tmp_path / "straight"
    assert _kill_when(_start(straight, data, steps), lambda: False) is False
    rng = random.Random(seed)
    out = tmp_path / "killed"
    checkpoints = out / "checkpoints"
    done = inside_writes = 0
    proc = _start(out, data, steps)
    while True:
        if done == kills:
            assert _kill_when(proc, lambda: False) is False
            break
        writing = f".tmp-step-*-{proc.pid}"  # this process's, not one a kill left behind
        if done % 2:
            ready = _writing(checkpoints, writing)
        else:
            # within a few steps of the last: on an idle machine a step and its checkpoint take
            # ~10 ms, and a longer wait would let the run finish before the kills are spent
            ready = _after_a_new_step(out, rng.uniform(0.0, 0.05))
        if not _kill_when(proc, ready):
            break  # finished before the kill: fewer kills than asked, caught below
        done += 1
        inside_writes += any(checkpoints.glob(writing))
        resume = ["--resume"] if any(checkpoints.glob("step-*")) else []
        proc = _start(out, data, steps, *resume)
    assert done == kills, f"the run finished after {done} of {kills} kills"
    assert inside_writes >= kills // 2, inside_writes
    assert not list(checkpoints.glob(".tmp-step-*"))  # stale temporaries were removed
    assert _losses(out) == _losses(straight)
    want = load_file(find_resumable(straight / "checkpoints").path / "tensors.safetensors")
    got = load_file(find_resumable(checkpoints).path / "tensors.safetensors")
    assert want.keys() == got.keys() and all(want[k].equal(got[k]) for k in want)


def test_a_few_kills_resume_to_the_same_losses(passes_data: Path, tmp_path: Path) -> None:
    _kill_and_resume(passes_data, tmp_path, kills=2, steps=6, seed=1)


@pytest.mark.slow
def test_twenty_kills_at_random_moments_resume_to_the_same_losses(
    passes_data: Path, tmp_path: Path
) -> None:
    _kill_and_resume(passes_data, tmp_path, kills=20, steps=60, seed=2)


def _any_rank(rank: int, port: int, results: Path) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        parallel = Parallel(Mesh(2, 1, 0), rank, {})
        answers = [parallel.any_rank(rank == 0), parallel.any_rank(False)]
        (results / f"rank{rank}.json").write_text(json.dumps(answers))
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_failure_on_rank_0_stops_every_rank(tmp_path: Path) -> None:
    """Only rank 0 writes; when it fails, `any_rank` tells the others, who would otherwise
    wait for it in the next step's all-reduce forever."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_any_rank, args=(port, tmp_path), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [True, False]
