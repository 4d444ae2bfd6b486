"""Emission: Triton source for fused groups, one readable kernel per group: the domain and
kernel shape from `codegen.fusibility`, the body the group's nodes in order, each lowered by
`codegen.lowering`. Values that never leave the group never touch memory.

Shapes are static, so the domain and every stride are baked into the source as constants;
inputs are expected contiguous. The kernel text names values canonically (in0, t3, out1) so
that identical groups (the same block in every layer) give byte-identical source, compiled once;
`Kernel.header` maps those names back to IR values for a reader. This module only writes
text: it imports neither triton nor a GPU (`runtime/triton_backend.py` compiles and launches).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from compiler.codegen.fusibility import (
    Fit,
    fusible,
    group_domain,
    group_members,
    next_power_of_2,
    pad,
    store_shape,
    stored_values,
)
from compiler.codegen.lowering import CONSTANTS, HELPERS, TL_DTYPES, literal, lower, register_dtype
from compiler.ir import Graph, Node, Value, format_node
from compiler.ops import flops

FLAT_BLOCK = 1024


@dataclass(frozen=True)
class Kernel:
    """One fused group as Triton source, and what the runtime needs to launch it."""

    group: int
    name: str
    source: str  # canonical module text: what is hashed, compiled and cached
    header: str  # which IR value each canonical name stands for (for readers)
    inputs: tuple[Value, ...]  # pointer arguments, in order, then `outputs`
    outputs: tuple[Value, ...]
    domain: tuple[int, ...]
    rowwise: bool
    grid: int
    block: int
    num_warps: int
    ops: tuple[str, ...]
    bytes_moved: int
    flops: int

    @property
    def key(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def readable_source(self) -> str:
        """The source with the IR mapping on top: what `--emit-dir` writes."""
        return self.header + self.source


@dataclass
class Emitter:
    domain: tuple[int, ...]
    rowwise: bool
    lines: list[str] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)
    helpers: set[str] = field(default_factory=set)
    temps: int = 0

    @property
    def n_cols(self) -> int:
        return self.domain[-1]

    def let(self, expr: str, comment: str = "") -> str:
        name = f"t{self.temps}"
        self.temps += 1
        self.lines.append(f"{name} = {expr}" + (f"  # {comment}" if comment else ""))
        return name

    def offset(self, shape: tuple[int, ...]) -> tuple[str, bool]:
        """Element offset of a contiguous tensor of `shape` broadcast over the domain, and
        whether it varies across the lanes of a program (else it is one scalar per program)."""
        padded = pad(shape, len(self.domain))
        assert padded is not None
        if not self.rowwise:
            flat = _linear_offset(padded, self.domain, "offs", 1)
            return flat, flat != "0"
        lead = _linear_offset(padded[:-1], self.domain[:-1], "row", padded[-1])
        if padded[-1] == 1:
            return lead, False
        return ("cols" if lead == "0" else f"{lead} + cols"), True

    def operand(self, arg: object, dtype: torch.dtype | None) -> str:
        if not isinstance(arg, Value):
            return literal(arg)
        name = self.names[id(arg)]
        have = register_dtype(arg.dtype)
        return name if dtype is None or have == dtype else f"{name}.to({TL_DTYPES[dtype]})"


def _linear_offset(shape: tuple[int, ...], domain: tuple[int, ...], var: str, scale: int) -> str:
    """`var` indexes `domain` (row-major); the offset of the same element in a contiguous
    tensor of `shape` (same rank, 1 where broadcast), strides multiplied by `scale`."""
    if shape == domain and scale == 1:
        return var
    terms, d = [], 0
    while d < len(domain):
        if shape[d] == 1:
            d += 1
            continue
        end = d
        while end + 1 < len(domain) and (shape[end + 1] == domain[end + 1]):
            end += 1
        inner, size = math.prod(domain[end + 1 :]), math.prod(domain[d : end + 1])
        term = var if inner == 1 else f"{var} // {inner}"
        if math.prod(domain[:d]) > 1:
            term += f" % {size}"
        stride = math.prod(shape[end + 1 :]) * scale
        terms.append(term if stride == 1 else f"{term} * {stride}")
        d = end + 1
    return " + ".join(terms) or "0"


def emit(group: int, nodes: Sequence[Node], stored: Sequence[Value]) -> Kernel:
    """The kernel computing `nodes` (one group, in schedule order) and storing `stored`."""
    stored_ids = {id(v) for v in stored}
    domain = group_domain(nodes, stored_ids)
    if domain is None:
        raise ValueError(f"group {group} cannot be one kernel: {[n.op for n in nodes]}")
    rowwise = any(fusible(n) is Fit.ROW for n in nodes)
    e = Emitter(domain, rowwise)
    produced = {id(v) for n in nodes for v in n.outputs}
    inputs: list[Value] = []
    for node in nodes:
        reads = [] if fusible(node) is Fit.CONSTANT else node.inputs
        inputs += [v for v in reads if id(v) not in produced and v not in inputs]
    header = [f"# group {group}: {'row-wise' if rowwise else 'pointwise'} over {list(domain)}"]
    loads = []
    for i, v in enumerate(inputs):
        e.names[id(v)] = f"x{i}"
        off, varies = e.offset(v.shape)
        where = f"in{i}" if off == "0" else f"in{i} + {off}"
        masked = ", mask, other=0" if varies else ""
        cast = ".to(tl.float32)" if register_dtype(v.dtype) != v.dtype else ""
        loads.append(f"x{i} = tl.load({where}{masked}){cast}")
        header.append(f"#   in{i}  = %{v.name}: {v.type_str}")
    for node in nodes:
        comment = node.op
        outs = lower(e, node)
        for v, expr in zip(node.outputs, outs, strict=True):
            if register_dtype(v.dtype) != v.dtype:  # round as eager does, compute on in fp32
                expr = f"({expr}).to({TL_DTYPES[v.dtype]}).to(tl.float32)"
            e.names[id(v)] = expr if expr.isidentifier() else e.let(expr, comment)
            comment = ""
        header.append(
            f"#   {', '.join(e.names[id(v)] for v in node.outputs)} <- {format_node(node)}"
        )
    stores = []
    for i, v in enumerate(stored):
        off, varies = e.offset(store_shape(_producer(nodes, v), v))
        where = f"out{i}" if off == "0" else f"out{i} + {off}"
        stores.append(f"tl.store({where}, {e.names[id(v)]}{', mask' if varies else ''})")
        header.append(f"#   out{i} = %{v.name}: {v.type_str}")

    if rowwise:
        block, grid = next_power_of_2(domain[-1]), math.prod(domain[:-1])
        rows = ["row = tl.program_id(0).to(tl.int64)", "cols = tl.arange(0, BLOCK)"]
        prologue = [*rows, f"mask = cols < {domain[-1]}"]
    else:
        block = min(FLAT_BLOCK, next_power_of_2(math.prod(domain)))
        grid = math.ceil(math.prod(domain) / block)
        offs = "offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)"
        prologue = [offs, f"mask = offs < {math.prod(domain)}"]
    name = _kernel_name(nodes, rowwise)
    params = [f"in{i}" for i in range(len(inputs))] + [f"out{i}" for i in range(len(stored))]
    body = "\n".join(f"    {line}" for line in prologue + loads + e.lines + stores)
    source = "\n\n".join(
        ["import triton\nimport triton.language as tl\n"]
        + [HELPERS[h] for h in sorted(e.helpers)]
        + [f"@triton.jit\ndef {name}({', '.join([*params, 'BLOCK: tl.constexpr'])}):\n{body}\n"]
    )
    return Kernel(
        group=group,
        name=name,
        source=source,
        header="\n".join(header) + "\n\n",
        inputs=tuple(inputs),
        outputs=tuple(stored),
        domain=domain,
        rowwise=rowwise,
        grid=grid,
        block=block,
        num_warps=8 if block >= 2048 else 4,
        ops=tuple(n.op for n in nodes),
        bytes_moved=sum(v.nbytes for v in (*inputs, *stored)),
        flops=sum(flops(n) for n in nodes if n.op not in CONSTANTS),
    )


def _producer(nodes: Sequence[Node], value: Value) -> Node:
    return next(n for n in nodes if any(v is value for v in n.outputs))


def _kernel_name(nodes: Sequence[Node], rowwise: bool) -> str:
    """Deterministic from the ops alone (row ops first), so equal groups get equal names."""
    ops = [n.op for n in nodes if fusible(n) is Fit.ROW] + [n.op for n in nodes]
    short: list[str] = []
    for op in ops:
        word = op.split(".")[0].strip("_")
        if word not in short and op not in CONSTANTS:
            short.append(word)
    return f"{'row' if rowwise else 'pointwise'}_{'_'.join(short[:3])}"


def group_kernels(graph: Graph) -> list[Kernel]:
    """One kernel per fused group of `graph`, in schedule order."""
    stored = stored_values(graph)
    return [emit(group, members, stored[group]) for group, members in group_members(graph).items()]
