"""The one walk over a graph that every backend shares (in the manner of torch.fx.Interpreter).

`Interpreter.run` binds the named inputs, runs the steps in schedule order, drops each value
after the last step that reads its bytes, and returns the graph's outputs. A step is a node,
or a fused group's kernel (`compiler.codegen.Kernel`, which reads its inputs and defines its
stored outputs like a node). Backends differ only in how a step runs:
- `runtime.eager`: each node as its ATen op (the numerical reference);
- `runtime.arena`: each node written into its planned view of one arena allocation;
- `runtime.triton_backend`: fused groups as generated kernels, either way.
They override `run_node` / `run_kernel`, and choose the steps (`steps`) when building.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property

import torch
from torch import Tensor

from compiler.codegen.triton import Kernel
from compiler.ir import Graph, Node, Value
from compiler.ops import Kind, kind

Env = dict[int, Tensor]
Step = Node | Kernel


def reads(step: Step) -> Sequence[Value]:
    """The values whose bytes `step` reads: a creation op (`full_like(x, 0)`) reads only its
    input's shape, which the IR holds statically, so its input may already be freed."""
    if isinstance(step, Node) and kind(step.op) is Kind.CREATION:
        return ()
    return step.inputs


class Interpreter:
    """Runs `graph` on `device`; callable as a `runtime.program.Backend` for that graph."""

    def __init__(self, graph: Graph, device: torch.device | str = "cpu") -> None:
        self.graph = graph
        self.device = torch.device(device)
        self.steps: list[Step] = list(graph.nodes)

    def __call__(
        self, graph: Graph, feeds: Mapping[str, Tensor], device: torch.device | None = None
    ) -> list[Tensor]:
        if graph is not self.graph:
            raise ValueError(f"this {type(self).__name__} was built for another graph")
        return self.run(feeds)

    @cached_property
    def last_use(self) -> dict[int, int]:
        """id(value) → index of the last step reading its bytes (graph outputs: past the end)."""
        last: dict[int, int] = {}
        for i, step in enumerate(self.steps):
            for v in reads(step):
                last[id(v)] = i
        for v in self.graph.outputs:
            last[id(v)] = len(self.steps)
        return last

    def run(self, feeds: Mapping[str, Tensor]) -> list[Tensor]:
        """Run every step on the named input tensors; the graph's outputs, in order."""
        missing = [v.name for v in self.graph.inputs if v.name not in feeds]
        if missing:
            raise KeyError(f"missing graph inputs: {', '.join('%' + n for n in missing)}")
        env: Env = {id(v): feeds[v.name] for v in self.graph.inputs}
        last = self.last_use
        for i, step in enumerate(self.steps):
            if isinstance(step, Kernel):
                results = self.run_kernel(step, env)
            else:
                results = self.run_node(step, env)
            for v, t in zip(step.outputs, results, strict=True):
                if id(v) in last:  # a dead output is dropped at once
                    env[id(v)] = t
            for v in reads(step):
                if last.get(id(v)) == i:
                    del env[id(v)]
        return [env[id(v)] for v in self.graph.outputs]

    def run_node(self, node: Node, env: Env) -> Sequence[Tensor]:
        """The output tensors of one node, given the tensors of its inputs in `env`."""
        raise NotImplementedError

    def run_kernel(self, kernel: Kernel, env: Env) -> Sequence[Tensor]:
        """The stored outputs of one fused group (only backends that launch kernels have any)."""
        raise NotImplementedError(f"{type(self).__name__} does not launch fused kernels")
