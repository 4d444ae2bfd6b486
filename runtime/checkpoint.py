"""Checkpoints that a crash cannot corrupt and a resume can trust.

A checkpoint is a directory `step-00000020/` holding `tensors.safetensors` (parameters,
optimizer states), `state.json` (step, loader position, configuration) and `checksums.json`
(size and sha256 of the other two). All three are written and fsynced in a temporary
directory that is renamed into place, and `LATEST` names the newest one, itself replaced
atomically: a kill at any instant leaves the previous checkpoint intact, and a stale
temporary directory is all it leaves behind (removed by `remove_stale` at the next start).

Disks still flip bits and people still copy half a directory, so a resume verifies the
checksums and falls back to the newest intact checkpoint, naming every damaged one it skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from compiler.errors import MemfitError

LATEST = "LATEST"
TENSORS = "tensors.safetensors"
STATE = "state.json"
CHECKSUMS = "checksums.json"
STALE_PATTERNS = (".tmp-step-*", ".old-step-*", f".{LATEST}.*.tmp")


class CheckpointError(MemfitError):
    """No usable checkpoint, or one could not be written; names the directory and why."""


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


def _digest(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": sha}


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def checkpoints(directory: Path) -> list[Path]:
    """Every checkpoint directory in `directory`, oldest first (intact or not)."""
    found = [p for p in directory.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=_step_of)


def remove_stale(directory: Path) -> list[Path]:
    """Delete what crashed writes left behind (temporary directories and files); return them."""
    stale = [p for pattern in STALE_PATTERNS for p in directory.glob(pattern)]
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return stale


def save_checkpoint(
    directory: Path, step: int, tensors: dict[str, Tensor], state: dict[str, Any], keep: int = 3
) -> Path:
    """Write checkpoint `step` and point LATEST at it; keep the newest `keep` checkpoints.

    A failed write (disk full, read-only mount) removes its temporary directory and raises
    CheckpointError; the checkpoints already on disk and LATEST are left as they were.
    """
    if keep < 1:
        raise ValueError(f"keep must be ≥ 1, got {keep}")
    final = directory / f"step-{step:08d}"
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        cpu = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
        save_file(cpu, tmp / TENSORS)
        (tmp / STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
        sums = {name: _digest(tmp / name) for name in (TENSORS, STATE)}
        (tmp / CHECKSUMS).write_text(json.dumps({"files": sums}, indent=1, sort_keys=True))
        with open(tmp / CHECKSUMS, "rb") as f:
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
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(directory) if directory.is_dir() else None
        kept = f"{previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(
            f"writing checkpoint {final} failed: {e.strerror or e} ({e.filename or directory});"
            f" nothing was replaced and {kept}. Free space or fix the directory, then --resume"
        ) from e
    for stale in checkpoints(directory)[:-keep]:
        if stale != final:
            shutil.rmtree(stale)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint LATEST names, if it is there (not verified: see `find_resumable`)."""
    pointer = directory / LATEST
    try:
        name = pointer.read_text().strip()
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    path = directory / name
    return path if name.startswith("step-") and (path / STATE).exists() else None


def damage(path: Path) -> str | None:
    """Why checkpoint `path` cannot be trusted, or None when every checksum matches."""
    try:
        recorded = json.loads((path / CHECKSUMS).read_text())["files"]
        names = {n for n, v in recorded.items() if {"bytes", "sha256"} <= set(v)}
    except FileNotFoundError:
        return f"{path / CHECKSUMS} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{path / CHECKSUMS} is unreadable ({e!r})"
    for name in sorted(set(recorded) | {TENSORS, STATE}):
        file = path / name
        if name not in names:
            return f"{CHECKSUMS} does not cover {file}"
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            return f"{file} is missing"
        if size != recorded[name]["bytes"]:
            return f"{file} has {size} bytes, {recorded[name]['bytes']} were written (truncated?)"
        with open(file, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != recorded[name]["sha256"]:
                return f"{file}: sha256 differs from the one written (damaged bytes)"
    return None


@dataclass
class Resumable:
    """The checkpoint a resume starts from, and what was wrong with the newer ones."""

    path: Path
    skipped: list[str] = field(default_factory=list)  # one reason per damaged checkpoint

    def report(self) -> str:
        """A paragraph for the user: empty when LATEST itself was intact."""
        if not self.skipped:
            return ""
        return f"resuming from {self.path}, the newest intact checkpoint; skipped: " + "; ".join(
            self.skipped
        )


def find_resumable(directory: Path) -> Resumable:
    """The checkpoint LATEST names if intact; else the newest intact one, saying why.

    Raises CheckpointError when there is none (naming every damaged one).
    """
    skipped: list[str] = []
    pointer = directory / LATEST
    named: Path | None = None
    if pointer.exists():
        try:
            named = directory / pointer.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            skipped.append(f"{pointer} is unreadable ({e})")
        if named is not None and not named.is_dir():
            skipped.append(f"{pointer} names {named.name}, which does not exist")
            named = None
    order = checkpoints(directory) if directory.is_dir() else []
    if named is not None:  # LATEST first, then the others newest first
        order = [named] + [p for p in reversed(order) if p != named]
    else:
        order.reverse()
    for path in order:
        why = damage(path)
        if why is None:
            return Resumable(path, skipped)
        skipped.append(why)
    found = "; ".join(skipped) if skipped else "it holds none"
    raise CheckpointError(f"--resume: no intact checkpoint in {directory} ({found})")


def load_state(path: Path) -> dict[str, Any]:
    """state.json of checkpoint `path`: what a resume checks before loading any tensor."""
    try:
        return json.loads((path / STATE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e})") from e


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    state = load_state(path)
    try:
        return load_file(path / TENSORS), state
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e})") from e
