"""The closed op set of memfit's IR, and what each op costs.

IR op names are ATen overload names written short: `mm` for `aten.mm.default`, `sum.dim_IntList`
for `aten.sum.dim_IntList`. An op outside this table is rejected at trace time with the user's
source line: every later pass (fusion, recompute, codegen) knows how to treat every op here.
"""

from __future__ import annotations

import enum
import math
from functools import cache
from typing import TYPE_CHECKING

import torch

from compiler import attention, collectives, custom_ops, offload_op, update_op

if TYPE_CHECKING:
    from compiler.ir import Node, Value


class Kind(enum.StrEnum):
    POINTWISE = "pointwise"  # elementwise, broadcasting: cheap to recompute, fusible
    REDUCTION = "reduction"  # reduces (or normalises) along dims: fusible as a group root
    MATMUL = "matmul"  # K-loop; never recomputed by default, a fusion boundary
    VIEW = "view"  # aliases its input: no bytes of its own
    INDEX = "index"  # gathers / scatters by integer indices
    CREATION = "creation"  # makes a tensor from literals; needs a device at run time
    COPY = "copy"  # materialises a new buffer with the same elements
    WRITE = "write"  # writes in place into a persistent value (parameter update)
    COLLECTIVE = "collective"  # torch.distributed across ranks (compiler/collectives.py)


_POINTWISE = [
    "abs",
    "add.Tensor",
    "add.Scalar",
    "sub.Tensor",
    "sub.Scalar",
    "mul.Tensor",
    "mul.Scalar",
    "div.Tensor",
    "div.Scalar",
    "div.Tensor_mode",
    "neg",
    "exp",
    "log",
    "log1p",
    "expm1",
    "sqrt",
    "rsqrt",
    "reciprocal",
    "pow.Tensor_Scalar",
    "pow.Tensor_Tensor",
    "pow.Scalar",
    "tanh",
    "sigmoid",
    "erf",
    "sin",
    "cos",
    "relu",
    "gelu",
    "gelu_backward",
    "silu",
    "silu_backward",
    "sigmoid_backward",
    "tanh_backward",
    "threshold_backward",
    "where.self",
    "clamp",
    "clamp_min",
    "clamp_max",
    "maximum",
    "minimum",
    "eq.Scalar",
    "eq.Tensor",
    "ne.Scalar",
    "ne.Tensor",
    "lt.Scalar",
    "lt.Tensor",
    "gt.Scalar",
    "gt.Tensor",
    "le.Scalar",
    "le.Tensor",
    "ge.Scalar",
    "ge.Tensor",
    "bitwise_not",
    "bitwise_and.Tensor",
    "bitwise_or.Tensor",
    "logical_not",
    "logical_and",
    "sign",
    "round",
    "lerp.Scalar",
    "lerp.Tensor",
    "addcmul",
    "addcdiv",
    "masked_fill.Scalar",
    "masked_fill.Tensor",
    "_to_copy",
    "isnan",
    "isinf",
    "fmod.Scalar",
    "remainder.Scalar",
]
_REDUCTION = [
    "sum",
    "sum.dim_IntList",
    "mean.dim",
    "mean",
    "amax",
    "amin",
    "max.dim",
    "min.dim",
    "argmax",
    "argmin",
    "prod.dim_int",
    "var.correction",
    "var_mean.correction",
    "_softmax",
    "_log_softmax",
    "_softmax_backward_data",
    "_log_softmax_backward_data",
    "native_layer_norm",
    "any.dim",
    "all.dim",
    "cumsum",
]
_MATMUL = ["mm", "bmm", "addmm"]
_VIEW = [
    "view",
    "_unsafe_view",
    "permute",
    "expand",
    "unsqueeze",
    "squeeze.dims",
    "squeeze.dim",
    "squeeze",
    "t",
    "transpose.int",
    "slice.Tensor",
    "select.int",
    "alias",
    "split.Tensor",
    "split_with_sizes",
    "unbind.int",
    "diagonal",
    "as_strided",
]
_INDEX = [
    "embedding",
    "embedding_dense_backward",
    "gather",
    "scatter.value",
    "scatter.src",
    "scatter_add",
    "index_select",
    "index.Tensor",
    "index_put",
    "index_add",
    "slice_scatter",
    "select_scatter",
    "topk",  # mixture-of-experts routing: k is static, so the graph stays static
]
_CREATION = [
    "full",
    "full_like",
    "zeros",
    "zeros_like",
    "ones",
    "ones_like",
    "scalar_tensor",
    "arange.start_step",
    "iota",
    "empty.memory_format",
]  # noqa: E501
_COPY = ["clone", "cat", "constant_pad_nd", "stack", "lift_fresh_copy"]
_WRITE = ["copy_"]

