"""The capacity benchmark's pure helpers: the batch bisection and eager's linear peak (no model
is traced or run here)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from benchmarks.bench_capacity import COLUMNS, LinearPeak, largest, trace_key


def counting(threshold: int) -> tuple[list[int], Callable[[int], bool]]:
    """A monotone fits (batch ≤ threshold) and the batches it was asked about."""
    asked: list[int] = []

    def fits(batch: int) -> bool:
        asked.append(batch)
        return batch <= threshold

    return asked, fits


@pytest.mark.parametrize("threshold", [0, 1, 2, 3, 7, 8, 9, 63, 64, 100])
def test_largest_finds_the_threshold(threshold: int) -> None:
    asked, fits = counting(threshold)
    assert largest(fits, limit=64) == min(threshold, 64)
    assert len(asked) == len(set(asked))  # no batch asked twice
    assert max(asked) <= 64  # never beyond the bound


@pytest.mark.parametrize(("threshold", "known"), [(40, 17), (17, 17), (5, 1), (64, 64)])
def test_largest_starts_from_a_known_fit(threshold: int, known: int) -> None:
    asked, fits = counting(threshold)
    assert largest(fits, limit=64, known=known) == min(threshold, 64)
    assert all(batch > known for batch in asked)


def test_largest_with_a_bound_below_one() -> None:
    assert largest(lambda batch: True, limit=0) == 0


def test_linear_peak_through_two_points() -> None:
    line = LinearPeak.through(1, 2.5e9, 2, 3.7e9)
    assert line.fixed == pytest.approx(1.3e9)
    assert line.per_sample == pytest.approx(1.2e9)
    assert line.at(3) == pytest.approx(4.9e9)
    assert line.largest(4 * 2**30) == 2  # (4.29e9 - 1.3e9) / 1.2e9 = 2.49
    assert line.largest(line.at(5)) == 5  # the cap exactly at a batch's peak fits it
    assert line.largest(1e9) == 0  # not even the fixed bytes fit


def test_linear_peak_rejects_degenerate_points() -> None:
    with pytest.raises(ValueError):
        LinearPeak.through(2, 1.0, 2, 2.0)
    with pytest.raises(ValueError):
        LinearPeak.through(1, 2.0, 2, 2.0).largest(10.0)


def test_columns_share_traces_by_optimizer() -> None:
    keys = {column.label: trace_key(column) for column in COLUMNS}
    assert keys["memfit default"] == keys["memfit budget"] == ()
    assert keys["memfit 8-bit"] != ()
