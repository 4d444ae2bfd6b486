"""accumulate: a scatter-add into zeros that is added to a dying tensor accumulates into it —
the same sum up to rounding, one weight-sized buffer less in the plan."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compiler.compile import CompileOptions, pass_manager
from compiler.ir import Graph, Node, Phase, Role, Value
from compiler.passes.accumulate import accumulate_into
from compiler.passes.buffers import plan_buffers
from compiler.passes.manager import PassContext
from compiler.passes.verify import verify
from runtime.arena import Arena
from runtime.eager import run_graph
from tests.strategies import examples

pytestmark = pytest.mark.usefixtures("one_thread")


def tied_backward(rows: int, dim: int, n: int, transposed: bool, read_later: bool) -> Graph:
    """head = neg(x) (maybe seen through two cancelling permutes); the embedding's backward
    scatters `vals` at `ids` into zeros; the two are added (and `head` maybe read again)."""
    x = Value("x", (rows, dim), torch.float32, Role.INPUT)
    ids = Value("ids", (n,), torch.int64, Role.INPUT)
    vals = Value("vals", (n, dim), torch.float32, Role.INPUT)
    head = Value("head", (rows, dim), torch.float32)
    nodes = [Node("neg", (x,), {}, [head], Phase.BACKWARD)]
    a = head
    if transposed:
        t = Value("t", (dim, rows), torch.float32)
        a = Value("tt", (rows, dim), torch.float32)
        nodes += [
            Node("permute", (head, [1, 0]), {}, [t], Phase.BACKWARD),
            Node("permute", (t, [1, 0]), {}, [a], Phase.BACKWARD),
        ]
    zeros = Value("zeros", (rows, dim), torch.float32)
    put = Value("put", (rows, dim), torch.float32)
    grad = Value("grad", (rows, dim), torch.float32, Role.GRAD)
    nodes += [
        Node("full", ([rows, dim], 0), {"dtype": torch.float32}, [zeros], Phase.BACKWARD),
        Node("index_put", (zeros, [ids], vals, True), {}, [put], Phase.BACKWARD),
        Node("add.Tensor", (a, put), {}, [grad], Phase.BACKWARD),
    ]
    outputs = [grad]
    if read_later:
        total = Value("total", (), torch.float32, Role.OUTPUT)
        nodes.append(Node("sum", (a,), {}, [total], Phase.BACKWARD))
        outputs.append(total)
    return verify(Graph([x, ids, vals], nodes, outputs))


@given(
    st.integers(1, 6),
    st.integers(1, 4),
    st.integers(1, 12),
    st.booleans(),
    st.booleans(),
    st.integers(0, 99),
)
@examples(30)
def test_the_scatter_accumulates_into_the_dying_tensor(
    rows: int, dim: int, n: int, transposed: bool, read_later: bool, seed: int
) -> None:
    graph = tied_backward(rows, dim, n, transposed, read_later)
    after = verify(accumulate_into(graph, PassContext()), after="accumulate")
    ops = [node.op for node in after.nodes]
    assert ("add.Tensor" in ops) == read_later and ("full" in ops) == read_later
    gen = torch.Generator().manual_seed(seed)
    feeds = {
        "x": torch.randn(rows, dim, generator=gen),
        "ids": torch.randint(0, rows, (n,), generator=gen),  # repeated ids accumulate
        "vals": torch.randn(n, dim, generator=gen),
    }
    expected = run_graph(graph, feeds)
    for got in (run_graph(after, feeds), _arena(after, feeds)):
        for e, g in zip(expected, got, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def _arena(graph: Graph, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    ctx = PassContext()
    planned = plan_buffers(graph, ctx)
    assert ctx.plan is not None
    return Arena(planned, ctx.plan)(planned, feeds)


def test_the_plan_holds_one_weight_sized_buffer_instead_of_three() -> None:
    graph = tied_backward(64, 32, 8, transposed=True, read_later=False)
    before, after = PassContext(), PassContext()
    plan_buffers(graph, before)
    plan_buffers(accumulate_into(graph, PassContext()), after)
    assert before.plan is not None and after.plan is not None
    weight = 64 * 32 * 4
    assert before.plan.arena_bytes >= 2 * weight and after.plan.arena_bytes == weight


def test_the_pass_is_opt_in() -> None:
    """It changes the fp32 summation order against eager PyTorch, so only when asked."""
    assert "accumulate" not in pass_manager().names
    assert "accumulate" in pass_manager(CompileOptions(accumulate_grads=True)).names