OP_KINDS: dict[str, Kind] = {
    name: kind
    for names, kind in [
        (_POINTWISE, Kind.POINTWISE),
        (_REDUCTION, Kind.REDUCTION),
        (_MATMUL, Kind.MATMUL),
        (_VIEW, Kind.VIEW),
        (_INDEX, Kind.INDEX),
        (_CREATION, Kind.CREATION),
        (_COPY, Kind.COPY),
        (_WRITE, Kind.WRITE),
        ([update_op.UPDATE], Kind.WRITE),  # chunked in-place optimizer update
        (list(offload_op.OPS), Kind.WRITE),  # the update queued on the host, and its wait
        (list(custom_ops.OPS), Kind.MATMUL),  # memfit's fused linear + cross-entropy
        (list(attention.OPS), Kind.MATMUL),  # memfit's attention: O(T) saved, FLOPs of matmuls
        ([op for op in collectives.OPS if op != collectives.WAIT], Kind.COLLECTIVE),
        ([collectives.WAIT], Kind.VIEW),  # returns its input once the data has arrived
    ]
    for name in names
}


def ir_name(overload: torch._ops.OpOverload) -> str:
    """`aten.sum.dim_IntList` → `sum.dim_IntList`; `aten.mm.default` → `mm`."""
    if overload.namespace == "memfit":  # memfit's own ops keep their namespace
        return overload.name()
    packet, _, variant = overload.name().partition("::")[2].partition(".")
    return packet if variant in ("", "default") else f"{packet}.{variant}"


@cache
def resolve(op: str) -> torch._ops.OpOverload:
    """The ATen overload an IR op name stands for."""
    if op not in OP_KINDS:
        raise KeyError(f"op {op!r} is not in memfit's op set")
    if op in custom_ops.OPS:
        return custom_ops.OPS[op]
    if op in attention.OPS:
        return attention.OPS[op]
    if op in collectives.OPS:
        return collectives.OPS[op]
    if op == update_op.UPDATE:
        return torch.ops.memfit.update.default
    if op in offload_op.OPS:
        return getattr(torch.ops.memfit, op.removeprefix("memfit::")).default
    packet, _, variant = op.partition(".")
    return getattr(getattr(torch.ops.aten, packet), variant or "default")


@cache
def out_variant(op: str) -> tuple[torch._ops.OpOverload, tuple[str, ...]] | None:
    """The `out=` overload taking exactly `op`'s arguments, and its out argument names."""
    f = resolve(op)
    want = [(a.name, str(a.type)) for a in f._schema.arguments]
    for name in f.overloadpacket.overloads():
        g = getattr(f.overloadpacket, name)
        outs = tuple(a.name for a in g._schema.arguments if a.is_out)
        ins = [(a.name, str(a.type)) for a in g._schema.arguments if not a.is_out]
        if outs and ins == want:
            return g, outs
    return None


def kind(op: str) -> Kind:
    return OP_KINDS[op]


def written(node: Node) -> list[Value]:
    """The persistent values a WRITE node changes in place (`copy_`: its first argument;
    `memfit::update`: its list of targets; `memfit::host_update`: the host states, its targets
    change at the `memfit::host_update_wait`, which writes its first list)."""
    if node.op == update_op.UPDATE or node.op == offload_op.HOST_WAIT:
        return list(node.args[0])
    if node.op == offload_op.HOST_UPDATE:
        return list(node.args[1])
    return [node.args[0]] if kind(node.op) is Kind.WRITE else []


def flops(node: Node) -> int:
    """Floating-point operations of one node: 2·M·N·K for matmuls, ~1 per element otherwise."""
    k = OP_KINDS[node.op]
    if node.op in custom_ops.OPS:
        return custom_ops.flops(node)
    if node.op == update_op.UPDATE:
        return update_op.flops(node)
    if node.op == offload_op.HOST_UPDATE:
        return offload_op.flops(node)
    if node.op in attention.OPS:
        return attention.flops(node)
    if k is Kind.MATMUL:
        a, b = node.args[1:3] if node.op == "addmm" else node.args[:2]
        batch = math.prod(a.shape[:-2])
        m, kk = a.shape[-2:]
        n = b.shape[-1]
        return 2 * batch * m * n * kk
    if k in (Kind.VIEW, Kind.CREATION, Kind.WRITE, Kind.INDEX, Kind.COPY, Kind.COLLECTIVE):
        return 0
    work = max([v.numel for v in node.inputs] + [v.numel for v in node.outputs] + [0])
    return work * (5 if k is Kind.REDUCTION else 1)


def workspace_bytes(node: Node) -> int:
    """Scratch memfit's own ops hold outside the arena while they run (0 for ATen ops, whose
    own scratch is small and not modelled)."""
    if node.op in custom_ops.OPS:
        return custom_ops.workspace_bytes(node)
    if node.op in attention.OPS:
        return attention.workspace_bytes(node)
    if node.op == update_op.UPDATE:
        return update_op.workspace_bytes(node)
    return 0


# memfit's own ops' computations writing into given outputs: the arena's form of them (out=).
INTO = custom_ops.INTO | attention.INTO
