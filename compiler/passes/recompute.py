"""recompute: decide which forward values the backward keeps and which it recomputes.

The traced joint graph saves every forward value the backward reads. This pass chooses a set
of *saved* values; every other forward value the backward needs is recomputed from saved
values and graph inputs by clones of its forward nodes, inserted right before their first
backward use. Views are never saved (recomputing one is free; its base is what costs bytes).

- Without a budget: a min-cut (networkx) whose capacities are bytes picks the cheapest set of
  values to keep, recomputing only cheap ops (pointwise, views, reductions, copies, creation):
  never a matmul or a gather.
- With an activation budget (bytes of saved values, `RecomputePolicy`): a 0/1 program (scipy's
  HiGHS) picks saved values and recomputed nodes minimising recomputed FLOPs subject to the
  bytes saved; matmuls become recomputable too, so the budget can go below what cheap ops alone
  reach.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import networkx as nx
import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from compiler.builder import GraphBuilder
from compiler.errors import MemfitError
from compiler.ir import Graph, Node, Phase, Value
from compiler.ops import Kind, flops, kind
from compiler.passes.manager import PassContext
from compiler.trace import mark_activations

CHEAP = {Kind.POINTWISE, Kind.VIEW, Kind.REDUCTION, Kind.CREATION, Kind.COPY}
ANY_FORWARD = CHEAP | {Kind.MATMUL, Kind.INDEX}


class InfeasibleBudgetError(MemfitError):
    """No choice of saved values fits the budget; `smallest` is the fewest saved bytes."""

    def __init__(self, message: str, smallest: int) -> None:
        super().__init__(message)
        self.smallest = smallest


@dataclass(frozen=True)
class Boundary:
    """The forward/backward boundary of a joint graph, as the decisions see it."""

    forward: list[Node]  # forward nodes in schedule order
    producer: dict[int, Node]  # id(forward value) → its forward node
    needed: list[Value]  # forward values read by the backward, in first-use order

    @classmethod
    def of(cls, graph: Graph) -> Boundary:
        forward = [n for n in graph.nodes if n.phase is Phase.FORWARD]
        producer = {id(v): n for n in forward for v in n.outputs}
        needed: dict[int, Value] = {}
        for node in graph.nodes:
            if node.phase is Phase.BACKWARD:
                for v in node.inputs:
                    if id(v) in producer:
                        needed.setdefault(id(v), v)
        return cls(forward, producer, list(needed.values()))

    def forward_inputs(self, node: Node) -> list[Value]:
        """The node's inputs that forward nodes produce (graph inputs are always available)."""
        return [u for u in node.inputs if id(u) in self.producer]

    def saved_bytes(self, saved: Iterable[Value]) -> int:
        """Bytes of the storage the saved values keep alive (a view keeps its base)."""
        bases: dict[int, Value] = {}
        for v in saved:
            while id(v) in self.producer and kind(self.producer[id(v)].op) is Kind.VIEW:
                v = self.producer[id(v)].inputs[0]
            if id(v) in self.producer:  # a view of a graph input keeps nothing new
                bases[id(v)] = v
        return sum(v.nbytes for v in bases.values())


def _saveable(v: Value, boundary: Boundary) -> bool:
    return kind(boundary.producer[id(v)].op) is not Kind.VIEW


def min_cut_saved(boundary: Boundary, recomputable: set[Kind] = CHEAP) -> list[Value]:
    """The fewest bytes to keep such that everything else needed is cheap to recompute."""
    net = nx.DiGraph()
    for node in boundary.forward:
        for v in node.outputs:
            if _saveable(v, boundary):
                net.add_edge(("in", id(v)), ("out", id(v)), capacity=v.nbytes)
            else:
                net.add_edge(("in", id(v)), ("out", id(v)))
            if kind(node.op) not in recomputable:
                net.add_edge("source", ("in", id(v)))
            for u in boundary.forward_inputs(node):
                net.add_edge(("out", id(u)), ("in", id(v)))
    for v in boundary.needed:
        net.add_edge(("out", id(v)), "sink")
    if "source" not in net:  # everything is recomputable from graph inputs
        return []
    _, (reachable, _) = nx.minimum_cut(net, "source", "sink")
    values = {id(v): v for n in boundary.forward for v in n.outputs}
    return [values[i] for i in values if ("in", i) in reachable and ("out", i) not in reachable]


