"""The eager backend: run an IR graph op by op with ATen, freeing each value after its last use.

It is the CPU path and the numerical reference every other backend is checked against, so it
does nothing clever: one ATen call per node (`compiler.meta.run_node`), exactly the op the
graph names, in the plain `runtime.interpreter.Interpreter`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from compiler.ir import Graph
from runtime.interpreter import Interpreter


def run_graph(
    graph: Graph, inputs: Mapping[str, Tensor], device: torch.device | str = "cpu"
) -> list[Tensor]:
    """Run `graph` on named input tensors (persistent ones are updated in place by copy_)."""
    return Interpreter(graph, device).run(inputs)
