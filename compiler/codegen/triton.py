"""Triton source for fused groups: one readable kernel per group, from the group's ATen body.

A group (tagged by `passes/fusion.py`) is a set of nodes over one *domain* D, the shape every
value in it broadcasts to. Two kernel shapes cover every group:

- pointwise: one program per BLOCK elements of D (flattened); each input is loaded through
  offsets computed from the linear index, so broadcasting needs no materialised copy;
- row-wise: one program per row of D (all dims but the last), BLOCK = next_power_of_2(row). A
  row group may hold any number of reductions over the last dim (sum, mean, amax, softmax,
  log_softmax and their backward, layer_norm) and row gathers/scatters by index; values
  reduced to one per row live in registers as scalars and broadcast back for free.

The body is the group's nodes in order, each ATen op mapped to a `tl` expression, computed in
the op's own result dtype so it matches eager PyTorch (fp16/bf16 ops compute in fp32 and round
their result, as ATen's CPU and CUDA kernels do). Values that never
leave the group never touch memory. Ops outside the tables here are not fusible: they stay
eager nodes, so an unsupported op is slower, never wrong.

Shapes are static, so the domain and every stride are baked into the source as constants;
inputs are expected contiguous. The kernel text names values canonically (in0, t3, out1) so
that identical groups (the same block in every layer) give byte-identical source, compiled once;
`Kernel.header` maps those names back to IR values for a reader. This module only writes
text: it imports neither triton nor a GPU (`runtime/triton_backend.py` compiles and launches).
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from compiler.ir import Graph, Node, Value, format_node
from compiler.ops import flops

FLAT_BLOCK = 1024
MAX_ROW_BLOCK = 32768  # a row is held in registers; longer rows stay eager

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


class Fit(enum.Enum):
    """How a node can join a fused group."""

    POINTWISE = "pointwise"  # elementwise over its output shape
    ROW = "row"  # needs the whole last dim of its first input in one program
    CONSTANT = "constant"  # a literal filled tensor: a scalar in registers


def _arg(node: Node, i: int, name: str, default: object = None) -> object:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _register_dtype(dtype: torch.dtype) -> torch.dtype:
    """Low-precision floats are computed in fp32 and rounded only when stored."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _literal(x: object) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return f'float("{x}")'
    return repr(x)


# --- pointwise ops ------------------------------------------------------------------------
# Each entry maps prepared operands (values cast to the compute dtype, literals as text) to
# one tl expression. `keep` lists argument positions left in their own dtype (masks).

Expr = Callable[[list[str], Node], str]


@dataclass(frozen=True)
class _Pointwise:
    expr: Expr
    keep: frozenset[int] = frozenset()
    promote: bool = False  # compute in the inputs' promoted dtype, not the result's (compares)
    helpers: tuple[str, ...] = ()
    bool_ok: bool = False  # meaningful on bool operands


def _add_like(sign: str) -> Expr:
    def expr(a: list[str], n: Node) -> str:
        alpha = n.kwargs.get("alpha", 1)
        rhs = a[1] if alpha == 1 else f"{_literal(alpha)} * {a[1]}"
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
_SMALL_POWERS = (-4, -3, -2, -1, 1, 2, 3, 4)


def _pow_tensor_scalar(a: list[str], n: Node) -> str:
    x, e = a[0], n.args[1]
    if e == 0.5:
        return f"tl.sqrt({x})"
    if e == -0.5:
        return f"tl.rsqrt({x})"
    if float(e).is_integer() and int(e) in _SMALL_POWERS:
        product = " * ".join([x] * abs(int(e)))
        return product if e > 0 else f"1.0 / ({product})"
    return f"tl.exp({_literal(float(e))} * tl.log({x}))"  # non-integer: NaN below 0, as torch


def _pow_scalar(a: list[str], n: Node) -> str:
    base = float(n.args[0])
    return f"tl.exp({a[1]} * {_literal(math.log(base))})  # {base!r} ** x"


