"""buffers: give every arena buffer an offset in ONE arena, writing in place where legal
(`compiler.liveness.in_place`: a chain of such writes is one buffer).

Offsets: the schedule fixes each buffer's lifetime, so placing them is packing rectangles
(offset × time). Each buffer goes into the tightest gap that the buffers overlapping it in time
leave, taking buffers largest first (greedy by size) or those of the busiest steps first
(greedy by breadth); a third heuristic is best fit in time order, what an online allocator
would do. The lower bound is the most bytes live at one step, which no placement can beat: the
first strategy to reach it wins, else the smallest arena. The plan reports both numbers.
"""

from __future__ import annotations

import bisect

import numpy as np

from compiler.ir import Graph
from compiler.liveness import Lifetime, in_place, liveness, lower_bound, scratch, storage
from compiler.passes.manager import PassContext
from compiler.plan import MemoryPlan


def groups(lifetimes: list[Lifetime]) -> list[list[Lifetime]]:
    """Lifetimes sharing one buffer through in-place writes, in definition order."""
    index = {id(lt.value): k for k, lt in enumerate(lifetimes)}
    head = list(range(len(lifetimes)))
    for k, lt in enumerate(lifetimes):
        if lt.reuses is not None:
            head[k] = head[index[id(lt.reuses)]]
    out: dict[int, list[Lifetime]] = {}
    for k, lt in enumerate(lifetimes):
        out.setdefault(head[k], []).append(lt)
    return list(out.values())


def tightest_gap(
    order: list[int], size: np.ndarray, start: np.ndarray, end: np.ndarray
) -> np.ndarray:
    """Place buffers in `order`, each into the smallest gap between the buffers already placed
    that overlap it in time (or on top of them)."""
    offset = np.zeros(len(size), dtype=np.int64)
    # the placed buffers, in placement order: start, end, offset, top (offset + size)
    placed = np.zeros((4, len(size)), dtype=np.int64)
    for count, k in enumerate(order):
        first, last, lo, hi = placed[:, :count]
        near = np.flatnonzero((first <= end[k]) & (last >= start[k]))
        if len(near):
            near = near[np.argsort(lo[near], kind="stable")]
            lo, hi = lo[near], hi[near]
            floor = np.concatenate(([0], np.maximum.accumulate(hi)[:-1]))
            gap = lo - floor
            fits = np.flatnonzero(gap >= size[k])
            offset[k] = floor[fits[np.argmin(gap[fits])]] if len(fits) else hi.max()
        placed[:, count] = start[k], end[k], offset[k], offset[k] + size[k]
    return offset


def greedy_by_size(size: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Largest first, earliest first among equals."""
    return tightest_gap(
        sorted(range(len(size)), key=lambda k: (-size[k], start[k])), size, start, end
    )


def greedy_by_breadth(size: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Buffers of the busiest steps first (largest first within a step): the peak step's
    buffers get packed before anything can fragment the space under them."""
    delta = np.zeros(int(end.max(initial=0)) + 2, dtype=np.int64)
    np.add.at(delta, start, size)
    np.add.at(delta, end + 1, -size)
    live = np.cumsum(delta)
    breadth = [int(live[s : e + 1].max()) for s, e in zip(start, end, strict=True)]
    order = sorted(range(len(size)), key=lambda k: (-breadth[k], -size[k], start[k]))
    return tightest_gap(order, size, start, end)


def best_fit_in_time(size: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Sweep the steps: free what died, then give each new buffer the tightest free block."""
    offset = np.zeros(len(size), dtype=np.int64)
    free: list[tuple[int, int]] = []  # (offset, size) blocks below `top`, sorted by offset
    top = 0
    births = sorted(range(len(size)), key=lambda k: (start[k], -size[k]))
    deaths = sorted(range(len(size)), key=lambda k: end[k])
    d = 0
    for k in births:
        while d < len(deaths) and end[deaths[d]] < start[k]:
            j = deaths[d]
            top = _release(free, int(offset[j]), int(size[j]), top)
            d += 1
        fits = [(s, o) for o, s in free if s >= size[k]]
        if fits:
            s, o = min(fits)
            free.remove((o, s))
            if s > size[k]:
                bisect.insort(free, (o + int(size[k]), s - int(size[k])))
            offset[k] = o
        elif free and free[-1][0] + free[-1][1] == top:  # grow the topmost free block
            o, _ = free.pop()
            offset[k], top = o, o + int(size[k])
        else:
            offset[k], top = top, top + int(size[k])
    return offset


def _release(free: list[tuple[int, int]], o: int, s: int, top: int) -> int:
    """Return block (o, s) to the free list, merging neighbours; the arena top may drop."""
    i = bisect.bisect(free, (o, s))
    if i < len(free) and o + s == free[i][0]:
        s += free.pop(i)[1]
    if i > 0 and free[i - 1][0] + free[i - 1][1] == o:
        o, s = free[i - 1][0], free[i - 1][1] + s
        free.pop(i - 1)
        i -= 1
    if o + s == top:
        return o
    free.insert(i, (o, s))
    return top


STRATEGIES = {
    "greedy-by-size": greedy_by_size,
    "greedy-by-breadth": greedy_by_breadth,
    "best-fit-in-time": best_fit_in_time,
}


def assign_offsets(lifetimes: list[Lifetime], bound: int) -> tuple[dict[int, int], int, str]:
    """id(value) → offset for every lifetime, the arena size, and the strategy that won (the
    first to reach the lower bound `bound`, else the smallest)."""
    shared = groups(lifetimes)
    size = np.array([g[0].size for g in shared], dtype=np.int64)
    start = np.array([g[0].start for g in shared], dtype=np.int64)
    end = np.array([max(lt.end for lt in g) for g in shared], dtype=np.int64)
    best: tuple[int, str, np.ndarray] | None = None
    for name, strategy in STRATEGIES.items():
        offset = strategy(size, start, end)
        arena = int((offset + size).max()) if len(size) else 0
        if best is None or arena < best[0]:
            best = (arena, name, offset)
        if arena <= bound:
            break
    assert best is not None
    arena, name, offset = best
    offsets = {id(lt.value): int(offset[k]) for k, g in enumerate(shared) for lt in g}
    return offsets, arena, name


def plan_buffers(graph: Graph, ctx: PassContext) -> Graph:
    facts = storage(graph)
    lifetimes = liveness(graph, in_place(graph, facts, liveness(graph, facts=facts)), facts)
    bound, peak_step = lower_bound(lifetimes, len(graph.nodes))
    offsets, arena, strategy = assign_offsets(lifetimes, bound)
    ctx.plan = MemoryPlan.build(
        graph, lifetimes, offsets, arena, bound, peak_step, strategy, max(scratch(graph), default=0)
    )
    return graph
