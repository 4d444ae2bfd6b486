"""The one walk over a graph that every backend shares (as torch.fx.Interpreter): bind the
named inputs, run the steps in schedule order, drop each value after the last step reading its
bytes, return the outputs. A step is a node, or a fused group's `Kernel` (inputs and stored
outputs, like a node). Here a node runs as its ATen op (`runtime.eager`); `runtime.arena`
overrides `run_node` to write into planned views, `runtime.triton_backend` also picks the
steps and overrides `run_kernel`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import cached_property, partial

import torch
from torch import Tensor

from compiler.codegen.triton import Kernel
from compiler.ir import Graph, Node, Value
from compiler.meta import run_node
from compiler.ops import Kind, kind

Env = dict[int, Tensor]
Step = Node | Kernel
Runner = Callable[[Env], Sequence[Tensor]]


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

    @cached_property
    def program(self) -> list[tuple[Runner, tuple[int, ...], tuple[int, ...]]]:
        """Per step: how it runs, where its outputs go (0: dropped at once, nothing reads
        it) and which values die after it. Worked out once: the loop in `run` is what every
        node costs in Python on every step."""
        last = self.last_use
        program = []
        for i, step in enumerate(self.steps):
            keep = tuple(id(v) if id(v) in last else 0 for v in step.outputs)
            free = tuple(dict.fromkeys(id(v) for v in reads(step) if last.get(id(v)) == i))
            program.append((self.runner(step), keep, free))
        return program

    def runner(self, step: Step) -> Runner:
        """`step` as a function of the environment (a backend may prepare it once)."""
        if isinstance(step, Kernel):
            return partial(self.run_kernel, step)
        return partial(self.run_node, step)

    def run(self, feeds: Mapping[str, Tensor]) -> list[Tensor]:
        """Run every step on the named input tensors; the graph's outputs, in order."""
        missing = [v.name for v in self.graph.inputs if v.name not in feeds]
        if missing:
            raise KeyError(f"missing graph inputs: {', '.join('%' + n for n in missing)}")
        env: Env = {id(v): feeds[v.name] for v in self.graph.inputs}
        for run, keep, free in self.program:
            for k, t in zip(keep, run(env), strict=True):
                if k:
                    env[k] = t
            for k in free:
                del env[k]
        return [env[id(v)] for v in self.graph.outputs]

    def run_node(self, node: Node, env: Env) -> Sequence[Tensor]:
        """The output tensors of one node, given the tensors of its inputs in `env`."""
        return run_node(node, env, self.device)

    def run_kernel(self, kernel: Kernel, env: Env) -> Sequence[Tensor]:
        """The stored outputs of one fused group (only backends that launch kernels have any)."""
        raise NotImplementedError(f"{type(self).__name__} does not launch fused kernels")