def _nan_max(fn: str, a: str, b: str) -> str:
    """tl.maximum/minimum returning nan when either side is (torch's rule; ints ignore it)."""
    return f"tl.{fn}({a}, {b}, propagate_nan=tl.PropagateNan.ALL)"


def _clamp(a: list[str], n: Node) -> str:
    x, lo, hi = a[0], _arg(n, 1, "min"), _arg(n, 2, "max")
    if lo is not None:
        x = _nan_max("maximum", x, _literal(lo))
    if hi is not None:
        x = _nan_max("minimum", x, _literal(hi))
    return x


def _lerp(a: list[str], n: Node) -> str:
    start, end, w = a
    return (
        f"tl.where(tl.abs({w}) < 0.5, {start} + {w} * ({end} - {start}),"
        f" {end} - ({end} - {start}) * (1.0 - {w}))"
    )


def _not(a: list[str], n: Node) -> str:
    return f"{a[0]} == 0" if n.args[0].dtype == torch.bool else f"~{a[0]}"


POINTWISE: dict[str, _Pointwise] = {
    "abs": _Pointwise(_call("tl.abs")),
    "add.Tensor": _Pointwise(_add_like("+")),
    "add.Scalar": _Pointwise(_add_like("+")),
    "sub.Tensor": _Pointwise(_add_like("-")),
    "sub.Scalar": _Pointwise(_add_like("-")),
    "mul.Tensor": _Pointwise(_infix("*")),
    "mul.Scalar": _Pointwise(_infix("*")),
    "div.Tensor": _Pointwise(_infix("/")),
    "div.Scalar": _Pointwise(_infix("/")),
    "neg": _Pointwise(lambda a, n: f"-{a[0]}"),
    "exp": _Pointwise(_call("tl.exp")),
    "log": _Pointwise(_call("tl.log")),
    "sqrt": _Pointwise(_call("tl.sqrt")),
    "rsqrt": _Pointwise(_call("tl.rsqrt")),
    "reciprocal": _Pointwise(lambda a, n: f"1.0 / {a[0]}"),
    "pow.Tensor_Scalar": _Pointwise(_pow_tensor_scalar),
    "pow.Scalar": _Pointwise(_pow_scalar),
    "tanh": _Pointwise(_call("_tanh"), helpers=("_tanh",)),
    "sigmoid": _Pointwise(_call("tl.sigmoid")),
    "erf": _Pointwise(_call("tl.erf")),
    "sin": _Pointwise(_call("tl.sin")),
    "cos": _Pointwise(_call("tl.cos")),
    "relu": _Pointwise(lambda a, n: _nan_max("maximum", a[0], "0")),
    "gelu": _Pointwise(_gelu, helpers=("_tanh",)),
    "gelu_backward": _Pointwise(_gelu_backward, helpers=("_tanh",)),
    "silu": _Pointwise(lambda a, n: f"{a[0]} * tl.sigmoid({a[0]})"),
    "silu_backward": _Pointwise(
        lambda a, n: f"{a[0]} * tl.sigmoid({a[1]}) * (1.0 + {a[1]} * (1.0 - tl.sigmoid({a[1]})))"
    ),
    "sigmoid_backward": _Pointwise(lambda a, n: f"{a[0]} * (1.0 - {a[1]}) * {a[1]}"),
    "tanh_backward": _Pointwise(lambda a, n: f"{a[0]} * (1.0 - {a[1]} * {a[1]})"),
    "threshold_backward": _Pointwise(lambda a, n: f"tl.where({a[1]} <= {a[2]}, 0, {a[0]})"),
    "where.self": _Pointwise(_call("tl.where", 3), keep=frozenset({0}), bool_ok=True),
    "clamp": _Pointwise(_clamp),
    "clamp_min": _Pointwise(lambda a, n: _nan_max("maximum", a[0], a[1])),
    "clamp_max": _Pointwise(lambda a, n: _nan_max("minimum", a[0], a[1])),
    "maximum": _Pointwise(lambda a, n: _nan_max("maximum", a[0], a[1])),
    "minimum": _Pointwise(lambda a, n: _nan_max("minimum", a[0], a[1])),
    "lerp.Scalar": _Pointwise(_lerp),
    "lerp.Tensor": _Pointwise(_lerp),
    "addcmul": _Pointwise(
        lambda a, n: f"{a[0]} + {_literal(n.kwargs.get('value', 1))} * {a[1]} * {a[2]}"
    ),
    "addcdiv": _Pointwise(
        lambda a, n: f"{a[0]} + {_literal(n.kwargs.get('value', 1))} * ({a[1]} / {a[2]})"
    ),
    "masked_fill.Scalar": _Pointwise(
        lambda a, n: f"tl.where({a[1]}, {a[2]}, {a[0]})", keep=frozenset({1})
    ),
    "masked_fill.Tensor": _Pointwise(
        lambda a, n: f"tl.where({a[1]}, {a[2]}, {a[0]})", keep=frozenset({1})
    ),
    "isnan": _Pointwise(lambda a, n: f"{a[0]} != {a[0]}", promote=True, bool_ok=True),
    "isinf": _Pointwise(lambda a, n: f'tl.abs({a[0]}) == float("inf")', promote=True, bool_ok=True),
    "bitwise_not": _Pointwise(_not, bool_ok=True),
    "logical_not": _Pointwise(lambda a, n: f"{a[0]} == 0", promote=True, bool_ok=True),
    "bitwise_and.Tensor": _Pointwise(_infix("&"), bool_ok=True),
    "bitwise_or.Tensor": _Pointwise(_infix("|"), bool_ok=True),
    "logical_and": _Pointwise(
        lambda a, n: f"({a[0]} != 0) & ({a[1]} != 0)", promote=True, bool_ok=True
    ),
    "expand": _Pointwise(lambda a, n: a[0], bool_ok=True),  # broadcasting is implicit here
    "_to_copy": _Pointwise(lambda a, n: a[0], bool_ok=True),  # cast done by operand prep
}
for _op, _sym in [("eq", "=="), ("ne", "!="), ("lt", "<"), ("gt", ">"), ("le", "<="), ("ge", ">=")]:
    for _variant in ("Scalar", "Tensor"):
        POINTWISE[f"{_op}.{_variant}"] = _Pointwise(_infix(_sym), promote=True, bool_ok=True)

