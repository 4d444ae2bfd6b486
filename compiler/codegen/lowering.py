"""Lowering: each fusible ATen op as Triton (`tl`) expressions, ONE table entry per op.

A pointwise op maps its operands (cast to the compute dtype; literals as text) to one
expression; a row op (over the last dim) says which nodes it accepts and writes its
expressions into the kernel body, where reduced values live as one scalar per row. Each op
computes in its result dtype so it matches eager PyTorch (fp16/bf16 in fp32, rounded, as
ATen's kernels do).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from compiler.ir import Node, Value

if TYPE_CHECKING:
    from compiler.codegen.triton import Emitter as Body

TL_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "tl.float64",
    torch.float32: "tl.float32",
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.int64: "tl.int64",
    torch.int32: "tl.int32",
    torch.int16: "tl.int16",
    torch.int8: "tl.int8",
    torch.uint8: "tl.uint8",
    torch.bool: "tl.int1",
}

# Helpers written with tl only, so the same source runs natively and under TRITON_INTERPRET=1
# (the interpreter has no libdevice).
HELPERS: dict[str, str] = {
    "_tanh": (
        "@triton.jit\n"
        "def _tanh(x):\n"
        "    # 1 - 2 / (e^2x + 1): exact limits at ±inf, abs error ~1e-7 near 0\n"
        "    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)\n"
    ),
}


def _arg(node: Node, i: int, name: str, default: object = None) -> object:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def register_dtype(dtype: torch.dtype) -> torch.dtype:
    """Low-precision floats are computed in fp32 and rounded only when stored."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def literal(x: object) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return f'float("{x}")'
    return repr(x)


# --- pointwise ops ------------------------------------------------------------------------
# Each entry maps prepared operands (values cast to the compute dtype, literals as text) to
# one tl expression. `keep` lists argument positions left in their own dtype (masks).

Expr = Callable[[list[str], Node], str]


@dataclass(frozen=True)
class Pointwise:
    expr: Expr
    keep: frozenset[int] = frozenset()
    promote: bool = False  # compute in the inputs' promoted dtype, not the result's (compares)
    helpers: tuple[str, ...] = ()
    bool_ok: bool = False  # meaningful on bool operands


def _add_like(sign: str) -> Expr:
    def expr(a: list[str], n: Node) -> str:
        alpha = n.kwargs.get("alpha", 1)
        rhs = a[1] if alpha == 1 else f"{literal(alpha)} * {a[1]}"
        return f"{a[0]} {sign} {rhs}"

    return expr


def _infix(op: str) -> Expr:
    return lambda a, n: f"{a[0]} {op} {a[1]}"


def _call(fn: str, arity: int = 1) -> Expr:
    return lambda a, n: f"{fn}({', '.join(a[:arity])})"


def _gelu(a: list[str], n: Node) -> str:
    x = a[0]
    if n.kwargs.get("approximate", "none") == "tanh":
        return f"0.5 * {x} * (1.0 + _tanh(0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})))"
    return f"0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476))"


def _gelu_backward(a: list[str], n: Node) -> str:
    g, x = a[0], a[1]
    if n.kwargs.get("approximate", "none") == "tanh":
        inner = f"_tanh(0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x}))"
        return (
            f"{g} * (0.5 * (1.0 + {inner}) + 0.5 * {x} * (1.0 - {inner} * {inner})"
            f" * 0.7978845608028654 * (1.0 + 0.134145 * {x} * {x}))"
        )
    cdf = f"0.5 * (1.0 + tl.erf({x} * 0.7071067811865476))"
    return f"{g} * ({cdf} + {x} * tl.exp(-0.5 * {x} * {x}) * 0.3989422804014327)"


# integer exponents unrolled into products, right for any sign of the base (x**0 is left to
# ATen: 1 even for nan, which no product gives)
SMALL_POWERS = (-4, -3, -2, -1, 1, 2, 3, 4)


def _pow_tensor_scalar(a: list[str], n: Node) -> str:
    x, e = a[0], n.args[1]
    if e == 0.5:
        return f"tl.sqrt({x})"
    if e == -0.5:
        return f"tl.rsqrt({x})"
    if float(e).is_integer() and int(e) in SMALL_POWERS:
        product = " * ".join([x] * abs(int(e)))
        return product if e > 0 else f"1.0 / ({product})"
    return f"tl.exp({literal(float(e))} * tl.log({x}))"  # non-integer: NaN below 0, as torch


def _pow_scalar(a: list[str], n: Node) -> str:
    base = float(n.args[0])
    return f"tl.exp({a[1]} * {literal(math.log(base))})  # {base!r} ** x"


