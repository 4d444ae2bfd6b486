"""attention: spelled-out attention softmax(q·kᵀ·scale + mask)·v as memfit's one attention op.

A model that writes attention by hand (matmul, scale, a masked_fill or an added mask, softmax,
matmul) traces into [B, H, T, S] scores and probabilities, and its backward saves them. This
pass finds that pattern in its core-ATen form — bmm between view/clone/expand wrappers,
`_softmax`, and in the backward the decomposed softmax gradient and the matmuls giving dq, dk
and dv — and replaces it with `memfit::attention` (output and row log-sum-exp, O(T) saved) and
`memfit::attention_backward` (compiler/attention.py). The [T, S] values then have no readers
and are dropped.

The mask must be proved, never guessed: it has to be computed in the graph from no graph input
(arange, comparisons, ones/tril/triu...), so the pass evaluates it on the CPU and accepts it
only when `attention.mask_options` classifies it as none, causal or causal within a window. A
mask read from a buffer or an input (its values are unknown to a pass, e.g. on the meta
device) leaves the pattern alone, as does any use of an intermediate the ops do not give back
(the probabilities returned by the model, a gradient flowing into the scores from elsewhere).
Without a backward (a validation graph) only the forward is replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from compiler import attention as ops
from compiler.builder import GraphBuilder
from compiler.ir import Graph, Node, Phase, Value
from compiler.meta import run_node
from compiler.passes.linear_cross_entropy import _Uses
from compiler.passes.manager import PassContext
from compiler.trace import eliminate_dead_nodes, mark_activations

_VIEWS = ("view", "_unsafe_view")
_SAME_SHAPE = ("alias", "clone", "expand")  # wrappers that keep a value's shape and contents
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class Gradients:
    """The backward's three matmuls, their common input dO [B·H, T, Dv] as [B, H, T, Dv]."""

    grad_out: Value
    dq: Node  # bmm(dS, kᵀ): [B·H, T, D]
    dk_t: Node  # bmm(qᵀ, dS): [B·H, D, S]
    dv: Node  # bmm(pᵀ, dO): [B·H, S, Dv]


@dataclass(frozen=True)
class Attention:
    """One matched pattern: q, k, v as [B, H, ·, ·] values, the options, the nodes to replace."""

    q: Value
    k: Value
    v: Value
    causal: bool
    scale: float
    window: int
    output: Node  # bmm(p, v): [B·H, T, Dv]
    source: str
    grads: Gradients | None


class _Matcher(_Uses):
    """Producers and readers, and the wrappers the decompositions put around attention."""

    def source(self, v: Value) -> Value:
        """`v` with same-shape wrappers (alias, clone, expand to its own shape) stripped."""
        while (node := self.made_by(v, *_SAME_SHAPE)) and node.args[0].shape == v.shape:
            v = node.args[0]
        return v

    def heads(self, v: object) -> Value | None:
        """The [B, H, T, D] value that a bmm operand [B·H, T, D] flattens, else None."""
        node = self.made_by(v, *_VIEWS)
        if node is None:
            return None
        x = self.source(node.args[0])
        if len(x.shape) != 4 or (x.shape[0] * x.shape[1], *x.shape[2:]) != v.shape:
            return None
        return x

    def readers_through(self, v: Value) -> list[Node]:
        """Readers of `v` and of its same-shape wrappers (aliases of the probabilities)."""
        found, todo = [], [v]
        while todo:
            for node in self.readers.get(id(todo.pop()), []):
                if node.op in _SAME_SHAPE and node.outputs[0].shape == v.shape:
                    todo.append(node.outputs[0])
                else:
                    found.append(node)
        return found

    def transposed_reader(self, v: Value) -> list[Node]:
        """Readers of `v`ᵀ (permute [0, 2, 1] of a 3-d value)."""
        return [
            r
            for n in self.readers.get(id(v), [])
            if n.op == "permute" and list(n.args[1]) == [0, 2, 1]
            for r in self.readers.get(id(n.outputs[0]), [])
        ]

    def is_transpose_of(self, v: object, of: Value) -> bool:
        node = self.made_by(v, "permute")
        return node is not None and node.args[0] is of and list(node.args[1]) == [0, 2, 1]