CONSTANTS = {"scalar_tensor": 0, "full": 1, "full_like": 1, "zeros_like": None, "ones_like": None}


def _constant_value(node: Node) -> object:
    pos = CONSTANTS[node.op]
    if pos is None:
        return 0 if node.op == "zeros_like" else 1
    return node.args[pos]


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


ROW_CHECKS: dict[str, Callable[[Node], bool]] = {
    "sum.dim_IntList": lambda n: _last_dim_only(n, _arg(n, 1, "dim")),
    "mean.dim": lambda n: _last_dim_only(n, _arg(n, 1, "dim")),
    "amax": lambda n: (
        _last_dim_only(n, _arg(n, 1, "dim", [])) and n.args[0].dtype.is_floating_point
    ),
    "amin": lambda n: (
        _last_dim_only(n, _arg(n, 1, "dim", [])) and n.args[0].dtype.is_floating_point
    ),
    "_softmax": lambda n: _last_dim_only(n, n.args[1]) and not n.args[2],
    "_log_softmax": lambda n: _last_dim_only(n, n.args[1]) and not n.args[2],
    "_softmax_backward_data": lambda n: (
        _last_dim_only(n, n.args[2]) and n.args[1].shape == n.args[0].shape
    ),
    "_log_softmax_backward_data": lambda n: (
        _last_dim_only(n, n.args[2]) and n.args[1].shape == n.args[0].shape
    ),
    "native_layer_norm": lambda n: list(n.args[1]) == [n.args[0].shape[-1]],
    "gather": _row_index_ok,
    "scatter.value": _row_index_ok,
}
_REDUCES_LAST = frozenset({"sum.dim_IntList", "mean.dim", "amax", "amin"})