def _nan_max(fn: str, a: str, b: str) -> str:
    """tl.maximum/minimum returning nan when either side is (torch's rule; ints ignore it)."""
    return f"tl.{fn}({a}, {b}, propagate_nan=tl.PropagateNan.ALL)"


def _clamp(a: list[str], n: Node) -> str:
    x, lo, hi = a[0], _arg(n, 1, "min"), _arg(n, 2, "max")
    if lo is not None:
        x = _nan_max("maximum", x, literal(lo))
    if hi is not None:
        x = _nan_max("minimum", x, literal(hi))
    return x


def _lerp(a: list[str], n: Node) -> str:
    start, end, w = a
    return (
        f"tl.where(tl.abs({w}) < 0.5, {start} + {w} * ({end} - {start}),"
        f" {end} - ({end} - {start}) * (1.0 - {w}))"
    )


def _not(a: list[str], n: Node) -> str:
    return f"{a[0]} == 0" if n.args[0].dtype == torch.bool else f"~{a[0]}"


_MASKED_FILL = Pointwise(lambda a, n: f"tl.where({a[1]}, {a[2]}, {a[0]})", keep=frozenset({1}))
POINTWISE: dict[str, Pointwise] = {
    "abs": Pointwise(_call("tl.abs")),
    "add.Tensor": Pointwise(_add_like("+")),
    "add.Scalar": Pointwise(_add_like("+")),
    "sub.Tensor": Pointwise(_add_like("-")),
    "sub.Scalar": Pointwise(_add_like("-")),
    "mul.Tensor": Pointwise(_infix("*")),
    "mul.Scalar": Pointwise(_infix("*")),
    "div.Tensor": Pointwise(_infix("/")),
    "div.Scalar": Pointwise(_infix("/")),
    "neg": Pointwise(lambda a, n: f"-{a[0]}"),
    "exp": Pointwise(_call("tl.exp")),
    "log": Pointwise(_call("tl.log")),
    "sqrt": Pointwise(_call("tl.sqrt")),
    "rsqrt": Pointwise(_call("tl.rsqrt")),
    "reciprocal": Pointwise(lambda a, n: f"1.0 / {a[0]}"),
    "pow.Tensor_Scalar": Pointwise(_pow_tensor_scalar),
    "pow.Scalar": Pointwise(_pow_scalar),
    "tanh": Pointwise(_call("_tanh"), helpers=("_tanh",)),
    "sigmoid": Pointwise(_call("tl.sigmoid")),
    "erf": Pointwise(_call("tl.erf")),
    "sin": Pointwise(_call("tl.sin")),
    "cos": Pointwise(_call("tl.cos")),
    "relu": Pointwise(lambda a, n: _nan_max("maximum", a[0], "0")),
    "gelu": Pointwise(_gelu, helpers=("_tanh",)),
    "gelu_backward": Pointwise(_gelu_backward, helpers=("_tanh",)),
    "silu": Pointwise(lambda a, n: f"{a[0]} * tl.sigmoid({a[0]})"),
    "silu_backward": Pointwise(
        lambda a, n: f"{a[0]} * tl.sigmoid({a[1]}) * (1.0 + {a[1]} * (1.0 - tl.sigmoid({a[1]})))"
    ),
    "sigmoid_backward": Pointwise(lambda a, n: f"{a[0]} * (1.0 - {a[1]}) * {a[1]}"),
    "tanh_backward": Pointwise(lambda a, n: f"{a[0]} * (1.0 - {a[1]} * {a[1]})"),
    "threshold_backward": Pointwise(lambda a, n: f"tl.where({a[1]} <= {a[2]}, 0, {a[0]})"),
    "where.self": Pointwise(_call("tl.where", 3), keep=frozenset({0}), bool_ok=True),
    "clamp": Pointwise(_clamp),
    "clamp_min": Pointwise(lambda a, n: _nan_max("maximum", a[0], a[1])),
    "clamp_max": Pointwise(lambda a, n: _nan_max("minimum", a[0], a[1])),
    "maximum": Pointwise(lambda a, n: _nan_max("maximum", a[0], a[1])),
    "minimum": Pointwise(lambda a, n: _nan_max("minimum", a[0], a[1])),
    "lerp.Scalar": Pointwise(_lerp),
    "lerp.Tensor": Pointwise(_lerp),
    "addcmul": Pointwise(
        lambda a, n: f"{a[0]} + {literal(n.kwargs.get('value', 1))} * {a[1]} * {a[2]}"
    ),
    "addcdiv": Pointwise(
        lambda a, n: f"{a[0]} + {literal(n.kwargs.get('value', 1))} * ({a[1]} / {a[2]})"
    ),
    "masked_fill.Scalar": _MASKED_FILL,
    "masked_fill.Tensor": _MASKED_FILL,
    "isnan": Pointwise(lambda a, n: f"{a[0]} != {a[0]}", promote=True, bool_ok=True),
    "isinf": Pointwise(lambda a, n: f'tl.abs({a[0]}) == float("inf")', promote=True, bool_ok=True),
    "bitwise_not": Pointwise(_not, bool_ok=True),
    "logical_not": Pointwise(lambda a, n: f"{a[0]} == 0", promote=True, bool_ok=True),
    "bitwise_and.Tensor": Pointwise(_infix("&"), bool_ok=True),
    "bitwise_or.Tensor": Pointwise(_infix("|"), bool_ok=True),
    "logical_and": Pointwise(
        lambda a, n: f"({a[0]} != 0) & ({a[1]} != 0)", promote=True, bool_ok=True
    ),
    "expand": Pointwise(lambda a, n: a[0], bool_ok=True),  # broadcasting is implicit here
    "_to_copy": Pointwise(lambda a, n: a[0], bool_ok=True),  # cast done by operand prep
}
for _op, _sym in [("eq", "=="), ("ne", "!="), ("lt", "<"), ("gt", ">"), ("le", "<="), ("ge", ">=")]:
    for _variant in ("Scalar", "Tensor"):
        POINTWISE[f"{_op}.{_variant}"] = Pointwise(_infix(_sym), promote=True, bool_ok=True)