def _scalar(v: object, uses: _Matcher) -> float | None:
    """The value of a 0-d constant made by scalar_tensor / full, else None."""
    node = uses.made_by(v, "scalar_tensor", "full")
    if node is None or v.shape != ():
        return None
    value = node.args[0] if node.op == "scalar_tensor" else node.args[1]
    return float(value) if isinstance(value, int | float) else None


def _dropped(x: float | None, dtype: torch.dtype) -> bool:
    """-inf, or the dtype's lowest value (HF's masks): exp of it minus a row max is 0."""
    return x is not None and x <= torch.finfo(dtype).min / 2


def _constant(v: Value, uses: _Matcher, graph: Graph) -> torch.Tensor | None:
    """`v` evaluated on the CPU if it is computed from no graph input, else None."""
    inputs = {id(x) for x in graph.inputs}
    needed: dict[int, Node] = {}
    todo = [v]
    while todo:
        x = todo.pop()
        if id(x) in inputs:
            return None
        node = uses.producer[id(x)]
        if id(node) not in needed:
            needed[id(node)] = node
            todo.extend(node.inputs)
    env: dict[int, torch.Tensor] = {}
    for node in graph.nodes:  # graph order is a topological order
        if id(node) in needed:
            outs = run_node(node, env, _CPU)
            env.update((id(o), t) for o, t in zip(node.outputs, outs, strict=True))
    return env[id(v)]


def _mask_and_scores(x: Value, uses: _Matcher, graph: Graph) -> tuple[Value, tuple] | None:
    """(the scaled scores, (causal, window, how the backward masks)) of softmax's input."""
    node = uses.made_by(x, "where.self", "add.Tensor")
    if node is None:
        return x, (False, 0, None)
    if node.op == "where.self":
        cond, a, b = node.args
        if isinstance(a, Value) and a.shape == x.shape and _dropped(_scalar(b, uses), x.dtype):
            scores, keep, dropped_first = a, _constant(cond, uses, graph), False
        elif isinstance(b, Value) and b.shape == x.shape and _dropped(_scalar(a, uses), x.dtype):
            scores, keep, dropped_first = b, _constant(cond, uses, graph), True
        else:
            return None
        if keep is None:
            return None
        keep = ~keep if dropped_first else keep
        how = ("where", cond, dropped_first)
    else:
        a, b = node.args[:2]
        scores, mask = (a, b) if isinstance(a, Value) and a.shape == x.shape else (b, a)
        if node.kwargs or not isinstance(mask, Value) or scores.shape != x.shape:
            return None
        keep = _constant(mask, uses, graph)
        how = None
    if keep is None or keep.dim() > 4:
        return None
    options = ops.mask_options(keep, *x.shape[-2:])
    return None if options is None else (scores, (*options, how))


def _scaled(s: Value, uses: _Matcher) -> tuple[Value, float, Callable | None] | None:
    """(q·kᵀ as [B, H, T, S], scale, the backward's scaling node test) of the scaled scores."""
    node = uses.made_by(s, "mul.Tensor", "div.Tensor")
    if node is None:
        return s, 1.0, None
    y, c = node.args[:2]
    if node.kwargs or not isinstance(y, Value) or not isinstance(c, int | float):
        return None
    scale = float(c) if node.op == "mul.Tensor" else 1.0 / float(c)
    return y, scale, lambda n: n.op == node.op and n.args[1] == c and not n.kwargs


