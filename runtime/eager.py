"""The eager backend: run an IR graph op by op with ATen, freeing each value after its last use.

It is the CPU path and the numerical reference every other backend is checked against, so it
does nothing clever: one ATen call per node, exactly the op the graph names.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from compiler.ir import Graph, Node, Value
from compiler.ops import Kind, kind, resolve


def last_uses(graph: Graph) -> dict[int, int]:
    """id(value) → index of the last node reading its bytes (graph outputs live to the end)."""
    last: dict[int, int] = {}
    for i, node in enumerate(graph.nodes):
        if kind(node.op) is Kind.CREATION:  # reads only its input's shape (see run_node)
            continue
        for v in node.inputs:
            last[id(v)] = i
    for v in graph.outputs:
        last[id(v)] = len(graph.nodes)
    return last


def run_node(node: Node, env: Mapping[int, Tensor], device: torch.device) -> list[Tensor]:
    """Execute one node given tensors for its inputs; returns its output tensors."""

    creation = kind(node.op) is Kind.CREATION

    def bind(a: object) -> object:
        if isinstance(a, Value):
            # A creation op (full_like(x, 0)) needs x's shape, not its bytes: x may be freed.
            return torch.empty(a.shape, dtype=a.dtype, device="meta") if creation else env[id(a)]
        if isinstance(a, list | tuple):
            return type(a)(bind(x) for x in a)
        return a

    args = bind(node.args)
    kwargs = {k: bind(v) for k, v in node.kwargs.items()}
    if node.op == "copy_":
        args[0].copy_(args[1])
        return []
    if kind(node.op) is Kind.WRITE:  # memfit::update: writes its targets, returns nothing
        resolve(node.op)(*args, **kwargs)
        return []
    if kind(node.op) is Kind.CREATION:
        kwargs["device"] = device
    result = resolve(node.op)(*args, **kwargs)
    return list(result) if isinstance(result, tuple | list) else [result]


def run_graph(
    graph: Graph, inputs: Mapping[str, Tensor], device: torch.device | str = "cpu"
) -> list[Tensor]:
    """Run `graph` on named input tensors (persistent ones are updated in place by copy_)."""
    device = torch.device(device)
    missing = [v.name for v in graph.inputs if v.name not in inputs]
    if missing:
        raise KeyError(f"missing graph inputs: {', '.join('%' + n for n in missing)}")
    env: dict[int, Tensor] = {id(v): inputs[v.name] for v in graph.inputs}
    last = last_uses(graph)
    for i, node in enumerate(graph.nodes):
        for v, t in zip(node.outputs, run_node(node, env, device), strict=True):
            if id(v) in last:  # a dead output is dropped at once
                env[id(v)] = t
        for v in node.inputs:
            if last.get(id(v)) == i:
                del env[id(v)]
    return [env[id(v)] for v in graph.outputs]