def fusible(node: Node) -> Fit | None:
    """How `node` may join a group, or None when it must stay an eager node."""
    values = [*node.inputs, *node.outputs]
    if any(v.dtype not in TL_DTYPES for v in values):
        return None
    if node.op in CONSTANTS:
        value = _constant_value(node)
        ok = isinstance(value, int | float | bool) and len(node.outputs) == 1
        return Fit.CONSTANT if ok else None
    if node.op in ROW_CHECKS:
        x = node.args[0]
        ok = isinstance(x, Value) and len(x.shape) >= 1 and ROW_CHECKS[node.op](node)
        return Fit.ROW if ok else None
    if node.op in POINTWISE and len(node.outputs) == 1 and _pointwise_ok(node):
        return Fit.POINTWISE
    return None


def _pointwise_ok(node: Node) -> bool:
    spec = POINTWISE[node.op]
    if not spec.bool_ok and torch.bool in (_compute_dtype(node), node.outputs[0].dtype):
        return False
    match node.op:
        case "pow.Tensor_Scalar":
            e = node.args[1]
            return isinstance(e, int | float) and (
                not float(e).is_integer() or int(e) in _SMALL_POWERS
            )
        case "pow.Scalar":
            return isinstance(node.args[0], int | float) and node.args[0] > 0
        case "gelu" | "gelu_backward":
            return node.kwargs.get("approximate", "none") in ("none", "tanh")
        case "_to_copy":
            return set(node.kwargs) <= {"dtype", "layout", "memory_format"}
    return True


def _compute_dtype(node: Node) -> torch.dtype:
    """The dtype torch computes `node` in: its result's, or the inputs' promotion for compares."""
    if not POINTWISE[node.op].promote:
        return _register_dtype(node.outputs[0].dtype)
    meta = [
        torch.empty(a.shape, dtype=a.dtype, device="meta") if isinstance(a, Value) else a
        for a in node.args
        if isinstance(a, Value | int | float | bool)
    ]
    dtype = meta[0].dtype if len(meta) == 1 else torch.result_type(*meta[:2])
    return _register_dtype(dtype)


# --- group legality ---------------------------------------------------------------------------


def row_shape(domain: tuple[int, ...]) -> tuple[int, ...]:
    """One value per row of `domain`: its last dim reduced (kept as 1)."""
    return (*domain[:-1], 1)


def _store_shape(node: Node, value: Value) -> tuple[int, ...]:
    """The shape a value is indexed by inside a kernel: reductions keep their reduced dim."""
    if node.op in _REDUCES_LAST:
        return row_shape(node.args[0].shape)
    return value.shape


def _pad(shape: tuple[int, ...], rank: int) -> tuple[int, ...] | None:
    return (1,) * (rank - len(shape)) + tuple(shape) if len(shape) <= rank else None


def _broadcasts(shape: tuple[int, ...], domain: tuple[int, ...]) -> bool:
    padded = _pad(shape, len(domain))
    return padded is not None and all(s in (1, d) for s, d in zip(padded, domain, strict=True))