def match_attention(sm: Node, uses: _Matcher, graph: Graph) -> Attention | None:
    """The pattern around one `_softmax` node, forward and (if any) backward, else None."""
    x, dim, half_to_float = sm.args
    if len(x.shape) != 4 or dim not in (-1, 3) or half_to_float:
        return None
    masked = _mask_and_scores(x, uses, graph)
    if masked is None:
        return None
    scores, (causal, window, how) = masked
    scaled = _scaled(scores, uses)
    if scaled is None:
        return None
    qk, scale, scaling = scaled
    view = uses.made_by(qk, *_VIEWS)
    qk_mm = view and uses.made_by(view.args[0], "bmm")
    if qk_mm is None:
        return None
    a, bt = qk_mm.args
    q, k_t = uses.heads(a), uses.heads(bt)
    k_node = uses.made_by(k_t, "permute")
    if q is None or k_node is None or list(k_node.args[1]) != [0, 1, 3, 2]:
        return None
    k = k_node.args[0]
    b, h, t, s = x.shape
    p = sm.outputs[0]
    readers = uses.readers_through(p)
    flat = [n for n in readers if n.op in _VIEWS and n.outputs[0].shape == (b * h, t, s)]
    pv = [r for f in flat for r in uses.readers.get(id(f.outputs[0]), [])]
    if not flat:
        return None
    out_mm = next((n for n in pv if n.op == "bmm" and n.args[0] is flat[0].outputs[0]), None)
    v = out_mm and uses.heads(out_mm.args[1])
    if v is None or q.shape[:2] != (b, h) or k.shape != (b, h, s, q.shape[3]):
        return None
    if v.shape[:3] != (b, h, s) or len({q.dtype, k.dtype, v.dtype, x.dtype}) != 1:
        return None
    backward = [n for n in readers if n.phase is Phase.BACKWARD]
    grads = None
    if backward:
        grads = _gradients(p, (a, bt, flat[0].outputs[0], out_mm.args[1]), how, scaling, uses)
        if grads is None or len(flat) != 1:
            return None
    elif len(readers) != 1 or len(flat) != 1 or len(pv) != 1:
        return None
    return Attention(q, k, v, causal, scale, window, out_mm, sm.source, grads)


def _gradients(
    p: Value, operands: tuple[Value, ...], how: tuple | None, scaling: Callable | None, uses
) -> Gradients | None:
    """The traced backward of the pattern: dv = pᵀ·dO, dp = dO·vᵀ, the softmax gradient
    dp·p − p·Σ(dp·p), masked to 0 where the forward dropped, scaled, then dq and dk."""
    a, bt, pv, vv = operands
    dv = [n for n in uses.transposed_reader(pv) if n.op == "bmm" and n.args[1] is not pv]
    dp_mm = [n for n in uses.transposed_reader(vv) if n.op == "bmm"]
    if len(dv) != 1 or len(dp_mm) != 1 or dp_mm[0].args[0] is not dv[0].args[1]:
        return None
    grad_out = uses.heads(dv[0].args[1])
    dp_view = uses.only_reader(dp_mm[0].outputs[0])
    if grad_out is None or dp_view is None or dp_view.op not in _VIEWS:
        return None
    g = _softmax_grad(dp_view.outputs[0], p, uses)
    if g is None:
        return None
    if how is not None:  # where(dropped, 0, g) or where(keep, g, 0)
        node = uses.only_reader(g)
        if node is None or node.op != "where.self":
            return None
        _, cond, dropped_first = how
        zero, kept = (node.args[1], node.args[2]) if dropped_first else node.args[2:0:-1]
        if node.args[0] is not cond or kept is not g:
            return None
        if _scalar(zero, uses) != 0.0:
            return None
        g = node.outputs[0]
    if scaling is not None:
        node = uses.only_reader(g)
        if node is None or not scaling(node) or node.args[0] is not g:
            return None
        g = node.outputs[0]
    view = uses.only_reader(g)
    if view is None or view.op not in _VIEWS:
        return None
    ds = view.outputs[0]
    readers = uses.readers_of(ds) or []
    dq = [
        n
        for n in readers
        if n.op == "bmm" and n.args[0] is ds and uses.is_transpose_of(n.args[1], bt)
    ]
    dk = [
        n
        for n in readers
        if n.op == "bmm" and n.args[1] is ds and uses.is_transpose_of(n.args[0], a)
    ]
    if len(dq) != 1 or len(dk) != 1 or len(readers) != 2:
        return None
    return Gradients(grad_out, dq[0], dk[0], dv[0])


