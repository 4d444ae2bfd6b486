"""The eager backend: run an IR graph op by op with ATen, freeing each value after its last use.

It is the CPU path and the numerical reference every other backend is checked against, so it
does nothing clever: one ATen call per node (`compiler.meta.run_node`), exactly the op the
graph names.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from compiler.ir import Graph, Node
from compiler.meta import run_node
from runtime.interpreter import Env, Interpreter


class Eager(Interpreter):
    """Every node as its ATen op; each result a fresh tensor."""

    def run_node(self, node: Node, env: Env) -> list[Tensor]:
        return run_node(node, env, self.device)


def run_graph(
    graph: Graph, inputs: Mapping[str, Tensor], device: torch.device | str = "cpu"
) -> list[Tensor]:
    """Run `graph` on named input tensors (persistent ones are updated in place by copy_)."""
    return Eager(graph, device).run(inputs)
