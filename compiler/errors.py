"""Errors a user can act on: each says what is wrong and where (op, node, source line)."""

from __future__ import annotations

import traceback
from pathlib import Path


class MemfitError(Exception):
    """Base of every error the CLI reports as one paragraph (no traceback unless --debug)."""


class TraceError(MemfitError):
    """The model could not be traced into a static graph."""


class UnsupportedOpError(TraceError):
    """The traced graph uses an op outside memfit's closed op set."""


class VerifyError(MemfitError):
    """A graph breaks an IR invariant; names the node (and the pass that produced it)."""


def user_frame(exc: BaseException) -> str:
    """`file:line` of the innermost frame outside torch and memfit: where the model's code broke.

    Installed libraries count as the model's code: a Hugging Face model breaks in its
    `modeling_*.py`, and that line (not the user's one-line factory) is what to fix or report.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if not is_library(frame.filename):
            return f"{short_path(frame.filename)}:{frame.lineno}"
    return ""


def short_path(filename: str) -> str:
    path = Path(filename)
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def is_library(filename: str) -> bool:
    """torch's and memfit's own frames: never the place a model's trace broke."""
    parts = Path(filename).parts
    return (
        "torch" in parts
        or any(p in ("compiler", "runtime") for p in parts[-3:-1])
        or filename.startswith("<")
    )