CONSTANTS = {"scalar_tensor": 0, "full": 1, "full_like": 1, "zeros_like": None, "ones_like": None}


def constant_value(node: Node) -> object:
    pos = CONSTANTS[node.op]
    if pos is None:
        return 0 if node.op == "zeros_like" else 1
    return node.args[pos]


def compute_dtype(node: Node) -> torch.dtype:
    """The dtype torch computes `node` in: its result's, or the inputs' promotion for compares."""
    if not POINTWISE[node.op].promote:
        return register_dtype(node.outputs[0].dtype)
    meta = [
        torch.empty(a.shape, dtype=a.dtype, device="meta") if isinstance(a, Value) else a
        for a in node.args
        if isinstance(a, Value | int | float | bool)
    ]
    dtype = meta[0].dtype if len(meta) == 1 else torch.result_type(*meta[:2])
    return register_dtype(dtype)


# --- row ops: reductions over the last dim, and gathers/scatters along it --------------------


def _last_dim_only(node: Node, dims: object) -> bool:
    rank = len(node.args[0].shape)
    if dims is None or dims == []:
        return rank == 1
    dims = dims if isinstance(dims, list | tuple) else [dims]
    return [d % rank for d in dims] == [rank - 1]


def _row_index_ok(node: Node) -> bool:
    x, index = node.args[0], node.args[2]
    return (
        _last_dim_only(node, node.args[1])
        and isinstance(index, Value)
        and index.shape == (*x.shape[:-1], 1)
        and not node.kwargs
    )


NEG_INF, POS_INF = 'float("-inf")', 'float("inf")'


def _masked(x: str, fill: str) -> str:
    """Masked-off lanes hold the reduction's identity, whatever the body computed there."""
    return f"tl.where(mask, {x}, {fill})"


def _softmax(e: Body, node: Node, log: bool) -> list[str]:
    x = e.operand(node.args[0], register_dtype(node.outputs[0].dtype))
    m = e.let(f"tl.max({_masked(x, NEG_INF)}, axis=0)", "row max")
    if log:
        s = e.let(f"tl.sum({_masked(f'tl.exp({x} - {m})', '0.0')}, axis=0)")
        return [f"{x} - {m} - tl.log({s})"]
    ex = e.let(f"tl.exp({x} - {m})")
    s = e.let(f"tl.sum({_masked(ex, '0.0')}, axis=0)")
    return [f"{ex} / {s}"]


def _softmax_backward(e: Body, node: Node, log: bool) -> list[str]:
    dtype = register_dtype(node.outputs[0].dtype)
    g, y = e.operand(node.args[0], dtype), e.operand(node.args[1], dtype)
    if log:
        s = e.let(f"tl.sum({_masked(g, '0.0')}, axis=0)")
        return [f"{g} - tl.exp({y}) * {s}"]
    s = e.let(f"tl.sum({_masked(f'{g} * {y}', '0.0')}, axis=0)")
    return [f"{y} * ({g} - {s})"]


