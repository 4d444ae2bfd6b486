"""hypothesis strategies for random valid IR graphs, shared by every pass's property tests.

A graph is grown node by node: each step picks an op template that fits some value already
defined (pointwise, broadcasting binary, reduction, softmax, matmul, view), so graphs have
multiple uses, dead values and views of views. Output shapes come from running the op on meta
tensors, so every generated graph is valid by construction.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import settings
from hypothesis import strategies as st

from compiler.ir import Graph, Node, Phase, Role, Value
from compiler.meta import run_node

DEEP_EXAMPLES = 1000
DEEP = os.environ.get("HYPOTHESIS_PROFILE") == "deep"


def examples(count: int, **kwargs: Any) -> settings:
    """A property's settings: `count` examples in CI, at least DEEP_EXAMPLES under
    HYPOTHESIS_PROFILE=deep (an explicit max_examples would override a profile's)."""
    return settings(
        max_examples=max(count, DEEP_EXAMPLES) if DEEP else count, deadline=None, **kwargs
    )


DIMS = (2, 3, 4)
UNARY = ("neg", "tanh", "sigmoid", "relu", "abs", "gelu", "silu")
BINARY = ("add.Tensor", "sub.Tensor", "mul.Tensor", "maximum")

Template = Callable[[st.DrawFn, list[Value]], tuple[str, tuple, dict] | None]


def _pick(draw: st.DrawFn, values: list[Value], pred: Callable[[Value], bool]) -> Value | None:
    fitting = [v for v in values if pred(v)]
    return draw(st.sampled_from(fitting)) if fitting else None


def _unary(draw: st.DrawFn, values: list[Value]) -> tuple | None:
    x = _pick(draw, values, lambda v: v.dtype.is_floating_point)
    return (draw(st.sampled_from(UNARY)), (x,), {}) if x else None


def _scalar(draw: st.DrawFn, values: list[Value]) -> tuple | None:
    x = _pick(draw, values, lambda v: v.dtype.is_floating_point)
    c = draw(st.sampled_from([0.5, 2.0, -1.0]))
    return (draw(st.sampled_from(["mul.Scalar", "add.Scalar"])), (x, c), {}) if x else None


def _binary(draw: st.DrawFn, values: list[Value]) -> tuple | None:
    x = draw(st.sampled_from(values))
    same = [v for v in values if v.shape == x.shape or v.shape == x.shape[-1:]]
    y = draw(st.sampled_from(same))
    return (draw(st.sampled_from(BINARY)), (x, y), {})


def _reduction(draw: st.DrawFn, values: list[Value]) -> tuple | None:
    x = _pick(draw, values, lambda v: len(v.shape) >= 1)
    if x is None:
        return None
    dim = draw(st.integers(-len(x.shape), len(x.shape) - 1))
    op = draw(st.sampled_from(["sum.dim_IntList", "amax", "_softmax"]))
    if op == "_softmax":
        return (op, (x, dim, False), {})
    return (op, (x, [dim], draw(st.booleans())), {})


def _matmul(draw: st.DrawFn, values: list[Value]) -> tuple | None:
    a = _pick(draw, values, lambda v: len(v.shape) == 2)
    if a is None:
        return None
    b = _pick(draw, values, lambda v: len(v.shape) == 2 and v.shape[0] == a.shape[1])
    return ("mm", (a, b), {}) if b else None


def _view(draw: st.DrawFn, values: list[Value]) -> tuple | None:
    x = _pick(draw, values, lambda v: len(v.shape) >= 1)
    if x is None:
        return None
    choice = draw(st.sampled_from(["flat", "unsqueeze", "t", "permute"]))
    if choice == "flat":
        return ("view", (x, [x.numel]), {})
    if choice == "unsqueeze":
        return ("unsqueeze", (x, 0), {})
    if choice == "t" and len(x.shape) == 2:
        return ("t", (x,), {})
    return ("permute", (x, list(reversed(range(len(x.shape))))), {})


TEMPLATES: tuple[Template, ...] = (_unary, _scalar, _binary, _reduction, _matmul, _view)


@st.composite
def graphs(draw: st.DrawFn, min_nodes: int = 1, max_nodes: int = 24) -> Graph:
    """A random valid graph of float32 values (inputs have role INPUT, others TEMPORARY)."""
    graph = Graph()
    for i in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.sampled_from(DIMS), min_size=1, max_size=3)))
        graph.inputs.append(Value(f"in{i}", shape, torch.float32, Role.INPUT))
    values = list(graph.inputs)
    meta = torch.device("meta")
    # Meta tensors carry real strides, so a view that would fail at run time is never drawn.
    env = {id(v): torch.empty(v.shape, dtype=v.dtype, device=meta) for v in values}
    for i in range(draw(st.integers(min_nodes, max_nodes))):
        outs = None
        while outs is None:
            spec = draw(st.sampled_from(TEMPLATES))(draw, values)
            if spec is None:
                continue
            node = Node(*spec, [], Phase.FORWARD)
            try:
                outs = run_node(node, env, meta)
            except RuntimeError:
                continue
        node.outputs = [Value(f"v{i}_{j}", tuple(t.shape), t.dtype) for j, t in enumerate(outs)]
        env.update({id(v): t for v, t in zip(node.outputs, outs, strict=True)})
        graph.nodes.append(node)
        values += node.outputs
    produced = [v for n in graph.nodes for v in n.outputs]
    k = draw(st.integers(1, min(3, len(produced))))
    graph.outputs = draw(st.lists(st.sampled_from(produced), min_size=k, max_size=k, unique=True))
    for v in graph.outputs:
        v.role = Role.OUTPUT
    return graph


def random_inputs(graph: Graph, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random tensors for a graph's inputs."""
    gen = torch.Generator().manual_seed(seed)
    return {v.name: torch.randn(v.shape, generator=gen, dtype=v.dtype) for v in graph.inputs}
