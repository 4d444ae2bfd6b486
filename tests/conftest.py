"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from tests.strategies import DEEP_EXAMPLES

# HYPOTHESIS_PROFILE=deep: ≥ 1000 examples for every property (see tests.strategies.examples)
settings.register_profile("deep", max_examples=DEEP_EXAMPLES, deadline=None)
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The eager backend runs many small ops: threads only fight over the 2 shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def passes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level corpus, no validation split: the compiler's own pass sources."""
    return _prepared(tmp_path_factory, ("compiler", "passes"), "*.py", val_fraction=0.0)


@pytest.fixture(scope="session")
def compiler_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level corpus with a validation split: the compiler's own sources."""
    return _prepared(tmp_path_factory, ("compiler",), "**/*.py", val_fraction=0.2)


def _prepared(
    factory: pytest.TempPathFactory, folder: tuple[str, ...], pattern: str, val_fraction: float
) -> Path:
    from pipelines.prepare import prepare

    root = Path(__file__).resolve().parents[1].joinpath(*folder)
    files = sorted(p for p in root.glob(pattern) if p.stat().st_size)
    out = factory.mktemp("data") / "prepared"
    prepare(files, out, "byte", val_fraction=val_fraction, progress=False)
    return out
