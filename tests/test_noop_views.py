"""noop_views removes identity views and keeps results and the verifier."""

from __future__ import annotations

import torch
from hypothesis import given

from compiler.builder import GraphBuilder
from compiler.ir import Graph, Role
from compiler.passes.manager import PassContext
from compiler.passes.noop_views import eliminate_noop_views
from compiler.passes.verify import verify
from runtime.eager import run_graph
from tests.strategies import examples, graphs, random_inputs


@given(graphs())
@examples(60)
def test_preserves_results(graph: Graph) -> None:
    inputs = random_inputs(graph)
    before = run_graph(graph, inputs)
    after_graph = verify(eliminate_noop_views(graph, PassContext()))
    for a, b in zip(before, run_graph(after_graph, inputs), strict=True):
        assert torch.equal(a, b)


def test_removes_identity_view_and_rewires() -> None:
    g = GraphBuilder()
    x = g.input("x", (2, 3), torch.float32, Role.INPUT)
    y = g.emit1("neg", (g.emit1("view", (x, [2, 3]), name="v"),), name="y", role=Role.OUTPUT)
    graph = g.graph([y])
    out = eliminate_noop_views(graph, PassContext())
    assert [n.op for n in out.nodes] == ["neg"] and out.nodes[0].args == (x,)
    assert [n.op for n in graph.nodes] == ["view", "neg"], "the input graph is left alone"
