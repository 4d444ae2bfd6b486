"""fused_update: each parameter's optimizer update becomes one in-place, chunked `memfit::update`.

The traced AdamW (and what the precision pass adds to it: the gradient's cast up, fp16's
unscaling and `where(found_inf, old, new)` guards) computes each new parameter and moment as a
whole tensor, then `copy_`s it into persistent state: the arena holds the gradient plus a few
parameter-sized temporaries during each update. Here a *region* is grown back from each write's
new value through optimizer-phase pointwise nodes shaped like the written tensor; regions that
share a node merge (a parameter's write and its moments' writes are one region). A region whose
values nothing outside reads, whose other inputs are shaped like its targets or 0-dim, and that
reads no tensor another write changes, is replaced by one `memfit::update` node at the place of
its last member (compiler/update_op.py): its body is the region's nodes in order, run per chunk
of rows. The plan then holds the gradient and one chunk's scratch (`liveness.scratch`).

Only for the eager/arena backends: the Triton backend fuses the same region into one kernel
pass whose intermediates stay in registers (passes/fusion.py).
"""

from __future__ import annotations

from compiler.ir import Graph, Node, Phase, Value
from compiler.ops import Kind, kind
from compiler.passes.manager import PassContext
from compiler.update_op import UPDATE, Step, chunk_rows, encode


def _member(node: Node | None, shape: tuple[int, ...]) -> bool:
    return (
        node is not None
        and node.phase is Phase.OPTIMIZER
        and kind(node.op) is Kind.POINTWISE
        and len(node.outputs) == 1
        and node.outputs[0].shape == shape
    )


def regions(graph: Graph) -> list[tuple[list[Node], list[Node]]]:
    """(members in schedule order, writes) of every update that can be outlined."""
    producers = graph.producers()
    region_of: dict[int, int] = {}  # id(node) → region index (union by relabelling)
    members: list[set[int]] = []
    writes: list[list[Node]] = []
    for node in graph.nodes:
        if node.op != "copy_" or not node.args[0].shape:
            continue
        dst, src = node.args
        if not _member(producers.get(id(src)), dst.shape):
            continue
        grown: set[int] = set()
        stack = [producers[id(src)]]
        while stack:
            n = stack.pop()
            if id(n) not in grown:
                grown.add(id(n))
                stack += [p for u in n.inputs if _member(p := producers.get(id(u)), dst.shape)]
        joined = sorted({region_of[i] for i in grown if i in region_of})
        k = len(members)
        members.append(grown)
        writes.append([node])
        for j in joined:
            members[k] |= members[j]
            writes[k] += writes[j]
            members[j], writes[j] = set(), []
        for i in members[k]:
            region_of[i] = k
    written = {id(w.args[0]) for ws in writes for w in ws}
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    by_id = {id(n): n for n in graph.nodes}
    users = graph.users()
    outputs = {id(v) for v in graph.outputs}
    found = []
    for grown, ws in zip(members, writes, strict=True):
        nodes = sorted((by_id[i] for i in grown), key=lambda n: order[id(n)])
        if nodes and _outlinable(nodes, ws, users, outputs, written):
            found.append((nodes, sorted(ws, key=lambda n: order[id(n)])))
    return found


def _outlinable(
    nodes: list[Node],
    writes: list[Node],
    users: dict[int, list[Node]],
    outputs: set[int],
    written: set[int],
) -> bool:
    """Nothing outside reads the region's values; its inputs are target-shaped or 0-dim; it
    reads no tensor that a write outside it changes."""
    inside = {id(n) for n in nodes} | {id(w) for w in writes}
    shape = writes[0].args[0].shape
    targets = {id(w.args[0]) for w in writes}
    made = {id(v) for n in nodes for v in n.outputs}
    for n in nodes:
        for v in n.outputs:
            if id(v) in outputs or any(id(u) not in inside for u in users.get(id(v), [])):
                return False
        for u in n.inputs:
            if id(u) in made:
                continue
            if u.shape not in (shape, ()) or (id(u) in written and id(u) not in targets):
                return False
    return all(w.args[0].shape == shape for w in writes)


def outline(nodes: list[Node], writes: list[Node]) -> Node:
    """The `memfit::update` node that computes `nodes` and performs `writes`."""
    targets = [w.args[0] for w in writes]
    made = {id(v) for n in nodes for v in n.outputs}
    inputs: dict[int, Value] = {}
    for n in nodes:
        for u in n.inputs:
            if id(u) not in made and id(u) not in {id(t) for t in targets}:
                inputs.setdefault(id(u), u)
    ref = {id(v): f"${k}" for k, v in enumerate([*targets, *inputs.values()])}
    steps: list[Step] = []
    for n in nodes:
        copy = Node(n.op, n.args, dict(n.kwargs), [])
        copy.map_args(lambda v: ref[id(v)])
        steps.append((n.op, copy.args, copy.kwargs, n.outputs[0].dtype))
        ref[id(n.outputs[0])] = f"${len(ref)}"
    outs = [int(ref[id(w.args[1])][1:]) for w in writes]
    body = encode(len(targets) + len(inputs), steps, outs)
    args = (targets, list(inputs.values()), body, chunk_rows(targets[0].shape))
    return Node(UPDATE, args, {}, [], Phase.OPTIMIZER, writes[-1].source or "update")


def fuse_updates(graph: Graph, ctx: PassContext, backend: str = "eager") -> Graph:
    """Outline every update region (not for the Triton backend, which fuses it itself)."""
    if backend == "triton":
        return graph
    found = regions(graph)
    if not found:
        return graph
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    at: dict[int, Node | None] = {}  # traced index → the fused node there (None: removed)
    for nodes, writes in found:
        indices = [order[id(n)] for n in (*nodes, *writes)]
        at.update(dict.fromkeys(indices))
        at[max(indices)] = outline(nodes, writes)
    out = graph.copy()
    out.nodes = [at.get(i, n) for i, n in enumerate(out.nodes) if at.get(i, n) is not None]
    return out
