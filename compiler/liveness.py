"""Liveness: when each buffer of a scheduled graph is born and dies, and how many bytes it holds.

The node list is the schedule: node i runs at step i. A buffer lives from the step that defines
it to the last step that reads it *or any view of it*: views (ops.Kind.VIEW) own no storage, so
their reads extend their base's life, transitively. The caller owns persistent state (params,
buffers, optimizer states) and the batch inputs (tokens, targets, lr, step): those and their
views take no arena space. Creation ops (`full_like(x, 0)`) read only their input's shape, which
the IR holds statically: that is no use of its bytes. Graph outputs live to the last step. A
value written in place over its dying input (`reuse`) continues that input's buffer.

Which buffer a value lives in does not depend on the order of the nodes, so `Storage` is worked
out once per graph and `liveness` only sweeps a schedule: the schedule pass compares several.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple, Protocol

import numpy as np

from compiler.ir import Graph, Node, Role, Value
from compiler.ops import Kind, kind, workspace_bytes

ALIGN = 64  # bytes; every buffer starts on a cache line (and stays valid for any dtype view)

# When a buffer and its views carry different roles, the plan shows the most telling one.
_PRECEDENCE = {r: k for k, r in enumerate((Role.OUTPUT, Role.GRAD, Role.ACTIVATION))}


def padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


@dataclass(frozen=True)
class Storage:
    """Schedule-independent facts: the buffer each value lives in and what each node reads."""

    owner: dict[int, Value]  # id(value) → the value owning its storage (a caller input for some)
    size: dict[int, int]  # id(owner) → padded bytes, for every owner in the arena
    role: dict[int, Role]  # id(owner) → the role the plan shows for its buffer
    inputs: dict[int, list[Value]]  # id(node) → its distinct inputs
    reads: dict[int, list[int]]  # id(node) → id(owner) of each arena buffer whose bytes it reads
    pinned: set[int]  # id(owner) of the buffers behind graph outputs


def storage(graph: Graph) -> Storage:
    owner = {id(v): v for v in graph.inputs}
    size: dict[int, int] = {}
    role: dict[int, Role] = {}
    inputs: dict[int, list[Value]] = {}
    reads: dict[int, list[int]] = {}
    for node in graph.nodes:
        ins = inputs[id(node)] = node.inputs
        view = kind(node.op) is Kind.VIEW
        for v in node.outputs:
            base = owner[id(v)] = owner[id(ins[0])] if view else v
            if base is v:
                size[id(v)], role[id(v)] = padded(v.nbytes), v.role
            elif id(base) in size and _PRECEDENCE.get(v.role, 9) < _PRECEDENCE.get(
                role[id(base)], 9
            ):
                role[id(base)] = v.role
        data = [] if kind(node.op) is Kind.CREATION else ins
        reads[id(node)] = list({id(owner[id(v)]): 0 for v in data if id(owner[id(v)]) in size})
    pinned = {id(owner[id(v)]) for v in graph.outputs}
    return Storage(owner, size, role, inputs, reads, pinned)


def scratch(graph: Graph) -> list[int]:
    """Bytes each step's kernel holds outside the arena besides its inputs and outputs.

    Only memfit's own ops say what they hold (a chunk of logits, a block of attention scores,
    one chunk of the optimizer update's new values); ATen's own scratch inside its kernels is
    small and not modelled.
    """
    return [workspace_bytes(n) for n in graph.nodes]


class Lifetime(NamedTuple):
    """One arena buffer's owner: live over steps start..end inclusive."""

    value: Value
    size: int  # bytes, padded to ALIGN
    start: int
    end: int
    role: Role
    reuses: Value | None = None  # the dying input whose buffer this value continues
    handed_over: bool = False  # its buffer continues in a later value from step `end` on

    @property
    def last(self) -> int:
        """The last step this value alone accounts for its buffer."""
        return self.end - 1 if self.handed_over else self.end


