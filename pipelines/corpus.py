"""The embedded default corpus: this interpreter's own standard-library sources.

It needs no network and ships nothing third-party in the repository, yet it is real text (code,
comments, docstrings) of a few MB: enough for a tiny model to learn from, small enough that
preparation takes seconds. Files are sorted, so one interpreter always yields the same corpus;
`commands.default_dataset` keys its cache on the file list and sizes to cover other interpreters.
"""

import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

DEFAULT_BUDGET_BYTES = 4 * 2**20

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
