"""Fusibility: which nodes may join a fused group, and which groups can be ONE kernel.

A group (tagged by `passes/fusion.py`) is a set of nodes over one *domain* D, the shape every
value in it broadcasts to. Two kernel shapes cover every group:

- pointwise: one program per BLOCK elements of D (flattened); each input is loaded through
  offsets computed from the linear index, so broadcasting needs no materialised copy;
- row-wise: one program per row of D (all dims but the last), BLOCK = next_power_of_2(row). A
  row group may hold any number of reductions over the last dim (sum, mean, amax, softmax,
  log_softmax and their backward, layer_norm) and row gathers/scatters by index; values
  reduced to one per row live in registers as scalars and broadcast back for free.

A node is fusible when `codegen.lowering` has an entry for its op that accepts it; other ops
stay eager nodes, so an unsupported op is slower, never wrong.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

import torch

from compiler.codegen.lowering import (
    CONSTANTS,
    POINTWISE,
    ROW_OPS,
    SMALL_POWERS,
    TL_DTYPES,
    compute_dtype,
    constant_value,
)
from compiler.ir import Graph, Node, Value

MAX_ROW_BLOCK = 32768  # a row is held in registers; longer rows stay eager


class Fit(enum.Enum):
    """How a node can join a fused group."""

    POINTWISE = "pointwise"  # elementwise over its output shape
    ROW = "row"  # needs the whole last dim of its first input in one program
    CONSTANT = "constant"  # a literal filled tensor: a scalar in registers


def fusible(node: Node) -> Fit | None:
    """How `node` may join a group, or None when it must stay an eager node."""
    values = [*node.inputs, *node.outputs]
    if any(v.dtype not in TL_DTYPES for v in values):
        return None
    if node.op in CONSTANTS:
        value = constant_value(node)
        ok = isinstance(value, int | float | bool) and len(node.outputs) == 1
        return Fit.CONSTANT if ok else None
    if node.op in ROW_OPS:
        x = node.args[0]
        ok = isinstance(x, Value) and len(x.shape) >= 1 and ROW_OPS[node.op].accepts(node)
        return Fit.ROW if ok else None
    if node.op in POINTWISE and len(node.outputs) == 1 and _pointwise_ok(node):
        return Fit.POINTWISE
    return None


def _pointwise_ok(node: Node) -> bool:
    spec = POINTWISE[node.op]
    if not spec.bool_ok and torch.bool in (compute_dtype(node), node.outputs[0].dtype):
        return False
    match node.op:
        case "pow.Tensor_Scalar":
            e = node.args[1]
            return isinstance(e, int | float) and (
                not float(e).is_integer() or int(e) in SMALL_POWERS
            )
        case "pow.Scalar":
            return isinstance(node.args[0], int | float) and node.args[0] > 0
        case "gelu" | "gelu_backward":
            return node.kwargs.get("approximate", "none") in ("none", "tanh")
        case "_to_copy":
            return set(node.kwargs) <= {"dtype", "layout", "memory_format"}
    return True


# --- group legality ---------------------------------------------------------------------------


def row_shape(domain: tuple[int, ...]) -> tuple[int, ...]:
    """One value per row of `domain`: its last dim reduced (kept as 1)."""
    return (*domain[:-1], 1)


def store_shape(node: Node, value: Value) -> tuple[int, ...]:
    """The shape a value is indexed by inside a kernel: reductions keep their reduced dim."""
    if node.op in ROW_OPS and ROW_OPS[node.op].reduces:
        return row_shape(node.args[0].shape)
    return value.shape


def pad(shape: tuple[int, ...], rank: int) -> tuple[int, ...] | None:
    return (1,) * (rank - len(shape)) + tuple(shape) if len(shape) <= rank else None


def _broadcasts(shape: tuple[int, ...], domain: tuple[int, ...]) -> bool:
    padded = pad(shape, len(domain))
    return padded is not None and all(s in (1, d) for s, d in zip(padded, domain, strict=True))


def natural_domain(nodes: Sequence[Node], rows: Sequence[Node]) -> tuple[int, ...]:
    """The shape a kernel of `nodes` iterates over: its row ops' input, else the largest output."""
    if rows:
        return rows[0].args[0].shape
    return max((v.shape for n in nodes for v in n.outputs), key=math.prod)


def group_domain(nodes: Sequence[Node], stored: set[int]) -> tuple[int, ...] | None:
    """The domain `nodes` can run over as ONE kernel storing the values in `stored` (ids), or
    None if they cannot (an unfusible op, disagreeing rows, a value that would need a layout
    the kernel does not have)."""
    fits = [fusible(n) for n in nodes]
    if None in fits:
        return None
    rows = [n for n, f in zip(nodes, fits, strict=True) if f is Fit.ROW]
    domain = natural_domain(nodes, rows)
    if rows and (domain[-1] < 2 or next_power_of_2(domain[-1]) > MAX_ROW_BLOCK):
        return None
    if any(n.args[0].shape != domain for n in rows):
        return None
    store_shapes = {id(v): store_shape(n, v) for n in nodes for v in n.outputs}
    for node in nodes:
        for v in node.inputs:
            if id(v) in store_shapes and pad(v.shape, len(domain)) != pad(
                store_shapes[id(v)], len(domain)
            ):
                return None  # a reduced value read with a different alignment than stored
            if not _broadcasts(v.shape, domain):
                return None
        for v in node.outputs:
            shape = store_shapes[id(v)]
            if not _broadcasts(shape, domain):
                return None
            if id(v) in stored and not rows and shape != domain:
                return None
    return domain


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# --- groups in a graph -----------------------------------------------------------------------


def group_members(graph: Graph) -> dict[int, list[Node]]:
    """group id → its nodes, in schedule order."""
    groups: dict[int, list[Node]] = {}
    for node in graph.nodes:
        if node.group is not None:
            groups.setdefault(node.group, []).append(node)
    return groups


def stored_values(graph: Graph) -> dict[int, list[Value]]:
    """group id → its values that must reach memory: read outside the group, or outputs."""
    readers: dict[int, set[int | None]] = {}
    for node in graph.nodes:
        for v in node.inputs:
            readers.setdefault(id(v), set()).add(node.group)
    outputs = {id(v) for v in graph.outputs}
    stored: dict[int, list[Value]] = {}
    for node in graph.nodes:
        if node.group is not None:
            escapes = [
                v
                for v in node.outputs
                if id(v) in outputs or readers.get(id(v), set()) - {node.group}
            ]
            stored.setdefault(node.group, []).extend(escapes)
    return stored
