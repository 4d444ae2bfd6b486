"""fusion: which nodes run as one kernel, so that their intermediates never reach memory.

A group is a connected set of pointwise nodes plus any number of reductions (and row
gathers/scatters) over the last dim of one shape, in one phase, that the Triton emitter
(`compiler/codegen/`) can write as ONE kernel. Members are tagged with `Node.group` and
stay visible in the dump; the schedule is reordered only so that each group is contiguous.
Policy (kept simple): grow groups along producer→consumer edges between nodes of the same
domain (or a row group and its per-row scalars); merge groups of one domain that read the same
domain-sized value; then absorb small producers (per-row or scalar math, constants) whose every
reader is in one group. Never fuse across a matmul, a view
or an index op (they stay eager), never when it would make a cycle, never across phases.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import networkx as nx

from compiler.codegen.fusibility import (
    Fit,
    fusible,
    group_domain,
    natural_domain,
    row_shape,
    stored_values,
)
from compiler.ir import Graph, Node, Value
from compiler.passes.manager import PassContext

COMPILE_BACKENDS = ("eager", "triton")  # `fuse` groups nodes for triton only

# --- grouping ---------------------------------------------------------------------------------


class _Groups:
    """Union-find over node positions; each root keeps its members in schedule order."""

    def __init__(self, graph: Graph) -> None:
        self.nodes = graph.nodes
        self.pos = {id(n): i for i, n in enumerate(graph.nodes)}
        producers = graph.producers()
        self.producer = {k: self.pos[id(n)] for k, n in producers.items()}
        self.readers: list[list[int]] = [[] for _ in graph.nodes]
        for i, node in enumerate(graph.nodes):
            for v in node.inputs:
                if id(v) in self.producer:
                    self.readers[self.producer[id(v)]].append(i)
        self.outputs = {id(v) for v in graph.outputs}
        self.fit = [
            fusible(n) if group_domain([n], self.stored([i])) is not None else None
            for i, n in enumerate(graph.nodes)
        ]
        self.parent = list(range(len(graph.nodes)))
        self.members = {i: [i] for i, f in enumerate(self.fit) if f is not None}

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def domain(self, root: int) -> tuple[int, ...]:
        nodes = [self.nodes[i] for i in self.members[root]]
        return natural_domain(nodes, [n for n in nodes if fusible(n) is Fit.ROW])

    def has_rows(self, root: int) -> bool:
        return any(self.fit[i] is Fit.ROW for i in self.members[root])

    def stored(self, members: Iterable[int]) -> set[int]:
        inside = set(members)
        out: set[int] = set()
        for i in inside:
            for v in self.nodes[i].outputs:
                readers = [r for r in self.readers[i] if v in self.nodes[r].inputs]
                if id(v) in self.outputs or any(r not in inside for r in readers):
                    out.add(id(v))
        return out

    def legal(self, a: int, b: int) -> bool:
        """Whether groups a and b can become one kernel."""
        if self.nodes[a].phase != self.nodes[b].phase:
            return False
        merged = sorted(self.members[a] + self.members[b])
        nodes = [self.nodes[i] for i in merged]
        if group_domain(nodes, self.stored(merged)) is None:
            return False
        return not self._path_outside(set(merged))

    def _path_outside(self, merged: set[int]) -> bool:
        """Whether some node outside `merged` lies on a path between two of its members."""
        hi = max(merged)
        stack = [r for i in merged for r in self.readers[i] if r not in merged and r < hi]
        seen: set[int] = set()
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            for r in self.readers[i]:
                if r in merged:
                    return True
                if r < hi:
                    stack.append(r)
        return False

    def union(self, src: int, dst: int) -> None:
        """Move group `src` into group `dst` (which keeps its root)."""
        self.parent[src] = dst
        self.members[dst] = sorted(self.members[dst] + self.members.pop(src))


def _same_domain(groups: _Groups, a: int, b: int) -> bool:
    """Vertical fusion: equal domains, or a row group and a group of its per-row scalars."""
    da, db = groups.domain(a), groups.domain(b)
    if da == db:
        return True
    if groups.has_rows(a) and db == row_shape(da):
        return True
    return groups.has_rows(b) and da == row_shape(db)


def partition(graph: Graph) -> list[list[Node]]:
    """The fused groups of `graph`, each a list of nodes in schedule order."""
    groups = _Groups(graph)
    for i, node in enumerate(graph.nodes):
        if groups.fit[i] is None:
            continue
        for v in node.inputs:
            p = groups.producer.get(id(v))
            if p is None or groups.fit[p] is None:
                continue
            a, b = groups.find(p), groups.find(i)
            if a != b and _same_domain(groups, a, b) and groups.legal(a, b):
                groups.union(a, b)
    _fuse_siblings(groups)
    _absorb_producers(groups)
    return [
        [graph.nodes[i] for i in members]
        for members in sorted(groups.members.values())
        if any(groups.fit[i] is not Fit.CONSTANT for i in members)
    ]


def _fuse_siblings(groups: _Groups) -> None:
    """Merge groups of one domain that read the same domain-sized value, so it is loaded once
    (rotary's two halves, the two products of a gated MLP's backward)."""
    readers: dict[int, tuple[Value, list[int]]] = {}
    for i, node in enumerate(groups.nodes):
        if groups.fit[i] is not None:
            for v in node.inputs:
                readers.setdefault(id(v), (v, []))[1].append(i)
    for v, nodes in readers.values():
        if v.numel < 2:  # a shared scalar (lr, a bias correction) is no reason to fuse
            continue
        for i in nodes[1:]:
            a, b = groups.find(nodes[0]), groups.find(i)
            if a != b and groups.domain(a) == groups.domain(b) == v.shape and groups.legal(a, b):
                groups.union(b, a)


def _absorb_producers(groups: _Groups) -> None:
    """Merge each pointwise group whose every reader sits in one other group into that group:
    its values become internal (recomputed per lane where the domain is larger: cheap math)."""
    for root in sorted(groups.members, key=lambda r: groups.members[r][-1], reverse=True):
        if root not in groups.members or groups.has_rows(root):
            continue
        members = groups.members[root]
        if any(id(v) in groups.outputs for i in members for v in groups.nodes[i].outputs):
            continue
        readers = {r for i in members for r in groups.readers[i]} - set(members)
        targets = {groups.find(r) if groups.fit[r] is not None else -1 for r in readers}
        if len(targets) == 1 and (target := targets.pop()) >= 0 and groups.legal(root, target):
            groups.union(root, target)


def _contiguous_order(graph: Graph, groups: list[list[Node]]) -> list[Node]:
    """A topological order close to the current one in which every group is contiguous: the
    groups and the other nodes are units, taken by their first member's position."""
    grouped = {id(n) for members in groups for n in members}
    units = [*groups, *([n] for n in graph.nodes if id(n) not in grouped)]
    unit_of = {id(n): u for u, members in enumerate(units) for n in members}
    pos = {id(n): i for i, n in enumerate(graph.nodes)}
    producer = graph.producers()
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(units)))
    readers = graph.users()
    for n in graph.nodes:
        for v in n.inputs:
            if id(v) in producer:
                dag.add_edge(unit_of[id(producer[id(v)])], unit_of[id(n)])
        if n.op == "copy_":  # an in-place write comes after every read of its target
            for reader in readers.get(id(n.args[0]), []):
                dag.add_edge(unit_of[id(reader)], unit_of[id(n)])
    dag.remove_edges_from(list(nx.selfloop_edges(dag)))
    key = [min(pos[id(n)] for n in unit) for unit in units]
    try:
        order = nx.lexicographical_topological_sort(dag, key=key.__getitem__)
        return [n for u in order for n in units[u]]
    except nx.NetworkXUnfeasible:
        raise AssertionError("fusion made a cycle") from None