def group_domain(nodes: Sequence[Node], stored: set[int]) -> tuple[int, ...] | None:
    """The domain `nodes` can run over as ONE kernel storing the values in `stored` (ids), or
    None if they cannot (an unfusible op, disagreeing rows, a value that would need a layout
    the kernel does not have)."""
    fits = [fusible(n) for n in nodes]
    if None in fits:
        return None
    rows = [n for n, f in zip(nodes, fits, strict=True) if f is Fit.ROW]
    if rows:
        domain = rows[0].args[0].shape
        n_cols = domain[-1]
        if n_cols < 2 or _next_power_of_2(n_cols) > MAX_ROW_BLOCK:
            return None
        if any(n.args[0].shape != domain for n in rows):
            return None
    else:
        domain = max((v.shape for n in nodes for v in n.outputs), key=math.prod)
    store_shapes = {id(v): _store_shape(n, v) for n in nodes for v in n.outputs}
    for node in nodes:
        for v in node.inputs:
            if id(v) in store_shapes and _pad(v.shape, len(domain)) != _pad(
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


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# --- emission ---------------------------------------------------------------------------------


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
class _Emitter:
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
        padded = _pad(shape, len(self.domain))
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
            return _literal(arg)
        name = self.names[id(arg)]
        have = _register_dtype(arg.dtype)
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
    e = _Emitter(domain, rowwise)
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
        cast = ".to(tl.float32)" if _register_dtype(v.dtype) != v.dtype else ""
        loads.append(f"x{i} = tl.load({where}{masked}){cast}")
        header.append(f"#   in{i}  = %{v.name}: {v.type_str}")
    for node in nodes:
        comment = node.op
        outs = _emit_node(e, node)
        for v, expr in zip(node.outputs, outs, strict=True):
            if _register_dtype(v.dtype) != v.dtype:  # round as eager does, compute on in fp32
                expr = f"({expr}).to({TL_DTYPES[v.dtype]}).to(tl.float32)"
            e.names[id(v)] = e.let(expr, comment) if not _is_name(expr) else expr
            comment = ""
        header.append(
            f"#   {', '.join(e.names[id(v)] for v in node.outputs)} <- {format_node(node)}"
        )
    stores = []
    for i, v in enumerate(stored):
        off, varies = e.offset(_store_shape(_producer(nodes, v), v))
        where = f"out{i}" if off == "0" else f"out{i} + {off}"
        stores.append(f"tl.store({where}, {e.names[id(v)]}{', mask' if varies else ''})")
        header.append(f"#   out{i} = %{v.name}: {v.type_str}")

    block = (
        _next_power_of_2(domain[-1])
        if rowwise
        else min(FLAT_BLOCK, _next_power_of_2(math.prod(domain)))
    )
    grid = math.prod(domain[:-1]) if rowwise else math.ceil(math.prod(domain) / block)
    if rowwise:
        prologue = [
            "row = tl.program_id(0).to(tl.int64)",
            "cols = tl.arange(0, BLOCK)",
            f"mask = cols < {domain[-1]}",
        ]
    else:
        prologue = [
            "offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
            f"mask = offs < {math.prod(domain)}",
        ]
    ops = tuple(n.op for n in nodes)
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
        ops=ops,
        bytes_moved=sum(v.nbytes for v in (*inputs, *stored)),
        flops=sum(flops(n) for n in nodes if n.op not in CONSTANTS),
    )


def _is_name(expr: str) -> bool:
    return expr.isidentifier()


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


def _emit_node(e: _Emitter, node: Node) -> list[str]:
    """tl expressions for each output of `node`; may add temporaries to `e`."""
    fit = fusible(node)
    if fit is Fit.CONSTANT:
        out = node.outputs[0]
        value = _constant_value(node)
        return [f"tl.full([], {_literal(value)}, {TL_DTYPES[_register_dtype(out.dtype)]})"]
    if fit is Fit.ROW:
        return _ROW_EMITTERS[node.op](e, node)
    spec = POINTWISE[node.op]
    dtype = _compute_dtype(node)
    e.helpers.update(spec.helpers)
    if node.op == "_to_copy":
        target = _register_dtype(node.kwargs.get("dtype", node.outputs[0].dtype))
        return [e.operand(node.args[0], target)]
    operands = [e.operand(a, None if i in spec.keep else dtype) for i, a in enumerate(node.args)]
    return [spec.expr(operands, node)]


NEG_INF, POS_INF = 'float("-inf")', 'float("inf")'


def _masked(x: str, fill: str) -> str:
    """Masked-off lanes hold the reduction's identity, whatever the body computed there."""
    return f"tl.where(mask, {x}, {fill})"


def _sum(e: _Emitter, node: Node) -> list[str]:
    acc = _register_dtype(node.outputs[0].dtype)
    x = e.operand(node.args[0], acc)
    return [f"tl.sum({_masked(x, '0')}, axis=0)"]


def _mean(e: _Emitter, node: Node) -> list[str]:
    acc = _register_dtype(node.outputs[0].dtype)
    x = e.operand(node.args[0], acc)
    return [f"tl.sum({_masked(x, '0')}, axis=0) / {e.n_cols}"]