def _layer_norm(e: Body, node: Node) -> list[str]:
    dtype = register_dtype(node.outputs[0].dtype)
    x, weight, bias, eps = node.args[0], node.args[2], node.args[3], node.args[4]
    xs = e.operand(x, dtype)
    mean = e.let(f"tl.sum({_masked(xs, '0.0')}, axis=0) / {e.n_cols}", "mean")
    centered = e.let(_masked(f"{xs} - {mean}", "0.0"))
    var = e.let(f"tl.sum({centered} * {centered}, axis=0) / {e.n_cols}", "biased variance")
    rstd = e.let(f"tl.rsqrt({var} + {literal(eps)})")
    y = f"{centered} * {rstd}"
    if weight is not None:
        y += f" * {e.operand(weight, dtype)}"
    if bias is not None:
        y += f" + {e.operand(bias, dtype)}"
    return [y, mean, rstd]


def _gather(e: Body, node: Node) -> list[str]:
    x = e.operand(node.args[0], register_dtype(node.outputs[0].dtype))
    index = e.operand(node.args[2], None)
    return [f"tl.sum(tl.where(cols == {index}, {x}, 0), axis=0)"]


def _scatter(e: Body, node: Node) -> list[str]:
    dtype = register_dtype(node.outputs[0].dtype)
    base, index = e.operand(node.args[0], dtype), e.operand(node.args[2], None)
    value = literal(node.args[3])
    return [f"tl.where(cols == {index}, {value}, {base})"]


@dataclass(frozen=True)
class _Row:
    accepts: Callable[[Node], bool]  # the node's dims and operands fit one row per program
    lower: Callable[[Body, Node], list[str]]  # expressions for each output
    reduces: bool = False  # its output keeps the reduced last dim as 1 (not softmax-like)


def _reduction(fn: str, fill: str, mean: bool = False) -> _Row:
    """sum, mean, amax, amin over the last dim; masked lanes hold the identity `fill`."""

    def accepts(n: Node) -> bool:
        floats = fn == "sum" or n.args[0].dtype.is_floating_point
        return _last_dim_only(n, _arg(n, 1, "dim")) and floats

    def lower_(e: Body, node: Node) -> list[str]:
        x = e.operand(node.args[0], register_dtype(node.outputs[0].dtype))
        total = f"tl.{fn}({_masked(x, fill)}, axis=0)"
        return [f"{total} / {e.n_cols}" if mean else total]

    return _Row(accepts, lower_, reduces=True)


def _softmax_row(log: bool) -> _Row:
    return _Row(
        lambda n: _last_dim_only(n, n.args[1]) and not n.args[2],
        lambda e, n: _softmax(e, n, log),
    )


def _softmax_backward_row(log: bool) -> _Row:
    return _Row(
        lambda n: _last_dim_only(n, n.args[2]) and n.args[1].shape == n.args[0].shape,
        lambda e, n: _softmax_backward(e, n, log),
    )


ROW_OPS: dict[str, _Row] = {
    "sum.dim_IntList": _reduction("sum", "0"),
    "mean.dim": _reduction("sum", "0", mean=True),
    "amax": _reduction("max", NEG_INF),
    "amin": _reduction("min", POS_INF),
    "_softmax": _softmax_row(log=False),
    "_log_softmax": _softmax_row(log=True),
    "_softmax_backward_data": _softmax_backward_row(log=False),
    "_log_softmax_backward_data": _softmax_backward_row(log=True),
    "native_layer_norm": _Row(lambda n: list(n.args[1]) == [n.args[0].shape[-1]], _layer_norm),
    "gather": _Row(_row_index_ok, _gather),
    "scatter.value": _Row(_row_index_ok, _scatter),
}


def lower(e: Body, node: Node) -> list[str]:
    """tl expressions for each output of fusible `node`; may add temporaries to `e`."""
    if node.op in CONSTANTS:
        out = node.outputs[0]
        value = constant_value(node)
        return [f"tl.full([], {literal(value)}, {TL_DTYPES[register_dtype(out.dtype)]})"]
    if node.op in ROW_OPS:
        return ROW_OPS[node.op].lower(e, node)
    spec = POINTWISE[node.op]
    dtype = compute_dtype(node)
    e.helpers.update(spec.helpers)
    if node.op == "_to_copy":
        target = register_dtype(node.kwargs.get("dtype", node.outputs[0].dtype))
        return [e.operand(node.args[0], target)]
    operands = [e.operand(a, None if i in spec.keep else dtype) for i, a in enumerate(node.args)]
    return [spec.expr(operands, node)]
