"""Checkpoints: every file checksummed, damage named and skipped, a failed write loses nothing."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from runtime import checkpoint
from runtime.checkpoint import (
    CHECKSUMS,
    LATEST,
    STATE,
    TENSORS,
    CheckpointError,
    checkpoints,
    damage,
    find_resumable,
    load_checkpoint,
    remove_stale,
    save_checkpoint,
)


def _save(directory: Path, step: int, keep: int = 3) -> Path:
    tensors = {"w": torch.full((4, 4), float(step)), "b": torch.arange(3.0)}
    return save_checkpoint(directory, step, tensors, {"step": step}, keep)


@pytest.fixture
def three(tmp_path: Path) -> Path:
    """Checkpoints at steps 1, 2, 3; LATEST names step 3."""
    for step in (1, 2, 3):
        _save(tmp_path, step)
    return tmp_path


def _flip(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_file_is_checksummed_and_intact(three: Path) -> None:
    recorded = json.loads((three / "step-00000003" / CHECKSUMS).read_text())["files"]
    assert set(recorded) == {TENSORS, STATE}
    assert damage(three / "step-00000003") is None
    found = find_resumable(three)
    assert found.path.name == "step-00000003" and found.skipped == [] and found.report() == ""
    tensors, state = load_checkpoint(found.path)
    assert state == {"step": 3} and torch.equal(tensors["w"], torch.full((4, 4), 3.0))


@pytest.mark.parametrize(
    ("harm", "named"),
    [
        (lambda p: _flip(p / TENSORS), "sha256 differs"),
        (lambda p: (p / TENSORS).write_bytes((p / TENSORS).read_bytes()[:100]), "truncated"),
        (lambda p: _flip(p / STATE, 3), "sha256 differs"),
        (lambda p: (p / STATE).unlink(), "state.json is missing"),
        (lambda p: (p / CHECKSUMS).unlink(), "checksums.json is missing"),
        (lambda p: (p / CHECKSUMS).write_text("{"), "checksums.json is unreadable"),
        (lambda p: (p / CHECKSUMS).write_text('{"files": [1]}'), "checksums.json is unreadable"),
        (lambda p: (p / CHECKSUMS).write_text('{"files": {"state.json": {}}}'), "does not cover"),
    ],
    ids=[
        "flipped-weights",
        "truncated-weights",
        "flipped-state",
        "no-state",
        "no-sums",
        "bad-sums",
        "sums-not-a-dict",
        "sums-without-fields",
    ],
)
def test_a_damaged_latest_is_named_and_the_newest_intact_one_used(
    three: Path, harm: object, named: str
) -> None:
    before = {p.name: sorted(f.name for f in p.iterdir()) for p in checkpoints(three)}
    harm(three / "step-00000003")  # type: ignore[operator]
    found = find_resumable(three)
    assert found.path.name == "step-00000002"
    report = found.report()
    assert "step-00000003" in report and named in report, report
    assert "newest intact" in report
    # nothing was deleted: the damaged checkpoint stays for the user to look at
    assert [p.name for p in checkpoints(three)] == list(before)


def test_a_dangling_or_garbled_latest_falls_back(three: Path) -> None:
    (three / LATEST).write_text("step-00000009\n")
    found = find_resumable(three)
    assert found.path.name == "step-00000003"
    assert "LATEST names step-00000009, which does not exist" in found.report()
    (three / LATEST).unlink()
    assert find_resumable(three).path.name == "step-00000003"


def test_no_intact_checkpoint_names_each_one(three: Path) -> None:
    for path in checkpoints(three):
        _flip(path / TENSORS)
    with pytest.raises(CheckpointError) as info:
        find_resumable(three)
    text = str(info.value)
    assert text.startswith(f"--resume: no intact checkpoint in {three}")
    assert all(f"step-0000000{s}" in text for s in (1, 2, 3))
    with pytest.raises(CheckpointError, match="it holds none"):
        find_resumable(three / "nothing-here")


def test_keep_the_newest_n(tmp_path: Path) -> None:
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    with pytest.raises(ValueError, match="keep must be ≥ 1"):
        _save(tmp_path, 6, keep=0)


def test_stale_temporaries_are_removed(three: Path) -> None:
    (three / ".tmp-step-00000004-123").mkdir()
    (three / ".tmp-step-00000004-123" / TENSORS).write_bytes(b"half")
    (three / ".LATEST.123.tmp").write_text("step-")
    removed = remove_stale(three)
    assert sorted(p.name for p in removed) == [".LATEST.123.tmp", ".tmp-step-00000004-123"]
    assert sorted(p.name for p in three.iterdir()) == [
        LATEST,
        *(p.name for p in checkpoints(three)),
    ]


@pytest.mark.parametrize("fail_on", ["save_file", "write_text", "replace"])
def test_a_full_disk_mid_checkpoint_keeps_the_previous_one(
    three: Path, monkeypatch: pytest.MonkeyPatch, fail_on: str
) -> None:
    """ENOSPC at any write of a checkpoint: a clear error, LATEST and step 3 untouched."""
    before = {p.name: (p / TENSORS).read_bytes() for p in checkpoints(three)}

    def full(*_args: object, **_kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(three))

    if fail_on == "save_file":
        monkeypatch.setattr(checkpoint, "save_file", full)
    elif fail_on == "write_text":
        monkeypatch.setattr(Path, "write_text", full)
    else:
        monkeypatch.setattr(checkpoint.os, "replace", full)
    with pytest.raises(CheckpointError) as info:
        _save(three, 4)
    monkeypatch.undo()
    text = str(info.value)
    assert "step-00000004 failed: No space left on device" in text
    assert "step-00000003 is intact" in text
    assert {p.name: (p / TENSORS).read_bytes() for p in checkpoints(three)} == before
    assert (three / LATEST).read_text() == "step-00000003\n"
    assert not list(three.glob(".tmp-*"))
    assert find_resumable(three).path.name == "step-00000003"
