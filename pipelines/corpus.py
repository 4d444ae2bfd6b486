"""The embedded default corpus: this interpreter's own standard-library sources.

It needs no network and ships nothing third-party in the repository, yet it is real text (code,
comments, docstrings) of a few MB: enough for a tiny model to learn from, small enough that
preparation takes seconds. Files are sorted, so one interpreter always yields the same corpus;
`default_dataset` prepares it once, keying its cache on the file list and sizes to cover other
interpreters.
"""

import fcntl
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from pipelines.manifest import FORMAT_VERSION, MANIFEST_NAME
from pipelines.prepare import prepare
from pipelines.tokenizer import ByteTokenizer

DEFAULT_BUDGET_BYTES = 4 * 2**20
# The embedded corpus has a few hundred documents: 5% gives a validation split of a dozen.
DEFAULT_CORPUS_VAL_FRACTION = 0.05

# Third-party packages are not the standard library; test suites hold deliberately broken files.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})


def embedded_corpus(budget_bytes: int = DEFAULT_BUDGET_BYTES) -> list[Path]:
    """Stdlib `.py` files in sorted relative-path order, stopping before `budget_bytes` is passed.

    Empty files and files that are not UTF-8 or contain NUL (the byte tokenizer's EOS) are
    skipped, so every chosen file is one valid document.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen: list[Path] = []
    total = 0
    for path in sorted(_py_files(root), key=lambda p: p.relative_to(root).as_posix()):
        size = path.stat().st_size
        if total + size > budget_bytes:
            break
        if size and _is_clean_text(path):
            chosen.append(path)
            total += size
    return chosen


def _py_files(root: Path) -> Iterator[Path]:
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIPPED_DIRS]
        yield from (Path(directory, name) for name in names if name.endswith(".py"))


def _is_clean_text(path: Path) -> bool:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\0" not in data


def default_dataset(cache_dir: Path, progress: bool = True) -> Path:
    """Prepare the embedded corpus with the byte tokenizer once, and return its directory.

    The cache key hashes the file list and sizes, so another interpreter gets its own entry; a
    file lock makes concurrent callers (e.g. every rank of a torchrun job) prepare it once.
    """
    files = embedded_corpus()
    identity = [
        FORMAT_VERSION,
        ByteTokenizer().to_json(),
        DEFAULT_CORPUS_VAL_FRACTION,
        [[str(path), path.stat().st_size] for path in files],
    ]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    out = Path(cache_dir) / f"stdlib-{key}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / MANIFEST_NAME).exists():
            # Under the lock, output without a manifest is a crashed attempt: replace it.
            prepare(
                files,
                out,
                "byte",
                val_fraction=DEFAULT_CORPUS_VAL_FRACTION,
                overwrite=True,
                progress=progress,
            )
    return out
