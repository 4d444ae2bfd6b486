"""Liveness: views keep their base alive, the caller's values take no arena space, creation ops
read no bytes, outputs live to the end; and the lower bound is the true most-bytes-live."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from compiler.builder import GraphBuilder
from compiler.ir import Graph, Phase, Role
from compiler.liveness import ALIGN, liveness, lower_bound, padded, storage
from tests.strategies import examples
from tests.test_schedule import shuffled, steps

F32 = torch.float32


def test_views_extend_their_base_and_caller_values_stay_out() -> None:
    g = GraphBuilder()
    w, x = g.input("w", (4, 4), F32, Role.PARAM), g.input("x", (4, 4), F32, Role.INPUT)
    a = g.emit1("mul.Tensor", (x, x), name="a")  # 0
    t = g.emit1("t", (a,), name="t")  # 1: a view of a
    b = g.emit1("mm", (x, g.emit1("t", (w,), name="wt")), name="b")  # 2: a view of w; 3
    z = g.emit1("zeros_like", (a,), name="z")  # 4: reads a's shape only
    with g.at(Phase.BACKWARD):
        g.emit1("add.Tensor", (t, z), name="g", role=Role.GRAD)  # 5: last read of a, via t
    lives = {lt.value.name: lt for lt in liveness(g.graph([b]))}
    assert set(lives) == {"a", "b", "z", "g"}  # no views, no w, no x
    assert (lives["a"].start, lives["a"].end) == (0, 5)
    assert (lives["b"].start, lives["b"].end) == (3, 5)  # an output lives to the last step
    assert (lives["z"].start, lives["z"].end) == (4, 5)
    assert (lives["g"].start, lives["g"].end) == (5, 5)  # dead at birth, still needs bytes
    assert all(lt.size == padded(64) == ALIGN for lt in lives.values())
    assert lower_bound(list(lives.values()), 6) == (4 * ALIGN, 5)


def test_a_buffer_shows_the_most_telling_role_of_its_views() -> None:
    g = GraphBuilder()
    m = g.emit1("mul.Tensor", (g.input("x", (8,), F32, Role.INPUT), 2.0), name="m")
    s = g.emit1("view", (m, [2, 4]), name="s")
    grad = g.emit1("view", (s, [8]), name="grad", role=Role.GRAD)
    (only,) = liveness(g.graph([grad]))
    assert only.value is m and only.role is Role.GRAD and only.end == 2


@given(steps(), st.data())
@examples(30)
def test_lifetimes_match_a_brute_force_reading_of_the_schedule(
    graph: Graph, data: st.DataObject
) -> None:
    graph = shuffled(graph, data)
    facts = storage(graph)
    lives = liveness(graph, facts=facts)
    base = facts.owner
    for lt in lives:
        users = [
            i
            for i, n in enumerate(graph.nodes)
            if n.op not in ("zeros_like", "full_like")
            and any(base[id(v)] is lt.value for v in n.inputs)
        ]
        born = next(i for i, n in enumerate(graph.nodes) if lt.value in n.outputs)
        pinned = any(base[id(v)] is lt.value for v in graph.outputs)
        assert lt.start == born
        assert lt.end == (len(graph.nodes) - 1 if pinned else max([born, *users]))
    caller = {id(v) for v in graph.inputs}
    assert all(id(base[id(lt.value)]) not in caller for lt in lives)
    live = [
        sum(lt.size for lt in lives if lt.start <= i <= lt.last) for i in range(len(graph.nodes))
    ]
    assert lower_bound(lives, len(graph.nodes)) == (max(live), live.index(max(live)))
