"""The buffers pass: on random graphs and random schedules no two values live at the same time
share a byte, every value fits in the arena, the arena is never below the lower bound, and an
in-place write takes exactly its dying input's buffer. On the example steps the arena is within
5% of the lower bound (the issue's bar): gpt2-tiny packs exactly; llama-tiny at batch 2 × 16
tokens lands at 1.041, where long-lived 8 KiB activations must stack above the gaps that the
forward's larger buffers leave (no order of the greedy packers does better; at batch 8 × 64 it
packs exactly, see `memfit plan`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compiler.ir import Graph, Node, Role, Value
from compiler.liveness import ALIGN, in_place, liveness, storage
from compiler.passes.buffers import STRATEGIES, plan_buffers
from compiler.passes.manager import PassContext
from compiler.passes.schedule import schedule
from compiler.passes.verify import verify
from compiler.plan import MemoryPlan
from tests.strategies import examples
from tests.test_schedule import shuffled, steps, traced_step


def plan_of(graph: Graph) -> MemoryPlan:
    ctx = PassContext()
    assert plan_buffers(graph, ctx) is graph  # the IR itself is unchanged
    assert ctx.plan is not None
    return ctx.plan


def assert_sound(plan: MemoryPlan) -> None:
    values = plan.values
    for v in values:
        assert v.offset % ALIGN == 0 and v.bytes <= v.size
        assert v.offset >= 0 and v.offset + v.size <= plan.arena_bytes
    shares = {(v.name, v.reuses) for v in values if v.reuses}
    for i, a in enumerate(values):
        for b in values[i + 1 :]:
            if a.start <= b.last and b.start <= a.last and a.size and b.size:
                apart = a.offset + a.size <= b.offset or b.offset + b.size <= a.offset
                assert apart, f"%{a.name} and %{b.name} overlap in time and in the arena"
    by_name = {v.name: v for v in values}
    for name, dying in shares:
        assert by_name[name].offset == by_name[dying].offset
        assert by_name[dying].end == by_name[name].start  # handed over at the writing node
    assert plan.arena_bytes >= plan.lower_bound


@given(steps(), st.data())
@examples(40)
def test_random_schedules_get_sound_plans(graph: Graph, data: st.DataObject) -> None:
    assert_sound(plan_of(shuffled(graph, data)))


@given(steps(), st.data())
@examples(20)
def test_every_strategy_alone_is_sound(graph: Graph, data: st.DataObject) -> None:
    graph = shuffled(graph, data)
    plan = plan_of(graph)
    size = np.array([v.size for v in plan.values], dtype=np.int64)
    start = np.array([v.start for v in plan.values], dtype=np.int64)
    end = np.array([v.last for v in plan.values], dtype=np.int64)
    for strategy in STRATEGIES.values():
        offset = strategy(size, start, end)
        for i in range(len(size)):
            for j in range(i + 1, len(size)):
                if start[i] <= end[j] and start[j] <= end[i] and size[i] and size[j]:
                    assert offset[i] + size[i] <= offset[j] or offset[j] + size[j] <= offset[i]


def test_in_place_needs_the_input_dying_here_with_the_same_shape() -> None:
    graph, _ = traced_step("gpt2-tiny")
    graph = schedule(graph, PassContext())
    facts = storage(graph)
    reuse = in_place(graph, facts, liveness(graph, facts=facts))
    assert reuse
    producer = {id(v): n for n in graph.nodes for v in n.outputs}
    for out_id, dying in reuse.items():
        node = producer[out_id]
        assert dying in facts.inputs[id(node)] and facts.owner[id(dying)] is dying
        assert (dying.shape, dying.dtype) == (node.outputs[0].shape, node.outputs[0].dtype)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_example_steps_pack_within_five_percent_of_the_lower_bound(name: str) -> None:
    graph, _ = traced_step(name)
    plan = plan_of(schedule(graph, PassContext()))
    assert_sound(plan)
    assert plan.arena_bytes <= 1.05 * plan.lower_bound


def test_a_scatter_never_overwrites_the_buffer_it_reads_from() -> None:
    x = Value("x", (4, 4), torch.float32, Role.INPUT)
    idx = Value("idx", (4, 4), torch.int64, Role.INPUT)
    a, b, out = (Value(n, (4, 4), torch.float32) for n in ("a", "b", "out"))
    row = Value("row", (4,), torch.float32)

    def reused(*nodes: Node) -> dict[int, Value]:
        graph = verify(Graph([x, idx], [Node("neg", (x,), {}, [a]), *nodes], [out]))
        facts = storage(graph)
        return in_place(graph, facts, liveness(graph, facts=facts))

    assert reused(Node("scatter.src", (a, 0, idx, x), {}, [out])) == {id(out): a}
    assert reused(Node("scatter.src", (a, 0, idx, a), {}, [out])) == {}
    view = Node("select.int", (a, 0, 0), {}, [row])
    assert reused(view, Node("select_scatter", (a, row, 0, 1), {}, [out])) == {}
    assert reused(Node("neg", (a,), {}, [b]), Node("add.Tensor", (b, b), {}, [out])) == {
        id(b): a,
        id(out): b,
    }
