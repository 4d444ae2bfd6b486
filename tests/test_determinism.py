"""`--deterministic`: the same command computes the same bits whatever the thread count."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from memfit.cli import main


@pytest.fixture
def restore_torch() -> Iterator[None]:
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(strict)


def test_deterministic_runs_are_bit_identical_with_any_thread_count(
    passes_data: Path, tmp_path: Path, restore_torch: None
) -> None:
    args = ["train", "gpt2-tiny", "--batch", "4", "--seq", "32", "--steps", "4", "--warmup", "1"]
    args += ["--val-every", "0", "--data", str(passes_data), "--deterministic"]
    losses = []
    for threads in (2, 1):
        torch.set_num_threads(threads)
        out = tmp_path / f"threads-{threads}"
        result = CliRunner().invoke(main, [*args, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        lines = (out / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(line)["loss"] for line in lines])
    assert len(losses[0]) == 4 and losses[0] == losses[1]