@dataclass(frozen=True)
class FusionOptions:
    """The backend the step is compiled for: fusion groups nodes only for `triton`."""

    backend: str = "eager"

    def __post_init__(self) -> None:
        if self.backend not in COMPILE_BACKENDS:
            choices = ", ".join(COMPILE_BACKENDS)
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {choices}")


def fuse(graph: Graph, ctx: PassContext, options: FusionOptions = FusionOptions()) -> Graph:
    """Tag every fused group's nodes with one group id and make each group contiguous.

    Only for the triton backend: the eager backend materialises every value, so grouping would
    only mislead the memory plan (see `internal_values`)."""
    if options.backend != "triton":
        return graph
    out = graph.copy()
    for node in out.nodes:
        node.group = None
    groups = partition(out)
    out.nodes = _contiguous_order(out, groups)
    ids = {id(n): g for g, members in enumerate(groups) for n in members}
    seen: dict[int, int] = {}
    for node in out.nodes:  # number groups in schedule order
        if id(node) in ids:
            node.group = seen.setdefault(ids[id(node)], len(seen))
    return out


def internal_values(graph: Graph) -> set[int]:
    """ids of values that never reach memory: made and read only inside one fused group.

    The memory planner gives them 0 bytes (valid for the triton backend, which keeps them in
    registers; the eager backend materialises every value)."""
    stored = {id(v) for values in stored_values(graph).values() for v in values}
    return {id(v) for n in graph.nodes if n.group is not None for v in n.outputs} - stored
