"""The schedule pass: any order it returns is a valid order computing the same numbers, and on a
real training step it frees gradients early (the peak drops well below the traced order's).

`steps()` and `shuffled()` are shared with the liveness, buffers and arena tests: random graphs
grown into training-like steps (persistent parameters read through views, written by copy_),
and random valid schedules of them.
"""

from __future__ import annotations

from functools import cache

import networkx as nx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from compiler.builder import GraphBuilder
from compiler.ir import Graph, Phase, Role
from compiler.liveness import storage
from compiler.passes.manager import PassContext
from compiler.passes.noop_views import eliminate_noop_views
from compiler.passes.schedule import dependencies, schedule
from compiler.passes.verify import verify
from compiler.trace import trace
from examples import build_example
from examples.loss import lm_loss
from runtime.eager import run_graph
from runtime.program import initial_state
from tests.strategies import examples, graphs, random_inputs


@st.composite
def steps(draw: st.DrawFn) -> Graph:
    """A random graph whose first input is a parameter: read (maybe through views) by the
    graph, then updated from a value the graph computed, as an optimizer would."""
    graph = draw(graphs(min_nodes=2, max_nodes=20))
    param = graph.inputs[0]
    param.role = Role.PARAM
    produced = [v for n in graph.nodes for v in n.outputs if v.dtype.is_floating_point]
    grad = draw(st.sampled_from(produced))
    g = GraphBuilder.rewriting(graph)
    g.nodes, g.phase = graph.nodes, Phase.OPTIMIZER
    g.write(
        param, g.emit1("add.Tensor", (param, g.emit1("sum", (grad,), name="total")), name="new")
    )
    return verify(g.graph(graph.outputs))


def shuffled(graph: Graph, data: st.DataObject) -> Graph:
    """The same graph in a random order that keeps every dependency."""
    preds = dependencies(graph, storage(graph))
    waiting = [len(p) for p in preds]
    succs: list[list[int]] = [[] for _ in preds]
    for i, ps in enumerate(preds):
        for p in ps:
            succs[p].append(i)
    ready = [i for i, w in enumerate(waiting) if not w]
    order = []
    while ready:
        i = ready.pop(data.draw(st.integers(0, len(ready) - 1)))
        order.append(i)
        for s in succs[i]:
            waiting[s] -= 1
            if not waiting[s]:
                ready.append(s)
    return Graph(list(graph.inputs), [graph.nodes[i] for i in order], list(graph.outputs))


def run(graph: Graph, seed: int = 0) -> list[torch.Tensor]:
    """Outputs, then every input after the step (parameters are written in place)."""
    inputs = random_inputs(graph, seed)
    outputs = run_graph(graph, inputs)
    return [*outputs, *inputs.values()]


def assert_same_numbers(a: Graph, b: Graph) -> None:
    for x, y in zip(run(a), run(b), strict=True):
        assert torch.equal(x, y) or (x.isnan() == y.isnan()).all()


@given(steps(), st.data())
@examples(30)
def test_any_input_order_gives_a_valid_schedule_with_the_same_numbers(
    graph: Graph, data: st.DataObject
) -> None:
    before = shuffled(graph, data)
    after = schedule(before, PassContext())
    verify(after)
    assert sorted(map(id, after.nodes)) == sorted(map(id, before.nodes))
    position = {id(n): i for i, n in enumerate(after.nodes)}
    deps = nx.DiGraph()
    for i, ps in enumerate(dependencies(before, storage(before))):
        deps.add_edges_from((id(before.nodes[p]), id(before.nodes[i])) for p in ps)
    assert all(position[u] < position[v] for u, v in deps.edges)
    assert_same_numbers(graph, after)


@given(steps(), st.data())
@examples(25)
def test_the_update_waits_for_every_read_of_the_parameter_through_views(
    graph: Graph, data: st.DataObject
) -> None:
    after = schedule(shuffled(graph, data), PassContext())
    facts = storage(after)
    param = after.inputs[0]
    write = next(i for i, n in enumerate(after.nodes) if n.op == "copy_")
    reads = [
        i
        for i, n in enumerate(after.nodes)
        if i != write and any(facts.owner[id(v)] is param for v in facts.inputs[id(n)])
    ]
    assert all(i < write for i in reads)


@given(steps(), st.data())
@examples(25)
def test_never_worse_than_the_order_it_was_given(graph: Graph, data: st.DataObject) -> None:
    ctx = PassContext()
    schedule(shuffled(graph, data), ctx)
    assert ctx.schedule is not None and ctx.schedule.peak <= ctx.schedule.peak_traced


@cache
def traced_step(name: str, batch: int = 2, seq: int = 16) -> tuple[Graph, nn.Module]:
    """An example model's training step, as traced (no fused head), and the model."""
    torch.manual_seed(0)
    model = build_example(name).module
    tokens = torch.zeros(batch, seq, dtype=torch.int64)
    graph = eliminate_noop_views(trace(model, lm_loss, (tokens, tokens)), PassContext())
    return graph, model


def feeds(graph: Graph, model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fresh inputs for one step: the model's weights, zero moments, a random batch."""
    gen = torch.Generator().manual_seed(seed)
    tokens = next(v for v in graph.inputs if v.name == "tokens")
    batch = torch.randint(0, 256, (tokens.shape[0], tokens.shape[1] + 1), generator=gen)
    return initial_state(graph, model) | {
        "tokens": batch[:, :-1].contiguous(),
        "targets": batch[:, 1:].contiguous(),
        "lr": torch.tensor(1e-3, dtype=torch.float64),
        "step": torch.tensor(1.0, dtype=torch.float64),
    }


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_example_steps_update_each_parameter_right_after_its_gradient(name: str) -> None:
    graph, model = traced_step(name)
    ctx = PassContext()
    after = schedule(graph, ctx)
    assert ctx.schedule is not None and ctx.schedule.peak < 0.5 * ctx.schedule.peak_traced
    phases = [n.phase for n in after.nodes]
    last_backward = len(phases) - 1 - phases[::-1].index(Phase.BACKWARD)
    assert phases.index(Phase.OPTIMIZER) < last_backward  # updates interleave with the backward
    before_state, after_state = feeds(graph, model), feeds(graph, model)
    loss = run_graph(graph, before_state)[0]
    assert torch.equal(loss, run_graph(after, after_state)[0])
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
