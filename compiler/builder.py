"""GraphBuilder: the one way the tracer and the passes make nodes, so every new node's outputs
have the types its op computes (`emit` runs the op on meta tensors) and every value name is
unique in the graph (one namespace, starting from the names already in use)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from compiler.ir import Graph, Node, Phase, Role, Value
from compiler.meta import infer_outputs


class GraphBuilder:
    """Appends typed nodes under one namespace; `phase` and `source` stamp each new node."""

    def __init__(self, taken: Iterable[str] = ()) -> None:
        self.taken = set(taken)
        self.inputs: list[Value] = []
        self.nodes: list[Node] = []
        self.phase, self.source = Phase.FORWARD, ""

    @classmethod
    def rewriting(cls, graph: Graph) -> GraphBuilder:
        """A builder for a graph made from `graph`: same inputs, its names stay taken."""
        builder = cls(v.name for v in graph.values())
        builder.inputs = list(graph.inputs)
        return builder

    def graph(self, outputs: Sequence[Value]) -> Graph:
        return Graph(list(self.inputs), list(self.nodes), list(outputs))

    @contextmanager
    def at(self, phase: Phase | None = None, source: str | None = None) -> Iterator[None]:
        """Stamp the nodes emitted inside with `phase` / `source`, then restore the old ones."""
        saved = self.phase, self.source
        self.phase = saved[0] if phase is None else phase
        self.source = saved[1] if source is None else source
        try:
            yield
        finally:
            self.phase, self.source = saved

    def fresh(self, name: str) -> str:
        """`name`, or `name_`, `name__`... whichever is free first; it is taken from now on."""
        while name in self.taken:
            name += "_"
        self.taken.add(name)
        return name

    def input(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, role: Role) -> Value:
        """A new graph input, under exactly `name` (inputs are fed by name)."""
        if name in self.taken:
            raise ValueError(f"graph input %{name} would shadow a value of the same name")
        self.taken.add(name)
        value = Value(name, shape, dtype, role)
        self.inputs.append(value)
        return value

    def append(self, node: Node) -> Node:
        """Append a node whose outputs already exist (a copy, a replacement op)."""
        self.nodes.append(node)
        return node

    def emit(
        self,
        op: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
        *,
        names: Sequence[str] | str = "t",
        roles: Sequence[Role] | Role = Role.TEMPORARY,
        read: Callable[[Value], Value] | None = None,
        fresh: bool = True,
    ) -> list[Value]:
        """Append `op`, its Value arguments mapped by `read`; its outputs typed by the op itself.

        One name is `name` for a single output and `name.i` for several; `fresh=False` keeps
        the names as given (a pass re-emitting a source node under its own names)."""
        node = Node(op, args, dict(kwargs or {}), [], self.phase, self.source)
        if read is not None:
            node.map_args(read)
        metas = infer_outputs(node)
        if isinstance(names, str):
            names = [names] if len(metas) == 1 else [f"{names}.{i}" for i in range(len(metas))]
        if isinstance(roles, Role):
            roles = [roles] * len(metas)
        node.outputs = [
            Value(self.fresh(n) if fresh else n, tuple(t.shape), t.dtype, r)
            for n, t, r in zip(names, metas, roles, strict=True)
        ]
        self.nodes.append(node)
        return node.outputs

    def emit1(
        self,
        op: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
        name: str = "t",
        role: Role = Role.TEMPORARY,
    ) -> Value:
        """`emit` for an op with one output."""
        (out,) = self.emit(op, args, kwargs, names=name, roles=role)
        return out

    def copy(self, node: Node, read: Callable[[Value], Value]) -> Node:
        """Append `node` unchanged but for its Value arguments, mapped by `read`."""
        new = Node(node.op, node.args, dict(node.kwargs), node.outputs, node.phase, node.source)
        new.map_args(read)
        return self.append(new)

    def write(self, dst: Value, src: Value) -> None:
        """The in-place write `copy_(dst, src)` of a persistent value."""
        self.append(Node("copy_", (dst, src), {}, [], self.phase, self.source))
