"""The eager backend: run an IR graph op by op with ATen, freeing each value after its last use.

It is the CPU path and the numerical reference every other backend is checked against, so it
does nothing clever: one ATen call per node, exactly the op the graph names.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from compiler.ir import Graph
from compiler.meta import run_node
from compiler.ops import Kind, kind


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