def budget_saved(
    boundary: Boundary, activation_budget: int, recomputable: set[Kind] = ANY_FORWARD
) -> list[Value]:
    """Saved values of least recompute FLOPs whose bytes fit `activation_budget` (0/1 program).

    Variables: x_v (value v saved) and y_n (node n recomputed). Every needed value is saved or
    recomputed; a recomputed node's forward inputs are saved or recomputed; views are never
    saved; nodes of other kinds than `recomputable` are never recomputed.
    """
    values = [v for n in boundary.forward for v in n.outputs]
    nodes = boundary.forward
    x = {id(v): i for i, v in enumerate(values)}
    y = {id(n): len(values) + i for i, n in enumerate(nodes)}
    rows: list[dict[int, float]] = []  # each row: Σ coef·var ≥ 0 (or ≥ 1 via lower bounds)
    lower: list[float] = []
    for v in boundary.needed:
        rows.append({x[id(v)]: 1, y[id(boundary.producer[id(v)])]: 1})
        lower.append(1)
    for n in nodes:
        for u in boundary.forward_inputs(n):
            rows.append({x[id(u)]: 1, y[id(boundary.producer[id(u)])]: 1, y[id(n)]: -1})
            lower.append(0)
    a = lil_matrix((len(rows) + 1, len(values) + len(nodes)))
    for r, row in enumerate(rows):
        for col, coef in row.items():
            a[r, col] += coef
    for v in values:
        a[len(rows), x[id(v)]] = v.nbytes
    upper_bounds = np.ones(len(values) + len(nodes))
    for v in values:
        if not _saveable(v, boundary):
            upper_bounds[x[id(v)]] = 0
    for n in nodes:
        if kind(n.op) not in recomputable:
            upper_bounds[y[id(n)]] = 0
    cost = np.zeros(len(values) + len(nodes))
    for n in nodes:
        cost[y[id(n)]] = flops(n) + 1  # +1: prefer saving over recomputing free ops for nothing
    constraints = LinearConstraint(
        a.tocsr(), np.array([*lower, 0]), np.array([np.inf] * len(rows) + [activation_budget])
    )
    result = milp(
        cost,
        constraints=constraints,
        integrality=np.ones_like(cost),
        bounds=Bounds(0, upper_bounds),
        options={"time_limit": 60},
    )
    if result.x is None:
        smallest = boundary.saved_bytes(budget_floor(boundary, recomputable))
        raise InfeasibleBudgetError(
            f"no recomputation fits an activation budget of {activation_budget:,} bytes; the"
            f" smallest achievable is {smallest:,} bytes of saved activations",
            smallest,
        )
    return [v for v in values if result.x[x[id(v)]] > 0.5]


def budget_floor(boundary: Boundary, recomputable: set[Kind] = ANY_FORWARD) -> list[Value]:
    """The saved set that minimises bytes regardless of FLOPs (what no budget can go below)."""
    return min_cut_saved(boundary, recomputable)


