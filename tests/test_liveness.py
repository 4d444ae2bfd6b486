"""Liveness: views keep their base alive, the caller's values take no arena space, creation ops
read no bytes, outputs live to the end; and the lower bound is the true most-bytes-live."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from compiler.ir import Graph, Node, Phase, Role, Value
from compiler.liveness import ALIGN, liveness, lower_bound, padded, storage
from tests.strategies import examples
from tests.test_schedule import shuffled, steps

F32 = torch.float32


def value(name: str, shape: tuple[int, ...], role: Role = Role.TEMPORARY) -> Value:
    return Value(name, shape, F32, role)


def test_views_extend_their_base_and_caller_values_stay_out() -> None:
    w, x = value("w", (4, 4), Role.PARAM), value("x", (4, 4), Role.INPUT)
    a, t, wt = value("a", (4, 4)), value("t", (4, 4)), value("wt", (4, 4))
    b, z, g = value("b", (4, 4)), value("z", (4, 4)), value("g", (4, 4), Role.GRAD)
    graph = Graph(
        [w, x],
        [
            Node("mul.Tensor", (x, x), {}, [a]),  # 0
            Node("t", (a,), {}, [t]),  # 1: a view of a
            Node("t", (w,), {}, [wt]),  # 2: a view of the parameter
            Node("mm", (x, wt), {}, [b]),  # 3
            Node("zeros_like", (a,), {}, [z]),  # 4: reads a's shape only
            Node("add.Tensor", (t, z), {}, [g], Phase.BACKWARD),  # 5: last read of a, via t
        ],
        [b],
    )
    lives = {lt.value.name: lt for lt in liveness(graph)}
    assert set(lives) == {"a", "b", "z", "g"}  # no views, no w, no x
    assert (lives["a"].start, lives["a"].end) == (0, 5)
    assert (lives["b"].start, lives["b"].end) == (3, 5)  # an output lives to the last step
    assert (lives["z"].start, lives["z"].end) == (4, 5)
    assert (lives["g"].start, lives["g"].end) == (5, 5)  # dead at birth, still needs bytes
    assert all(lt.size == padded(64) == ALIGN for lt in lives.values())
    assert lower_bound(list(lives.values()), 6) == (4 * ALIGN, 5)


def test_a_buffer_shows_the_most_telling_role_of_its_views() -> None:
    x, s = value("x", (8,), Role.INPUT), value("s", (2, 4))
    grad = value("grad", (8,), Role.GRAD)
    graph = Graph(
        [x],
        [Node("mul.Tensor", (x, 2.0), {}, [value("m", (8,))])],
        [],
    )
    m = graph.nodes[0].outputs[0]
    graph.nodes += [
        Node("view", (m, [2, 4]), {}, [s]),
        Node("view", (s, [8]), {}, [grad]),
    ]
    graph.outputs = [grad]
    (only,) = liveness(graph)
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
