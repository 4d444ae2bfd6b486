"""accumulate: scatter-adds into zeros that are then added to a dying tensor accumulate into it.

The backward of an embedding is traced as `index_put(zeros, [ids], grads, accumulate=True)`;
for a tied embedding the result is then added to the LM head's gradient of the same weight:
`add(head_grad, index_put(zeros, ...))`. Both halves are weight-sized (147 MiB in gpt2-small)
and live at once at the end of the backward. When `head_grad` dies at that add, the scatter can
add straight into it: `index_put(head_grad, [ids], grads, accumulate=True)`, which the buffers
pass then runs in place (no zeros, no second weight-sized buffer). Only the order of the fp32
additions changes (head_grad + Σ grads instead of (0 + Σ grads) + head_grad), so the result is
the same sum up to rounding, not bit for bit.

A view of `head_grad` that is the identity (permute of a permute that cancels) is looked
through, so the in-place write reaches the buffer itself.
"""

from __future__ import annotations

from compiler.ir import Graph, Node, Value
from compiler.passes.manager import PassContext

_ZEROS = {"full": 1, "zeros": None}  # creation ops making zeros (index of the fill value)


def _identity_base(v: Value, producers: dict[int, Node]) -> tuple[Value, list[Value]]:
    """`v` itself, or the value it is an identity permutation of; and the views between."""
    order: list[int] | None = None
    base, chain = v, []
    while (node := producers.get(id(base))) is not None and node.op == "permute":
        dims = list(node.args[1])
        order = dims if order is None else [dims[d] for d in order]
        chain.append(base)
        base = node.args[0]
    return (base, chain) if order is not None and order == sorted(order) else (v, [])


def accumulate_into(graph: Graph, ctx: PassContext) -> Graph:
    """Rewrite every `add(a, index_put(zeros, idx, vals, True))` whose `a` dies there."""
    producers = graph.producers()
    users = graph.users()
    last = {id(v): i for i, n in enumerate(graph.nodes) for v in n.inputs}
    last.update({id(v): len(graph.nodes) for v in graph.outputs})
    out = graph.copy()
    dropped: set[int] = set()
    for i, node in enumerate(out.nodes):
        if node.op != "add.Tensor" or len(node.args) != 2 or node.kwargs:
            continue
        for a, s in (node.args, node.args[::-1]):
            put = producers.get(id(s)) if isinstance(s, Value) else None
            if put is None or put.op != "index_put" or put.args[3:] != (True,):
                continue
            zeros = producers.get(id(put.args[0]))
            if (
                zeros is None
                or zeros.op not in _ZEROS
                or (_ZEROS[zeros.op] is not None and zeros.args[_ZEROS[zeros.op]] != 0)
            ):
                continue
            if not isinstance(a, Value) or (a.shape, a.dtype) != (s.shape, s.dtype):
                continue
            base, chain = _identity_base(a, producers)
            if len(users[id(s)]) != 1 or len(users[id(put.args[0])]) != 1:
                continue
            between = [*chain[1:], base] if chain else []
            if last.get(id(a), -1) > i or any(len(users[id(v)]) != 1 for v in between):
                continue  # a is read later, or a view between it and its base is read elsewhere
            if id(base) not in producers:  # a graph input: not ours to write
                continue
            node.op, node.args = "index_put", (base, put.args[1], put.args[2], True)
            dropped |= {id(put), id(zeros)}
            break
    out.nodes = [
        n for n, orig in zip(out.nodes, graph.nodes, strict=True) if id(orig) not in dropped
    ]
    return out
