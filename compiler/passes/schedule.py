"""schedule: reorder nodes, within their dependencies, to lower the peak of live bytes.

The traced order runs every AdamW update after the whole backward, so every gradient, and each
update's new parameter and moments, is live at once. Here each optimizer node is ranked right
after the latest forward/backward node it needs (its gradient's producer, or the last read of
the parameter its copy_ must follow), so each update runs, and frees its gradient, as soon as
that gradient is complete. Optimizer nodes that need nothing computed (the weight-decay product
p·(1−lr·wd), the bias-correction scalars) sink to just before their first user. A list
scheduler walks the ranks and runs first any ready node that frees at least what it allocates,
when the step's peak so far leaves room for its outputs. Its order and the order the pass was
given are compared by their peak of live bytes (in-place writes counted): the pass never makes
the peak worse.

Only nodes with no dependency between them trade places, so results cannot change: data edges
come from the values, and a copy_ into persistent state stays after every read of that state
(or of a view of it) and before every later one.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from compiler import ops
from compiler.ir import Graph, Phase
from compiler.liveness import Storage, in_place, liveness, lower_bound, storage
from compiler.passes.manager import PassContext


def dependencies(graph: Graph, facts: Storage) -> list[set[int]]:
    """For each node index, the indices of the nodes that must run before it."""
    producer = {id(v): i for i, n in enumerate(graph.nodes) for v in n.outputs}
    written = {id(v) for n in graph.nodes for v in ops.written(n)}
    preds: list[set[int]] = [set() for _ in graph.nodes]
    last_write: dict[int, int] = {}
    reads: dict[int, list[int]] = {}
    for i, node in enumerate(graph.nodes):
        inputs = facts.inputs[id(node)]
        preds[i].update(producer[id(v)] for v in inputs if id(v) in producer)
        targets = {id(v) for v in ops.written(node)}
        for r in {id(facts.owner[id(v)]) for v in inputs} & written:
            if r in last_write:
                preds[i].add(last_write[r])
            if r in targets:
                preds[i].update(reads.pop(r, []))
                last_write[r] = i
            else:
                reads.setdefault(r, []).append(i)
        preds[i].discard(i)
    return preds


Rank = tuple[int, float]  # (anchor step, position among the nodes sharing it)


def ranks(graph: Graph, preds: list[set[int]], succs: list[list[int]]) -> list[Rank]:
    """Where each node belongs: its traced index; for an optimizer node, right after the latest
    anchored node it needs; a node that needs none floats down to just before its first user."""
    rank: list[Rank | None] = [None] * len(graph.nodes)
    for i, node in enumerate(graph.nodes):
        if node.phase is not Phase.OPTIMIZER:
            rank[i] = (i, i)
        elif anchors := [r[0] for p in preds[i] if (r := rank[p]) is not None]:
            rank[i] = (max(anchors), i)
    for i in reversed(range(len(rank))):
        if rank[i] is None:
            first = min((rank[s] for s in succs[i]), default=(i, i))  # type: ignore[type-var]
            rank[i] = (first[0], first[1] - 0.5)
    return rank  # type: ignore[return-value]


def list_schedule(
    graph: Graph,
    facts: Storage,
    preds: list[set[int]],
    succs: list[list[int]],
    rank: list[Rank],
) -> list[int]:
    """A topological order by rank, except that a ready node freeing at least the bytes it
    keeps runs first, if the peak so far has room for its outputs."""
    n = len(graph.nodes)
    size, pinned = facts.size, facts.pinned
    touches = [facts.reads[id(node)] for node in graph.nodes]
    readers: dict[int, list[int]] = {}
    for i, rs in enumerate(touches):
        for r in rs:
            readers.setdefault(r, []).append(i)
    remaining = {r: len(rs) + (r in pinned) for r, rs in readers.items()}
    new = [[id(v) for v in node.outputs if id(v) in size] for node in graph.nodes]
    born = [sum(size[r] for r in rs) for rs in new]
    kept = [sum(size[r] for r in rs if r in readers or r in pinned) for rs in new]
    freed = [sum(size[r] for r in rs if remaining[r] == 1) for rs in touches]

    waiting = [len(p) for p in preds]
    ordered: list[tuple[Rank, int]] = []
    freeing: list[tuple[Rank, int]] = []
    done = [False] * n

    def offer(i: int) -> None:
        heapq.heappush(ordered, (rank[i], i))
        if freed[i] >= kept[i]:
            heapq.heappush(freeing, (rank[i], i))

    for i in range(n):
        if not waiting[i]:
            offer(i)
    order: list[int] = []
    live = peak = 0
    for _ in range(n):
        while freeing and done[freeing[0][1]]:
            heapq.heappop(freeing)
        if freeing and live + born[freeing[0][1]] <= peak:
            i = heapq.heappop(freeing)[1]
        else:
            while done[ordered[0][1]]:
                heapq.heappop(ordered)
            i = heapq.heappop(ordered)[1]
        done[i] = True
        order.append(i)
        peak = max(peak, live + born[i])
        live += kept[i]
        for r in touches[i]:
            remaining[r] -= 1
            if remaining[r] == 0:
                live -= size[r]
            elif remaining[r] == 1 and r not in pinned:
                last = next(j for j in readers[r] if not done[j])
                freed[last] += size[r]
                if not waiting[last] and freed[last] >= kept[last]:
                    heapq.heappush(freeing, (rank[last], last))
        for s in succs[i]:
            waiting[s] -= 1
            if not waiting[s]:
                offer(s)
    return order


@dataclass(frozen=True)
class ScheduleReport:
    """The live-bytes peak (a lower bound, in-place writes counted) the pass compared."""

    peak_traced: int  # of the order the pass was given
    peak: int  # of the order it chose
    strategy: str  # which order won: "traced" or "list"


def schedule(graph: Graph, ctx: PassContext) -> Graph:
    """The order of lower peak, the traced one or the list scheduler's; `ctx.schedule` says."""
    facts = storage(graph)
    preds = dependencies(graph, facts)
    succs: list[list[int]] = [[] for _ in graph.nodes]
    for i, ps in enumerate(preds):
        for p in ps:
            succs[p].append(i)
    rank = ranks(graph, preds, succs)
    candidates = {
        "traced": list(range(len(graph.nodes))),
        "list": list_schedule(graph, facts, preds, succs, rank),
    }
    peaks = {}
    for name, order in candidates.items():
        trial = Graph(list(graph.inputs), [graph.nodes[i] for i in order], list(graph.outputs))
        reuse = in_place(trial, facts, liveness(trial, facts=facts))
        lifetimes = liveness(trial, reuse, facts)
        peaks[name] = (lower_bound(lifetimes, len(order))[0], trial)
    best = min(peaks, key=lambda k: peaks[k][0])
    ctx.schedule = ScheduleReport(peaks["traced"][0], peaks[best][0], best)
    return peaks[best][1]