def _softmax_grad(dp: Value, p: Value, uses: _Matcher) -> Value | None:
    """`_softmax_backward_data(dp, p)`, directly or decomposed, reading dp and p only."""
    node = uses.only_reader(dp)
    if node is None:
        return None
    if node.op == "_softmax_backward_data":
        ok = uses.source(node.args[1]) is p and node.args[2] in (-1, 3)
        return node.outputs[0] if ok else None
    if node.op != "mul.Tensor" or uses.source(_other(node, dp)) is not p:
        return None
    prod = node.outputs[0]
    readers = uses.readers_of(prod) or []
    total = next((n for n in readers if n.op == "sum.dim_IntList"), None)
    sub = next((n for n in readers if n.op == "sub.Tensor"), None)
    if total is None or sub is None or len(readers) != 2 or sub.args[0] is not prod:
        return None
    if list(total.args[1]) not in ([-1], [3]) or not total.args[2]:
        return None
    weighted = uses.only_reader(total.outputs[0])
    if weighted is None or weighted.op != "mul.Tensor" or sub.args[1] is not weighted.outputs[0]:
        return None
    if uses.source(_other(weighted, total.outputs[0])) is not p or sub.kwargs:
        return None
    return sub.outputs[0]


def _other(node: Node, v: Value) -> object:
    a, b = node.args[:2]
    return b if a is v else a


def attention_pass(graph: Graph, ctx: PassContext) -> Graph:
    """Replace every provable spelled-out attention by memfit's attention ops."""
    graph = graph.copy()
    uses = _Matcher(graph)
    found = [
        m for n in graph.nodes if n.op == "_softmax" and (m := match_attention(n, uses, graph))
    ]
    if not found:
        return graph
    return _rewrite(graph, found)


def _rewrite(graph: Graph, found: list[Attention]) -> Graph:
    """Each match's forward emitted where its output matmul stood, its backward where the
    first gradient matmul stood; old values rewired to the new ones, dead nodes dropped."""
    b = GraphBuilder.rewriting(graph)
    replaced: dict[int, Value] = {}
    at: dict[int, Callable[[], None]] = {}
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    for m in found:
        state: dict[str, Value] = {}
        at[id(m.output)] = _forward(b, m, replaced, state)
        if m.grads is not None:
            g = m.grads
            first = min((g.dq, g.dk_t, g.dv), key=lambda n: order[id(n)])
            at[id(first)] = _backward(b, m, replaced, state)
    for node in graph.nodes:
        if id(node) in at:
            at[id(node)]()
        node.map_args(lambda v: replaced.get(id(v), v))
        b.append(node)
    out = b.graph([replaced.get(id(v), v) for v in graph.outputs])
    eliminate_dead_nodes(out)
    mark_activations(out)
    return out


def _options(m: Attention) -> tuple:
    chunk = ops.chunk_rows(m.q.shape[2], m.q.shape[3])
    return (None, m.causal, m.scale, m.window, 0.0, chunk)


def _forward(
    b: GraphBuilder, m: Attention, replaced: dict[int, Value], state: dict[str, Value]
) -> Callable[[], None]:
    def emit() -> None:
        with b.at(Phase.FORWARD, m.source):
            args = (m.q, m.k, m.v, *_options(m))
            state["out"], state["lse"] = b.emit(ops.FORWARD, args, names="attention")
            flat = list(m.output.outputs[0].shape)
            replaced[id(m.output.outputs[0])] = b.emit1(
                "view", (state["out"], flat), name="attention_out"
            )

    return emit


def _backward(
    b: GraphBuilder, m: Attention, replaced: dict[int, Value], state: dict[str, Value]
) -> Callable[[], None]:
    def emit() -> None:
        g = m.grads
        assert g is not None
        with b.at(Phase.BACKWARD, m.source):
            grad = replaced.get(id(g.grad_out), g.grad_out)
            args = (grad, m.q, m.k, m.v, state["out"], state["lse"], *_options(m))
            dq, dk, dv = b.emit(ops.BACKWARD, args, names="attention_grad")
            for node, value in ((g.dq, dq), (g.dv, dv)):
                flat = [-1, *value.shape[2:]]
                replaced[id(node.outputs[0])] = b.emit1(
                    "view", (value, flat), name="attention_grad"
                )
            # the trace's views after bmm(qᵀ, dS) rely on its contiguous [B·H, D, S] layout
            dk = b.emit1("view", (dk, [-1, *dk.shape[2:]]), name="attention_dk")
            dk_t = b.emit1("permute", (dk, [0, 2, 1]), name="attention_dk_t")
            clone = b.emit1(
                "clone", (dk_t,), {"memory_format": torch.contiguous_format}, "attention_dk_t"
            )
            replaced[id(g.dk_t.outputs[0])] = clone

    return emit