def liveness(
    graph: Graph, reuse: Mapping[int, Value] | None = None, facts: Storage | None = None
) -> list[Lifetime]:
    """The lifetime of every arena buffer, in order of definition.

    `reuse` maps id(output) → the input whose buffer it takes over (see passes/buffers.py);
    `facts` is `storage(graph)` for a graph with the same nodes in any order.
    """
    reuse = reuse or {}
    facts = facts or storage(graph)
    start: dict[int, int] = {}
    end: dict[int, int] = {}
    owners: list[Value] = []
    for i, node in enumerate(graph.nodes):
        for r in facts.reads[id(node)]:
            end[r] = i
        for v in node.outputs:
            if id(v) in facts.size:
                start[id(v)] = end[id(v)] = i
                owners.append(v)
    for r in facts.pinned:
        if r in end:
            end[r] = len(graph.nodes) - 1
    taken = {id(v) for v in reuse.values()}
    return [
        Lifetime(
            v,
            facts.size[id(v)],
            start[id(v)],
            end[id(v)],
            facts.role[id(v)],
            reuse.get(id(v)),
            id(v) in taken,
        )
        for v in owners
    ]


UPDATES_SELF = {
    "index_put",
    "index_add",
    "scatter.value",
    "scatter.src",
    "scatter_add",
    "slice_scatter",
    "select_scatter",
}


def in_place(graph: Graph, facts: Storage, lifetimes: list[Lifetime]) -> dict[int, Value]:
    """id(output) → the dying input whose buffer it takes over (`lifetimes`: without reuse).

    A pointwise op whose input dies at this node (the buffer itself, not a view of it, and no
    other input viewing it), with the output's shape and dtype, writes its output over that
    input — elementwise, each element is read before it is written. The scatter-like ops
    (index_put, scatter, slice_scatter, ...) take their `self` the same way: they copy `self`
    into the output and update it, so the copy vanishes. The schedule pass counts these
    writes when it compares orders; the buffers pass lays them out.
    """
    life = {id(lt.value): lt for lt in lifetimes}
    taken = set(facts.pinned)
    reuse: dict[int, Value] = {}
    for i, node in enumerate(graph.nodes):
        if len(node.outputs) != 1 or id(node.outputs[0]) not in life:
            continue
        out, inputs = node.outputs[0], facts.inputs[id(node)]
        if kind(node.op) is Kind.POINTWISE:  # elementwise: v may be read twice, not via views
            candidates = inputs
        elif node.op in UPDATES_SELF:  # v only as `self`: a scatter from v would read it late
            candidates = [node.args[0]]
            rest = Node(node.op, node.args[1:], node.kwargs, []).inputs
        else:
            continue
        for v in candidates:
            others = rest if node.op in UPDATES_SELF else [w for w in inputs if w is not v]
            lt = life.get(id(v))
            if (
                lt is not None
                and lt.end == i
                and id(v) not in taken
                and (v.shape, v.dtype) == (out.shape, out.dtype)
                and all(facts.owner[id(w)] is not v for w in others)
            ):
                reuse[id(out)] = v
                taken.add(id(v))  # handed over once
                break
    return reuse


class Interval(Protocol):
    """What the byte counts need: a Lifetime here, a PlannedValue in a plan."""

    @property
    def size(self) -> int: ...
    @property
    def start(self) -> int: ...
    @property
    def last(self) -> int: ...
    @property
    def role(self) -> Role: ...


def live_bytes(lifetimes: Sequence[Interval], steps: int) -> dict[Role, list[int]]:
    """Bytes live at each step, per role (a buffer handed over in place is counted once)."""
    delta: dict[Role, list[int]] = {}
    for lt in lifetimes:
        d = delta.setdefault(lt.role, [0] * (steps + 1))
        d[lt.start] += lt.size
        d[lt.last + 1] -= lt.size
    return {r: list(accumulate(d[:steps])) for r, d in delta.items()}


def live_total(lifetimes: Sequence[Interval], steps: int) -> np.ndarray:
    """Bytes live at each step, all roles together."""
    delta = np.zeros(steps + 1, dtype=np.int64)
    np.add.at(delta, [lt.start for lt in lifetimes], [lt.size for lt in lifetimes])
    np.add.at(delta, [lt.last + 1 for lt in lifetimes], [-lt.size for lt in lifetimes])
    return np.cumsum(delta[:steps])


def lower_bound(lifetimes: Sequence[Interval], steps: int) -> tuple[int, int]:
    """(max bytes simultaneously live, the first step where that peak is reached)."""
    totals = live_total(lifetimes, steps) if steps else np.zeros(1, dtype=np.int64)
    step = int(np.argmax(totals))
    return int(totals[step]), step
