"""Prepared data checked before the first step: recorded sha256 and token ids in the vocabulary.

Opening a split always checks its size against the manifest (`TokenDataset.open`). Bytes
flipped in place keep the size, and a flipped id past the vocabulary reaches the embedding as
an out-of-range index, so a run also checks the file's sha256 and its largest id. Reading a
large file for every run would cost more than the check is worth, so a file that passed is
recorded in the cache with its size and mtime and not read again until either changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import DataError
from pipelines.loader import TokenDataset
from pipelines.manifest import SplitInfo

CACHE_NAME = "verified-data.json"


def verified_dataset(directory: Path, split: str, cache_dir: Path) -> TokenDataset:
    """`TokenDataset.open`, plus the sha256 and id checks (cached); DataError names the file."""
    dataset = TokenDataset.open(directory, split)
    assert dataset.manifest is not None
    info = dataset.manifest.splits[split]
    path = Path(directory) / info.file
    vocab = int(dataset.manifest.tokenizer.get("vocab_size", 0))
    stat = path.stat()
    key = str(path.resolve())
    seen = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": info.sha256}
    cache = _load(cache_dir / CACHE_NAME)
    entry = cache.get(key)
    if entry is None or {k: entry.get(k) for k in seen} != seen:
        _check_sha256(path, info)
        entry = {**seen, "max_id": int(dataset.tokens.numpy().max(initial=0))}
        cache[key] = entry
        _store(cache_dir / CACHE_NAME, cache)
    if vocab and entry["max_id"] >= vocab:
        where = int(np.argmax(dataset.tokens.numpy() >= vocab))
        raise DataError(
            f"{path}: token id {entry['max_id']} at position {where} is outside the"
            f" tokenizer's vocabulary of {vocab} ids (damaged file?); prepare the data again"
        )
    return dataset


def _check_sha256(path: Path, info: SplitInfo) -> None:
    with path.open("rb") as fh:
        if hashlib.file_digest(fh, "sha256").hexdigest() != info.sha256:
            raise DataError(
                f"{path}: sha256 differs from the one in manifest.json (damaged file);"
                " prepare the data again"
            )


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no cache, or a damaged one: verify again
    return data if isinstance(data, dict) else {}


def _store(path: Path, cache: dict[str, Any]) -> None:
    """Best effort: an unwritable cache only means the next run verifies again."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        live = {key: entry for key, entry in cache.items() if Path(key).exists()}
        tmp.write_text(json.dumps(live, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
