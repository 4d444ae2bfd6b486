"""The eager backend: run an IR graph op by op with ATen, freeing each value after its last use.

It is the CPU path and the numerical reference every other backend is checked against, so it
does nothing clever: one ATen call per node, exactly the op the graph names.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from compiler.ir import Graph, Node
from compiler.ops import Kind, kind, resolve
from runtime.interpreter import Env, Interpreter, bind


def run_node(node: Node, env: Mapping[int, Tensor], device: torch.device) -> list[Tensor]:
    """Execute one node given tensors for its inputs; returns its output tensors."""
    creation = kind(node.op) is Kind.CREATION
    if creation:  # full_like(x, 0) needs x's shape, not its bytes: x may be freed
        env = {id(v): torch.empty(v.shape, dtype=v.dtype, device="meta") for v in node.inputs}
    args = bind(node.args, env)
    kwargs = bind(node.kwargs, env)
    if node.op == "copy_":
        args[0].copy_(args[1])
        return []
    if creation:
        kwargs["device"] = device
    result = resolve(node.op)(*args, **kwargs)
    return list(result) if isinstance(result, tuple | list) else [result]


class Eager(Interpreter):
    """Every node as its ATen op; each result a fresh tensor."""

    def run_node(self, node: Node, env: Env) -> list[Tensor]:
        return run_node(node, env, self.device)


def run_graph(
    graph: Graph, inputs: Mapping[str, Tensor], device: torch.device | str = "cpu"
) -> list[Tensor]:
    """Run `graph` on named input tensors (persistent ones are updated in place by copy_)."""
    return Eager(graph, device).run(inputs)
