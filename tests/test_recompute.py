"""recompute: results are bit-identical, budgets hold when feasible and raise when not."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compiler.ir import Graph, Phase
from compiler.ops import flops
from compiler.passes.manager import PassContext
from compiler.passes.noop_views import eliminate_noop_views
from compiler.passes.recompute import (
    Boundary,
    InfeasibleBudgetError,
    RecomputePolicy,
    budget_floor,
    layer_checkpoint_saved,
    recompute_pass,
    rewrite,
)
from compiler.passes.verify import verify
from compiler.trace import trace
from examples import build_example
from examples.loss import lm_loss
from runtime.eager import run_graph
from runtime.program import Program
from tests.strategies import examples, graphs, random_inputs


@st.composite
def joint_graphs(draw: st.DrawFn) -> Graph:
    """A random graph whose last nodes play the backward: they read forward values."""
    graph = draw(graphs(min_nodes=3, max_nodes=20))
    split = draw(st.integers(1, len(graph.nodes) - 1))
    for node in graph.nodes[split:]:
        node.phase = Phase.BACKWARD
    return graph


def _same(a: Graph, b: Graph) -> None:
    inputs = random_inputs(a)
    for x, y in zip(run_graph(a, inputs), run_graph(b, inputs), strict=True):
        assert torch.equal(x, y)


@given(joint_graphs())
@examples(50)
def test_min_cut_keeps_results_bit_identical(graph: Graph) -> None:
    out = verify(recompute_pass(graph, PassContext()))
    _same(graph, out)


@given(joint_graphs(), st.floats(0, 1))
@examples(50)
def test_feasible_budget_holds_and_infeasible_raises(graph: Graph, frac: float) -> None:
    boundary = Boundary.of(graph)
    floor = boundary.saved_bytes(budget_floor(boundary))
    full = boundary.saved_bytes(boundary.needed)
    budget = int(floor + frac * (full - floor))
    ctx = PassContext()
    out = verify(recompute_pass(graph, ctx, RecomputePolicy(activation_budget=budget)))
    assert ctx.recompute is None or ctx.recompute.saved_bytes_after <= budget
    _same(graph, out)
    if floor > 0:
        with pytest.raises(InfeasibleBudgetError, match="smallest achievable is"):
            recompute_pass(graph, PassContext(), RecomputePolicy(activation_budget=floor - 1))


@pytest.fixture(scope="module")
def gpt2_step() -> tuple[Graph, object, torch.Tensor]:
    torch.manual_seed(0)
    model = build_example("gpt2-tiny").module
    x = torch.randint(0, 256, (2, 16))
    graph = trace(model, lm_loss, (x, x.roll(1, 1)), return_grads=True)
    return eliminate_noop_views(graph, PassContext()), model, x


def _run(graph: Graph, model: object, x: torch.Tensor) -> list[torch.Tensor]:
    return Program.from_module(graph, model).step(x, x.roll(1, 1))  # type: ignore[arg-type]


@pytest.mark.parametrize("fraction", [None, 0.5, 0.2])
def test_example_model_is_bit_identical_and_saves_less(gpt2_step, fraction) -> None:  # type: ignore[no-untyped-def]
    graph, model, x = gpt2_step
    boundary = Boundary.of(graph)
    before = boundary.saved_bytes(boundary.needed)
    budget = None if fraction is None else int(fraction * before)
    ctx = PassContext()
    out = verify(recompute_pass(graph, ctx, RecomputePolicy(activation_budget=budget)))
    assert ctx.recompute is not None and ctx.recompute.saved_bytes_after < before
    if fraction is not None:
        assert ctx.recompute.saved_bytes_after <= fraction * before
    assert ctx.recompute.extra_flops < 0.25 * ctx.recompute.step_flops
    for a, b in zip(_run(graph, model, x), _run(out, model, x), strict=True):
        assert torch.equal(a, b)


def test_layer_checkpointing_keeps_block_inputs(gpt2_step) -> None:  # type: ignore[no-untyped-def]
    graph, model, x = gpt2_step
    boundary = Boundary.of(graph)
    tokens = next(v for v in graph.inputs if v.name == "tokens")
    saved = layer_checkpoint_saved(boundary, tokens, n_layers=2)
    block_inputs = [v for v in saved if v.shape == (2, 16, 64)]
    assert len(block_inputs) == 3  # two block inputs and the last block's output
    out, clones = rewrite(graph, saved)
    assert any(n.op in ("mm", "addmm") for n in clones), "full checkpointing recomputes matmuls"
    for a, b in zip(_run(graph, model, x), _run(out, model, x), strict=True):
        assert torch.equal(a, b)


def test_checkpointing_the_first_block_only_recomputes_less(gpt2_step) -> None:  # type: ignore[no-untyped-def]
    """The last block saves like the head: fewer clones than checkpointing both, same results."""
    graph, model, x = gpt2_step
    boundary = Boundary.of(graph)
    tokens = next(v for v in graph.inputs if v.name == "tokens")
    _, both = rewrite(graph, layer_checkpoint_saved(boundary, tokens, n_layers=2))
    out, first = rewrite(graph, layer_checkpoint_saved(boundary, tokens, 2, checkpointed=1))
    assert any(n.op in ("mm", "addmm") for n in first)
    assert sum(map(flops, first)) < sum(map(flops, both))
    for a, b in zip(_run(graph, model, x), _run(out, model, x), strict=True):
        assert torch.equal(a, b)
