"""Checkpoints that a crash cannot corrupt: write to a temporary directory, fsync, rename.

A checkpoint is a directory `step-00000020/` holding `tensors.safetensors` (parameters,
optimizer states) and `state.json` (step, loader position, configuration); `LATEST` names the
newest complete one and is itself replaced atomically, so a reader never sees a half-written
checkpoint, and a kill at any instant leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

LATEST = "LATEST"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(
    directory: Path, step: int, tensors: dict[str, Tensor], state: dict[str, Any], keep: int = 3
) -> Path:
    """Write checkpoint `step` and point LATEST at it; keep the newest `keep` checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {k: t.detach().contiguous().cpu() for k, t in tensors.items()}, tmp / "tensors.safetensors"
    )
    with open(tmp / "state.json", "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
    for name in ("tensors.safetensors", "state.json"):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-written after a resume: move the old one aside, never delete first
        old = directory / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(directory)
    write_text_atomic(directory / LATEST, final.name + "\n")
    for stale in sorted(directory.glob("step-*"))[:-keep]:
        if stale != final:
            shutil.rmtree(stale)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = directory / LATEST
    if not pointer.exists():
        return None
    path = directory / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    with open(path / "state.json") as f:
        state = json.load(f)
    return load_file(path / "tensors.safetensors"), state
