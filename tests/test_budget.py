"""Memory budgets: the planned peak fits a feasible budget, an infeasible one is a clear error,
and results stay bit-identical to no recomputation."""

from __future__ import annotations

from dataclasses import replace
from functools import cache, partial

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from compiler.budget import (
    Budget,
    BudgetError,
    Planner,
    compile_within,
    fewest_saved,
    fit_bytes,
    parse_size,
    sweep_budgets,
)
from compiler.compile import CompiledStep, CompileOptions, TracedStep, optimize, trace_model
from compiler.ir import Graph, dump, parse
from compiler.passes.buffers import plan_buffers
from compiler.passes.manager import PassContext, PassManager
from compiler.passes.recompute import RecomputePolicy, recompute_pass
from compiler.passes.schedule import schedule
from examples import build_example
from examples.loss import lm_loss
from runtime.eager import run_graph
from runtime.program import Program
from tests.strategies import examples, random_inputs
from tests.test_recompute import joint_graphs

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
@example(0.3125)  # between the searches' plans: only a swept fraction (0.35) fits it
@examples(3)
def test_byte_budgets_hold_for_the_real_plan(frac: float) -> None:
    floor, default = peak_range()
    nbytes = int(floor + frac * (default - floor))
    step = compile_within(traced(), OPTIONS, Budget(nbytes=nbytes), n_layers=2)
    assert step.plan is not None and step.plan.peak_bytes <= nbytes


def test_checkpointings_peak_is_met_with_less_recompute() -> None:
    """At the peak of per-layer full checkpointing, the budget search pays less than it."""
    policy = RecomputePolicy(checkpoint_layers=2)
    checkpointing = optimize(traced(), replace(OPTIONS, recompute=policy))
    assert checkpointing.plan is not None
    nbytes = checkpointing.plan.peak_bytes
    step = compile_within(traced(), OPTIONS, Budget(nbytes=nbytes), n_layers=2)
    assert step.plan is not None and step.plan.peak_bytes <= nbytes
    ours, theirs = step.context.recompute, checkpointing.context.recompute
    assert ours and theirs and ours.extra_flops < theirs.extra_flops, (ours, theirs)


def test_fraction_budget_saves_less_and_keeps_results() -> None:
    step = compile_within(traced(), OPTIONS, Budget(fraction=0.5))
    report = step.context.recompute
    assert report is not None and report.saved_bytes_after <= 0.5 * report.saved_bytes_before
    assert step.plan is not None and step.plan.recompute["values"]
    model = build_example("gpt2-tiny")
    torch.manual_seed(0)
    reference = build_example("gpt2-tiny").module
    plain = optimize(traced(), replace(OPTIONS, recompute=None))
    x = torch.randint(0, 256, (4, 33))
    a = Program.from_module(step.graph, reference).step(x[:, :-1], x[:, 1:])
    b = Program.from_module(plain.graph, reference).step(x[:, :-1], x[:, 1:])
    del model
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)


def test_infeasible_budget_names_the_smallest_peak() -> None:
    with pytest.raises(BudgetError, match=r"smallest achievable step peak is .* largest single"):
        compile_within(traced(), OPTIONS, Budget(nbytes=2**20))


def planner(graph: Graph) -> Planner:
    """Recompute, schedule and plan a fresh copy of `graph` under a recompute policy."""

    def plan(policy: RecomputePolicy) -> CompiledStep:
        ctx = PassContext()
        passes = [
            ("recompute", partial(recompute_pass, policy=policy)),
            ("schedule", schedule),
            ("buffers", plan_buffers),
        ]
        out = PassManager(passes).run(parse(dump(graph)), ctx)
        return CompiledStep(out, ctx, 0, 0, ctx.plan)

    return plan


@given(joint_graphs(), st.floats(0, 1))
@examples(30)
def test_random_graphs_fit_feasible_byte_budgets_bit_identically(graph: Graph, frac: float) -> None:
    """Feasible: at least the peak of the min-cut or of the fewest saved bytes, the two ends
    of the program's search. The plan found fits the budget and runs bit for bit like the
    graph without recomputation; one byte fits nothing."""
    plan = planner(graph)
    ends = [
        p.plan.peak_bytes
        for p in (plan(RecomputePolicy()), fewest_saved(plan))
        if p.plan is not None
    ]
    nbytes = int(min(ends) + frac * (max(ends) - min(ends)))
    step = fit_bytes(plan, nbytes)
    assert step is not None and step.plan is not None and step.plan.peak_bytes <= nbytes
    inputs = random_inputs(graph)
    expected = run_graph(graph, {k: t.clone() for k, t in inputs.items()})
    for a, b in zip(expected, run_graph(step.graph, inputs), strict=True):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all()
    assert fit_bytes(plan, 1) is None