def layer_checkpoint_saved(
    boundary: Boundary, tokens: Value, n_layers: int, checkpointed: int | None = None
) -> list[Value]:
    """What per-layer full checkpointing (torch.utils.checkpoint on each block) keeps.

    `checkpointed`: only the first so many blocks are checkpointed (default: all); the later
    ones save like the head does. Keeping the last block costs little: its values are live at
    the start of the backward either way, saved or just recomputed.

    Block boundaries are found in the dataflow, not by name: the residual stream is the
    embedding followed by the residual adds that every path from the tokens to the loss must
    cross (dominators), counted back from the last block's output; a block spans
    (stream length − 1) // n_layers links (two residual adds per pre-norm block). Kept: each
    block's input, and what the head after the last block saves as usual; everything inside a
    block is recomputed, matmuls included.
    """
    flow = nx.DiGraph()
    for node in boundary.forward:
        for u in node.inputs:
            for v in node.outputs:
                flow.add_edge(id(u), id(v))
    loss = boundary.forward[-1].outputs[0]
    idom = nx.immediate_dominators(flow, id(tokens))
    chain, at = [], id(loss)
    while at != id(tokens):
        chain.append(at)
        at = idom[at]
    values = {id(v): v for n in boundary.forward for v in n.outputs}
    first = values[chain[-1]]  # the embedding: the first value every path goes through
    residual_adds = [
        values[i]
        for i in reversed(chain)
        if values[i].shape == first.shape and boundary.producer[i].op == "add.Tensor"
    ]
    stream = [first, *(v for v in residual_adds if v is not first)]
    stride = max((len(stream) - 1) // n_layers, 1)
    checkpointed = n_layers if checkpointed is None else checkpointed
    inputs = [stream[-1 - stride * (n_layers - i)] for i in range(checkpointed)]
    order = {id(n): i for i, n in enumerate(boundary.forward)}
    head_input = stream[-1 - stride * (n_layers - checkpointed)]
    head_start = order[id(boundary.producer[id(head_input)])]
    head = [v for v in min_cut_saved(boundary) if order[id(boundary.producer[id(v)])] >= head_start]
    return inputs + head


def rewrite(graph: Graph, saved: Iterable[Value]) -> tuple[Graph, list[Node]]:
    """Recompute every needed forward value not in `saved`, just before its first backward use.

    Returns the new graph and the inserted (cloned) nodes.
    """
    out = graph.copy()
    boundary = Boundary.of(out)
    keep = {id(v) for v in saved}
    remap: dict[int, Value] = {}
    clones: list[Node] = []
    b = GraphBuilder.rewriting(out)
    b.phase = Phase.BACKWARD

    def ensure(v: Value) -> Value:
        if id(v) not in boundary.producer or id(v) in keep:
            return v
        if id(v) in remap:
            return remap[id(v)]
        node = boundary.producer[id(v)]
        ready = {id(u): ensure(u) for u in boundary.forward_inputs(node)}
        with b.at(source=node.source):
            names = [f"{old.name}.r" for old in node.outputs]
            news = b.emit(
                node.op, node.args, node.kwargs, names=names, read=lambda u: ready.get(id(u), u)
            )
        remap.update(zip(map(id, node.outputs), news, strict=True))
        clones.append(b.nodes[-1])
        return remap[id(v)]

    for node in out.nodes:
        if node.phase is Phase.BACKWARD:
            fresh = {id(u): ensure(u) for u in node.inputs}
            node.map_args(lambda u, fresh=fresh: fresh.get(id(u), u))
        b.append(node)
    out.nodes = b.nodes
    mark_activations(out)
    return out, clones


@dataclass(frozen=True)
class RecomputePolicy:
    """Which values the backward keeps: the min-cut unless a field asks otherwise.

    `activation_budget` (bytes of saved values) or `activation_fraction` (of the no-recompute
    saved bytes): the 0/1 program; `checkpoint_layers` (a layer count): per-layer full
    checkpointing, of the first `checkpoint_blocks` blocks only if given. One value shared by
    compile, plan and train (`CompileOptions.recompute`; None there keeps every activation).
    """

    activation_budget: int | None = None
    activation_fraction: float | None = None
    checkpoint_layers: int | None = None
    checkpoint_blocks: int | None = None


@dataclass(frozen=True)
class RecomputeReport:
    """What the recompute pass kept and what its choice costs: the evidence budgets read."""

    saved_bytes_before: int  # bytes of the forward values the backward reads, none recomputed
    saved_bytes_after: int  # bytes of the values kept
    extra_flops: int  # FLOPs of the recomputed (cloned) nodes
    extra_matmul_flops: int  # ... of which matmuls
    step_flops: int  # FLOPs of the step before recomputation
    recomputed: tuple[str, ...]  # names of the recomputed values, sorted


def choose_saved(graph: Graph, boundary: Boundary, policy: RecomputePolicy) -> list[Value]:
    """The saved set `policy` asks for (see RecomputePolicy)."""
    if policy.checkpoint_layers:
        tokens = next(v for v in graph.inputs if v.name == "tokens")
        n_layers = policy.checkpoint_layers
        blocks = policy.checkpoint_blocks
        checkpointed = n_layers if blocks is None else blocks
        return layer_checkpoint_saved(boundary, tokens, n_layers, checkpointed)
    budget = policy.activation_budget
    if policy.activation_fraction is not None:
        budget = policy.activation_fraction * boundary.saved_bytes(boundary.needed)
    return min_cut_saved(boundary) if budget is None else budget_saved(boundary, int(budget))


def recompute_pass(
    graph: Graph, ctx: PassContext, policy: RecomputePolicy = RecomputePolicy()
) -> Graph:
    """Save what `choose_saved` picks; recompute the rest of what the backward needs.

    Records a RecomputeReport as `ctx.recompute` (none when the backward reads no forward
    value)."""
    boundary = Boundary.of(graph)
    if not boundary.needed:
        return graph
    saved = choose_saved(graph, boundary, policy)
    out, clones = rewrite(graph, saved)
    ctx.recompute = RecomputeReport(
        saved_bytes_before=boundary.saved_bytes(boundary.needed),
        saved_bytes_after=boundary.saved_bytes(saved),
        extra_flops=sum(flops(n) for n in clones),
        extra_matmul_flops=sum(flops(n) for n in clones if kind(n.op) is Kind.MATMUL),
        step_flops=sum(flops(n) for n in graph.nodes),
        recomputed=tuple(sorted(v.name for n in clones for v in n.outputs)),
    )
    return out
