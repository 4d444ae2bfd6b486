"""noop_views: drop view ops that return their input unchanged (same shape, same layout).

The decompositions emit many `view(x, x.shape)`, `expand(x, x.shape)` and `alias(x)`; each is
a node the scheduler, planner and fusion would otherwise step around. Uses of the view are
rewired to its input.
"""

from __future__ import annotations

from compiler.ir import Graph, Node, Value
from compiler.passes.manager import PassContext
from compiler.trace import mark_activations

_IDENTITY_WHEN_SAME_SHAPE = {"view", "_unsafe_view", "expand", "alias"}


def _is_noop(node: Node) -> bool:
    if node.op not in _IDENTITY_WHEN_SAME_SHAPE:
        return False
    (src,) = node.inputs
    return src.shape == node.outputs[0].shape and src.dtype == node.outputs[0].dtype


def eliminate_noop_views(graph: Graph, ctx: PassContext) -> Graph:
    out = graph.copy()
    replaced: dict[int, Value] = {}

    def rewire(v: Value) -> Value:
        return replaced.get(id(v), v)

    kept: list[Node] = []
    for node in out.nodes:
        node.map_args(rewire)
        if _is_noop(node) and node.outputs[0] not in out.outputs:
            replaced[id(node.outputs[0])] = node.inputs[0]
        else:
            kept.append(node)
    out.nodes = kept
    mark_activations(out)
    return out
