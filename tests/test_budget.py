"""Memory budgets: the planned peak fits a feasible budget, an infeasible one is a clear error,
and results stay bit-identical to no recomputation."""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.budget import Budget, BudgetError, compile_within, parse_size, sweep_budgets
from compiler.compile import CompileOptions, TracedStep, optimize, trace_model
from examples import build_example
from examples.loss import lm_loss
from runtime.program import Program

OPTIONS = CompileOptions(batch_size=4, seq_len=32, return_grads=True)


@cache
def traced() -> TracedStep:
    torch.manual_seed(0)
    return trace_model(build_example("gpt2-tiny"), lm_loss, OPTIONS)


@pytest.mark.parametrize(
    ("text", "budget"),
    [
        ("0.5", Budget(fraction=0.5)),
        ("1", Budget(fraction=1.0)),
        ("12GB", Budget(nbytes=12 * 10**9)),
        ("800MiB", Budget(nbytes=800 * 2**20)),
        ("123456", Budget(nbytes=123456)),
    ],
)
def test_budgets_parse(text: str, budget: Budget) -> None:
    assert Budget.parse(text) == budget


@pytest.mark.parametrize("text", ["lots", "1.5", "0", "-2GB", "0GB"])
def test_bad_budgets_are_named(text: str) -> None:
    with pytest.raises(BudgetError, match="--memory-budget"):
        Budget.parse(text)


def test_sizes_parse() -> None:
    assert parse_size("1.5kib", "--device-memory") == 1536


@cache
def peak_range() -> tuple[int, int]:
    """(lowest peak any policy reaches, the default pipeline's peak)."""
    floor = min(p.peak_bytes for p in sweep_budgets(traced(), OPTIONS, n_layers=2))
    default = optimize(traced(), OPTIONS).plan
    assert default is not None
    return floor, default.peak_bytes


@given(st.floats(0.1, 1.0))
@settings(max_examples=3, deadline=None)
def test_byte_budgets_hold_for_the_real_plan(frac: float) -> None:
    floor, default = peak_range()
    nbytes = int(floor + frac * (default - floor))
    step = compile_within(traced(), OPTIONS, Budget(nbytes=nbytes), n_layers=2)
    assert step.plan is not None and step.plan.peak_bytes <= nbytes


def test_checkpointings_peak_is_met_with_less_recompute() -> None:
    """At the peak of per-layer full checkpointing, the budget search pays less than it."""
    policy = {"checkpoint_layers": 2}
    checkpointing = optimize(traced(), replace(OPTIONS, recompute_policy=policy))
    assert checkpointing.plan is not None
    nbytes = checkpointing.plan.peak_bytes
    step = compile_within(traced(), OPTIONS, Budget(nbytes=nbytes), n_layers=2)
    assert step.plan is not None and step.plan.peak_bytes <= nbytes
    extra = [s.context.stats["recompute.extra_flops"] for s in (step, checkpointing)]
    assert extra[0] < extra[1], extra


def test_fraction_budget_saves_less_and_keeps_results() -> None:
    step = compile_within(traced(), OPTIONS, Budget(fraction=0.5))
    stats = step.context.stats
    assert stats["recompute.saved_bytes_after"] <= 0.5 * stats["recompute.saved_bytes_before"]
    assert step.plan is not None and step.plan.recompute["values"]
    model = build_example("gpt2-tiny")
    torch.manual_seed(0)
    reference = build_example("gpt2-tiny").module
    plain = optimize(traced(), CompileOptions(**{**OPTIONS.__dict__, "recompute": False}))
    x = torch.randint(0, 256, (4, 33))
    a = Program.from_module(step.graph, reference).step(x[:, :-1], x[:, 1:])
    b = Program.from_module(plain.graph, reference).step(x[:, :-1], x[:, 1:])
    del model
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)


def test_infeasible_budget_names_the_smallest_peak() -> None:
    with pytest.raises(BudgetError, match=r"smallest achievable step peak is .* largest single"):
        compile_within(traced(), OPTIONS, Budget(nbytes=2**20))
