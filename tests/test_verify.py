"""The verifier accepts every valid random graph and rejects each kind of broken one by name."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compiler.errors import VerifyError
from compiler.ir import Graph, Value
from compiler.passes.verify import verify
from tests.strategies import examples, graphs


@given(graphs())
@examples(60)
def test_accepts_valid_graphs(graph: Graph) -> None:
    assert verify(graph) is graph


@given(graphs(min_nodes=2), st.data())
@examples(60)
def test_rejects_dangling_input(graph: Graph, data: st.DataObject) -> None:
    node = data.draw(st.sampled_from([n for n in graph.nodes if n.inputs]))
    victim = data.draw(st.sampled_from(node.inputs))
    ghost = Value("ghost", victim.shape, victim.dtype)
    node.map_args(lambda v: ghost if v is victim else v)
    with pytest.raises(VerifyError, match=r"dangling input %ghost .*" + node.op):
        verify(graph)


@given(graphs(min_nodes=2), st.data())
@examples(60)
def test_rejects_use_before_def(graph: Graph, data: st.DataObject) -> None:
    producers = graph.producers()
    consumers = [
        (i, n) for i, n in enumerate(graph.nodes) if any(id(v) in producers for v in n.inputs)
    ]
    if not consumers:
        return
    i, node = data.draw(st.sampled_from(consumers))
    graph.nodes.insert(0, graph.nodes.pop(i))
    with pytest.raises(VerifyError, match=r"used before it is defined at node 0 .*" + node.op):
        verify(graph)


@given(graphs(), st.data())
@examples(60)
def test_rejects_shape_mismatch(graph: Graph, data: st.DataObject) -> None:
    node = data.draw(st.sampled_from(graph.nodes))
    out = node.outputs[0]
    out.shape = (*out.shape, 5)
    with pytest.raises(VerifyError, match=rf"shape mismatch: %{out.name} .* {node.op}"):
        verify(graph)


def test_rejects_read_after_in_place_write() -> None:
    from compiler.ir import Node, Phase, Role

    p = Value("w", (2,), torch.float32, Role.PARAM)
    new = Value("new", (2,), torch.float32)
    late = Value("late", (2,), torch.float32)
    graph = Graph(
        [p],
        [
            Node("neg", (p,), {}, [new]),
            Node("copy_", (p, new), {}, [], Phase.OPTIMIZER),
            Node("neg", (p,), {}, [late]),
        ],
        [late],
    )
    with pytest.raises(VerifyError, match=r"%w is read after its in-place write at node 2"):
        verify(graph)