def _extreme(fn: str, fill: str) -> Callable[[_Emitter, Node], list[str]]:
    def emit_(e: _Emitter, node: Node) -> list[str]:
        x = e.operand(node.args[0], _register_dtype(node.outputs[0].dtype))
        return [f"tl.{fn}({_masked(x, fill)}, axis=0)"]

    return emit_


def _softmax(e: _Emitter, node: Node, log: bool) -> list[str]:
    x = e.operand(node.args[0], _register_dtype(node.outputs[0].dtype))
    m = e.let(f"tl.max({_masked(x, NEG_INF)}, axis=0)", "row max")
    if log:
        s = e.let(f"tl.sum({_masked(f'tl.exp({x} - {m})', '0.0')}, axis=0)")
        return [f"{x} - {m} - tl.log({s})"]
    ex = e.let(f"tl.exp({x} - {m})")
    s = e.let(f"tl.sum({_masked(ex, '0.0')}, axis=0)")
    return [f"{ex} / {s}"]


def _softmax_backward(e: _Emitter, node: Node, log: bool) -> list[str]:
    dtype = _register_dtype(node.outputs[0].dtype)
    g, y = e.operand(node.args[0], dtype), e.operand(node.args[1], dtype)
    if log:
        s = e.let(f"tl.sum({_masked(g, '0.0')}, axis=0)")
        return [f"{g} - tl.exp({y}) * {s}"]
    s = e.let(f"tl.sum({_masked(f'{g} * {y}', '0.0')}, axis=0)")
    return [f"{y} * ({g} - {s})"]


def _layer_norm(e: _Emitter, node: Node) -> list[str]:
    dtype = _register_dtype(node.outputs[0].dtype)
    x, weight, bias, eps = node.args[0], node.args[2], node.args[3], node.args[4]
    xs = e.operand(x, dtype)
    mean = e.let(f"tl.sum({_masked(xs, '0.0')}, axis=0) / {e.n_cols}", "mean")
    centered = e.let(_masked(f"{xs} - {mean}", "0.0"))
    var = e.let(f"tl.sum({centered} * {centered}, axis=0) / {e.n_cols}", "biased variance")
    rstd = e.let(f"tl.rsqrt({var} + {_literal(eps)})")
    y = f"{centered} * {rstd}"
    if weight is not None:
        y += f" * {e.operand(weight, dtype)}"
    if bias is not None:
        y += f" + {e.operand(bias, dtype)}"
    return [y, mean, rstd]


def _gather(e: _Emitter, node: Node) -> list[str]:
    x = e.operand(node.args[0], _register_dtype(node.outputs[0].dtype))
    index = e.operand(node.args[2], None)
    return [f"tl.sum(tl.where(cols == {index}, {x}, 0), axis=0)"]


def _scatter(e: _Emitter, node: Node) -> list[str]:
    dtype = _register_dtype(node.outputs[0].dtype)
    base, index = e.operand(node.args[0], dtype), e.operand(node.args[2], None)
    value = _literal(node.args[3])
    return [f"tl.where(cols == {index}, {value}, {base})"]


_ROW_EMITTERS: dict[str, Callable[[_Emitter, Node], list[str]]] = {
    "sum.dim_IntList": _sum,
    "mean.dim": _mean,
    "amax": _extreme("max", NEG_INF),
    "amin": _extreme("min", POS_INF),
    "_softmax": lambda e, n: _softmax(e, n, log=False),
    "_log_softmax": lambda e, n: _softmax(e, n, log=True),
    "_softmax_backward_data": lambda e, n: _softmax_backward(e, n, log=False),
    "_log_softmax_backward_data": lambda e, n: _softmax_backward(e, n, log=True),
    "native_layer_norm": _layer_norm,
    "gather": _gather,
    "scatter.value": _scatter,
}


# --- whole graphs -------------------------------------------------------------------------------


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


def group_kernels(graph: Graph) -> list[Kernel]:
    """One kernel per fused group of `graph`, in schedule order."""
    stored = stored_values(graph)
    return [emit(group, members, stored[group]) for group, members in group_members(graph).items()]
