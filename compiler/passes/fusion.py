"""fusion: which nodes run as one kernel, so that their intermediates never reach memory.

Two passes live here, both "fusion":

`linear_cross_entropy` rewrites the LM head — the output-projection matmul, log_softmax,
the target gather and their backward — into `memfit::linear_cross_entropy(_backward)`
(compiler/custom_ops.py), which never hold more than a chunk of logits: at 8×1024 tokens and a
50257 vocabulary the fp32 logits alone are 1.6 GB, several copies of them live at once in the
traced backward. The match is exact or nothing: any extra use of an intermediate (a logits
output, a bias) leaves the graph as it was.

`fusion` groups nodes: a group is a connected set of pointwise nodes plus any number of
reductions (and row gathers/scatters) over the last dim of one shape, in one phase, that
`compiler/codegen/triton.py` can emit as ONE kernel. Members are tagged with `Node.group` and
stay visible in the dump; the schedule is reordered only so that each group is contiguous.
Policy (kept simple): grow groups along producer→consumer edges between nodes of the same
domain (or a row group and its per-row scalars); merge groups of one domain that read the same
domain-sized value; then absorb small producers (per-row or scalar math, constants) whose every
reader is in one group. Never fuse across a matmul, a view
or an index op (they stay eager), never when it would make a cycle, never across phases.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass

from compiler import custom_ops
from compiler.codegen.triton import Fit, fusible, group_domain, row_shape, stored_values
from compiler.ir import Graph, Node, Phase, Value
from compiler.liveness import liveness
from compiler.passes.manager import PassContext
from compiler.trace import eliminate_dead_nodes, mark_activations

COMPILE_BACKENDS = ("eager", "triton")  # `fuse` groups nodes for triton only

# --- linear + cross-entropy -------------------------------------------------------------------

_VIEWS = ("view", "_unsafe_view")


@dataclass(frozen=True)
class LossHead:
    """The traced LM head, matched node by node (see `match_loss_heads`)."""

    logits_mm: Node
    gather: Node
    hidden: Value  # [M, K]
    weight: Value  # [V, K]
    index: Value  # [M, 1] int64: the gathered column of each row
    grad_index: Value  # [M, 1] int64: the backward's scatter index
    grad_coef: Value  # [M, 1]: the backward's per-row scale
    scatter_value: float
    grad_hidden_mm: Node
    grad_weight_mm: Node


class _Uses:
    """Producers and readers of every value, for matching."""

    def __init__(self, graph: Graph) -> None:
        self.producer = graph.producers()
        self.readers = graph.users()
        self.outputs = {id(v) for v in graph.outputs}

    def made_by(self, v: object, *ops: str) -> Node | None:
        node = self.producer.get(id(v)) if isinstance(v, Value) else None
        return node if node is not None and node.op in ops else None

    def only_reader(self, v: Value) -> Node | None:
        readers = self.readers.get(id(v), [])
        return readers[0] if len(readers) == 1 and id(v) not in self.outputs else None

    def readers_of(self, v: Value) -> list[Node] | None:
        """Readers of an intermediate, None if it is a graph output (then it must stay)."""
        return None if id(v) in self.outputs else self.readers.get(id(v), [])

    def view_source(self, v: Value) -> Value:
        """Follow single-use reshapes back to the value they view."""
        while (node := self.made_by(v, *_VIEWS)) and self.only_reader(node.args[0]) is node:
            v = node.args[0]
        return v

    def view_sink(self, v: Value) -> Value:
        """Follow single-use reshapes forward to the last one."""
        while (node := self.only_reader(v)) and node.op in _VIEWS:
            v = node.outputs[0]
        return v

    def transposed(self, v: Value) -> Value | None:
        """`w` when `v` is w.T (a 2-D permute or t), else None."""
        node = self.made_by(v, "permute", "t")
        if node is None or len(v.shape) != 2:
            return None
        return node.args[0] if node.op == "t" or list(node.args[1]) == [1, 0] else None


def _last_dim(dim: object, rank: int) -> bool:
    return isinstance(dim, int) and dim % rank == rank - 1


def _other(node: Node, v: Value) -> object:
    """The other operand of a binary node that reads `v`."""
    a, b = node.args[:2]
    return b if a is v else a


def match_loss_heads(graph: Graph) -> list[LossHead]:
    """Every mm → log_softmax → gather head whose backward is the traced nll/log_softmax one."""
    uses = _Uses(graph)
    return [h for n in graph.nodes if n.op == "_log_softmax" and (h := _match(n, uses))]


def _match(log_softmax: Node, uses: _Uses) -> LossHead | None:
    logits, dim, half_to_float = log_softmax.args
    if len(logits.shape) != 2 or not _last_dim(dim, 2) or half_to_float:
        return None
    rows, vocab = logits.shape
    mm = uses.made_by(uses.view_source(logits), "mm")
    if mm is None or uses.view_sink(mm.outputs[0]) is not logits:
        return None
    hidden, weight_t = mm.args
    weight = uses.transposed(weight_t)
    if weight is None or weight.shape != (vocab, hidden.shape[1]) or hidden.shape[0] != rows:
        return None
    log_probs = log_softmax.outputs[0]
    readers = uses.readers_of(log_probs) or []
    gathers = [n for n in readers if n.op == "gather"]
    exps = [n for n in readers if n.op == "exp"]
    templates = [n for n in readers if n.op in ("full_like", "zeros_like")]
    if len(gathers) != 1 or len(exps) != 1 or len(readers) != 2 + len(templates):
        return None
    gather = gathers[0]
    if gather.args[0] is not log_probs or not _last_dim(gather.args[1], 2) or gather.kwargs:
        return None
    # backward: sub(G, exp(log_probs) * sum(G, -1, keepdim)), G = scatter(0, index, s) * coef
    scale = uses.only_reader(exps[0].outputs[0])
    if scale is None or scale.op != "mul.Tensor":
        return None
    row_sum = uses.made_by(_other(scale, exps[0].outputs[0]), "sum.dim_IntList")
    if row_sum is None or list(row_sum.args[1]) not in ([1], [-1]) or not row_sum.args[2]:
        return None
    grad = row_sum.args[0]
    sub = uses.only_reader(scale.outputs[0])
    if sub is None or sub.op != "sub.Tensor" or sub.args[:2] != (grad, scale.outputs[0]):
        return None
    if sub.kwargs or {id(n) for n in uses.readers_of(grad) or []} != {id(row_sum), id(sub)}:
        return None
    coef_mul = uses.made_by(grad, "mul.Tensor")
    scatter = coef_mul and next(
        (s for a in coef_mul.args if (s := uses.made_by(a, "scatter.value"))), None
    )
    if scatter is None or uses.only_reader(scatter.outputs[0]) is not coef_mul:
        return None
    coef = _other(coef_mul, scatter.outputs[0])
    zeros = uses.made_by(scatter.args[0], "full_like", "zeros_like")
    filled_zero = zeros is not None and (zeros.op == "zeros_like" or zeros.args[1] == 0)
    if not filled_zero or not _last_dim(scatter.args[1], 2) or scatter.kwargs:
        return None
    if not isinstance(coef, Value) or coef.shape != (rows, 1):
        return None
    grad_logits = uses.view_sink(sub.outputs[0])
    if grad_logits.shape != (rows, vocab):
        return None
    grad_mms = _grad_mms(grad_logits, hidden, weight_t, uses)
    if grad_mms is None:
        return None
    return LossHead(
        mm,
        gather,
        hidden,
        weight,
        gather.args[2],
        scatter.args[2],
        coef,
        float(scatter.args[3]),
        *grad_mms,
    )


def _grad_mms(
    grad_logits: Value, hidden: Value, weight_t: Value, uses: _Uses
) -> tuple[Node, Node] | None:
    """mm(dlogits, (w.T).T) = d hidden and mm(dlogits.T, hidden) = d weight, its only readers."""
    readers = uses.readers_of(grad_logits) or []
    grad_hidden = next((n for n in readers if n.op == "mm" and n.args[0] is grad_logits), None)
    transpose = next((n for n in readers if n.op in ("permute", "t")), None)
    if grad_hidden is None or transpose is None or len(readers) != 2:
        return None
    if uses.transposed(grad_hidden.args[1]) is not weight_t:
        return None
    if uses.transposed(transpose.outputs[0]) is not grad_logits:
        return None
    grad_weight = uses.only_reader(transpose.outputs[0])
    if grad_weight is None or grad_weight.op != "mm" or grad_weight.args[1] is not hidden:
        return None
    return grad_hidden, grad_weight


def linear_cross_entropy(graph: Graph, ctx: PassContext) -> Graph:
    """Replace each matched LM head by the chunked fused ops; the rest of the graph is kept."""
    out = graph.copy()
    names = {v.name for v in out.values()}
    for head in match_loss_heads(out):
        _rewrite(out, head, names)
    eliminate_dead_nodes(out)
    mark_activations(out)
    return out


def _fresh(names: set[str], name: str) -> str:
    while name in names:
        name += "_"
    names.add(name)
    return name


def _rewrite(graph: Graph, head: LossHead, names: set[str]) -> None:
    rows, vocab = head.gather.outputs[0].shape[0], head.weight.shape[0]
    chunk = custom_ops.chunk_rows(rows, vocab, head.hidden.shape[1])
    forward = Node(
        custom_ops.FORWARD,
        (head.hidden, head.weight, head.index, chunk),
        {},
        [head.gather.outputs[0]],
        Phase.FORWARD,
        head.logits_mm.source,
    )
    coef = head.grad_coef
    grad = Value(_fresh(names, "linear_cross_entropy_grad"), coef.shape, coef.dtype)
    scale = Node("mul.Tensor", (coef, head.scatter_value), {}, [grad], Phase.BACKWARD)
    backward = Node(
        custom_ops.BACKWARD,
        (head.hidden, head.weight, head.grad_index, grad, chunk),
        {},
        [head.grad_hidden_mm.outputs[0], head.grad_weight_mm.outputs[0]],
        Phase.BACKWARD,
        head.logits_mm.source,
    )
    nodes: list[Node] = []
    for node in graph.nodes:
        if node is head.gather:
            nodes.append(forward)
        elif node is head.grad_hidden_mm or node is head.grad_weight_mm:
            if backward not in nodes:
                nodes += [scale, backward]
        else:
            nodes.append(node)
    graph.nodes = nodes


def loss_head_peak(graph: Graph) -> int:
    """Peak bytes the LM head adds on top of the rest of the step.

    Over the head's span — from the logits matmul (or the fused forward) to the last gradient
    matmul (or the fused backward) — the arena buffers born inside the span that are live at
    each step (`compiler.liveness`: a view's bytes are its base's), plus the fused ops' chunk
    workspace; the maximum over the span.
    """
    fused = [i for i, n in enumerate(graph.nodes) if n.op in custom_ops.OPS]
    if fused:
        start, end = fused[0], fused[-1]
    else:
        heads = match_loss_heads(graph)
        if not heads:
            raise ValueError("the graph has no LM head (mm → log_softmax → gather) to measure")
        index = {id(n): i for i, n in enumerate(graph.nodes)}
        start = index[id(heads[0].logits_mm)]
        end = max(index[id(heads[0].grad_hidden_mm)], index[id(heads[0].grad_weight_mm)])
    born = [lt for lt in liveness(graph) if start <= lt.start <= end]
    return max(
        sum(lt.size for lt in born if lt.start <= i <= lt.last)
        + (custom_ops.workspace_bytes(graph.nodes[i]) if graph.nodes[i].op in custom_ops.OPS else 0)
        for i in range(start, end + 1)
    )


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
        """The shape a group's kernel iterates over (see codegen.triton.group_domain)."""
        nodes = [self.nodes[i] for i in self.members[root]]
        rows = [n for n in nodes if fusible(n) is Fit.ROW]
        if rows:
            return rows[0].args[0].shape
        return max((v.shape for n in nodes for v in n.outputs), key=math.prod)

    def has_rows(self, root: int) -> bool:
        return any(self.fit[i] is Fit.ROW for i in self.members[root])

    def stored(self, members: Iterable[int]) -> set[int]:
        inside = set(members)
        out: set[int] = set()
        for i in inside:
            for v in self.nodes[i].outputs:
                readers = self.readers_of_value(v)
                if id(v) in self.outputs or any(r not in inside for r in readers):
                    out.add(id(v))
        return out

    def readers_of_value(self, v: Value) -> list[int]:
        producer = self.producer[id(v)]
        return [r for r in self.readers[producer] if v in self.nodes[r].inputs]

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
    """A topological order close to the current one in which every group is contiguous."""
    unit_of: dict[int, int] = {}
    units: list[list[Node]] = []
    for members in groups:
        for n in members:
            unit_of[id(n)] = len(units)
        units.append(members)
    for n in graph.nodes:
        if id(n) not in unit_of:
            unit_of[id(n)] = len(units)
            units.append([n])
    pos = {id(n): i for i, n in enumerate(graph.nodes)}
    producer = graph.producers()
    succ: list[set[int]] = [set() for _ in units]
    preds = [0] * len(units)

    def edge(a: int, b: int) -> None:
        if a != b and b not in succ[a]:
            succ[a].add(b)
            preds[b] += 1

    readers_of: dict[int, list[Node]] = {}
    for n in graph.nodes:
        for v in n.inputs:
            readers_of.setdefault(id(v), []).append(n)
            if id(v) in producer:
                edge(unit_of[id(producer[id(v)])], unit_of[id(n)])
    for n in graph.nodes:  # an in-place write comes after every read of its target
        if n.op == "copy_":
            for reader in readers_of.get(id(n.args[0]), []):
                edge(unit_of[id(reader)], unit_of[id(n)])
    key = [min(pos[id(n)] for n in unit) for unit in units]
    ready = [(key[u], u) for u in range(len(units)) if preds[u] == 0]
    heapq.heapify(ready)
    order: list[Node] = []
    while ready:
        _, u = heapq.heappop(ready)
        order += units[u]
        for s in succ[u]:
            preds[s] -= 1
            if preds[s] == 0:
                heapq.heappush(ready, (key[s], s))
    assert len(order) == len(graph.nodes), "fusion made a cycle"
    return order


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
