"""precision: compute in bf16/fp16; master weights, optimizer states and accumulators stay fp32.

What each node reads its floating inputs (fp32 or the low dtype) in:
- compute: matmuls, pointwise, index and copy ops read the low dtype. A matmul's output is low
  precision while its K-loop accumulates in fp32 (CPU bf16 mm does; cuBLAS and memfit's
  Triton templates keep fp32 accumulators). A pointwise op leaves its 0-dim operands alone:
  torch's promotion keeps the result in the tensor operand's dtype.
- accumulate: reductions (sum, mean, softmax, log_softmax, layer norm, var_mean, ...),
  accumulating scatters (index_put with accumulate, embedding backward) and summing
  collectives (all_reduce, reduce_scatter) read fp32 and give fp32; sum/mean/cumsum get
  `dtype=f32` instead of an fp32 copy of their input. Pointwise ops on scalars alone stay
  fp32 too (free, and fp16's scaled loss seed must not overflow).
- as traced: views follow their input; creation ops and the graph's own casts are kept.
- the optimizer, in-place writes and graph outputs read the dtype the trace gave them (fp32):
  parameters stay fp32 master weights, each gradient is cast up once, before its update.

A cast is made once per (value, dtype), right before its first reader, and reused by later
readers; a persistent value (a master weight) is cast once per phase instead, so no
low-precision copy of the weights is held from forward to backward. A cast of a view becomes a
view of the cast (one cast per weight however many views read it), a creation op is made again
in the dtype asked for, and a cast of an exact cast reads its source: `check_precision`
rejects cast ping-pong, chains, and reductions below fp32.

fp16 adds dynamic loss scaling inside the graph: input `loss_scale` multiplies the backward
seed, gradients are divided by it where they are cast up, output `found_inf` says whether any
gradient is inf or nan, and every in-place write becomes `copy_(p, where(found_inf, p, new))`:
an overflowing step leaves parameters and moments untouched, with no host sync inside the step.
`runtime/loss_scale.py` moves the scale from `found_inf` after each step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from compiler import attention
from compiler.builder import GraphBuilder
from compiler.collectives import ALL_REDUCE, REDUCE_SCATTER
from compiler.errors import VerifyError
from compiler.ir import DTYPE_NAMES, Graph, Node, Phase, Role, Value, format_node
from compiler.liveness import storage
from compiler.ops import Kind, kind
from compiler.passes.manager import PassContext
from compiler.precisions import Precision
from compiler.trace import eliminate_dead_nodes, mark_activations

log = logging.getLogger(__name__)


LOSS_SCALE, FOUND_INF = "loss_scale", "found_inf"
_F32 = torch.float32
_TAKES_DTYPE = {"sum", "sum.dim_IntList", "mean", "mean.dim", "cumsum"}
# scatters that add into their output, and collectives that sum over ranks
_ACCUMULATING = {"index_add", "scatter_add", "embedding_dense_backward", ALL_REDUCE, REDUCE_SCATTER}

Read = Callable[[Value], Value]


def precision_pass(graph: Graph, ctx: PassContext, precision: Precision = Precision.FP32) -> Graph:
    """The pass entry: fp32 leaves the graph as it is; bf16 and fp16 lower it."""
    if precision.low_dtype is None:
        return graph
    out = lower_precision(graph, precision.low_dtype, loss_scaling=precision is Precision.FP16)
    log.info(
        "precision %s: gradients %.1f -> %.1f MB, saved for backward %.1f -> %.1f MB",
        precision,
        state_bytes(graph)[Role.GRAD] / 1e6,
        state_bytes(out)[Role.GRAD] / 1e6,
        saved_for_backward(graph) / 1e6,
        saved_for_backward(out) / 1e6,
    )
    return out


def lower_precision(graph: Graph, dtype: torch.dtype, *, loss_scaling: bool = False) -> Graph:
    """A new graph computing `graph` in `dtype` as the module docstring says (input unchanged).

    `loss_scaling` (for fp16) applies when the graph has a backward.
    """
    out = _Lowering(graph, dtype).run(loss_scaling)
    check_precision(out)
    return out


def accumulates(node: Node) -> bool:
    """Reductions, scatters and collectives that add values up: their sums stay in fp32."""
    if kind(node.op) is Kind.REDUCTION:
        return True
    if node.op == "index_put":
        return bool(node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate"))
    return node.op in _ACCUMULATING


def accumulator_dtype(node: Node) -> torch.dtype | None:
    """The dtype an accumulating node adds in: its `dtype=`, else its narrowest float input."""
    floats = [v.dtype for v in node.inputs if v.dtype.is_floating_point]
    if not accumulates(node) or not floats:
        return None
    return node.kwargs.get("dtype", min(floats, key=lambda d: d.itemsize))


def check_precision(graph: Graph) -> Graph:
    """Raise VerifyError naming the node if an accumulator is below fp32, a value is cast to
    the same dtype twice (a persistent input: twice in a phase), or a cast reads a cast it
    undoes or an exact (lossless) cast."""
    producers = graph.producers()
    persistent = {id(v) for v in graph.inputs if v.role.persistent}
    casts: set[tuple[int, torch.dtype, Phase | None]] = set()
    for i, node in enumerate(graph.nodes):
        here = f"node {i} `{format_node(node)}`"
        acc = accumulator_dtype(node)
        if acc is not None and acc.itemsize < 4:
            raise VerifyError(f"{node.op} accumulates in {acc}, not fp32, at {here}")
        if node.op != "_to_copy":
            continue
        src, to = node.args[0], node.kwargs.get("dtype")
        key = (id(src), to, node.phase if id(src) in persistent else None)
        if key in casts:
            raise VerifyError(f"%{src.name} is cast to {to} a second time at {here}")
        casts.add(key)
        inner = producers.get(id(src))
        if inner is not None and inner.op == "_to_copy":
            if to == inner.args[0].dtype:
                raise VerifyError(f"cast ping-pong: this cast undoes %{src.name}'s at {here}")
            if _is_exact_cast(inner):
                raise VerifyError(f"cast chain: cast %{inner.args[0].name} once at {here}")
    return graph


def state_bytes(graph: Graph) -> dict[Role, int]:
    """Bytes a training step keeps beside its activations: parameters, buffers and optimizer
    states (graph inputs), and gradients (one value per trainable parameter)."""
    out = {r: 0 for r in (Role.PARAM, Role.BUFFER, Role.GRAD, Role.OPTIMIZER_STATE)}
    for v in graph.values():
        if v.role in out:
            out[v.role] += v.nbytes
    return out


def saved_for_backward(graph: Graph) -> int:
    """Bytes of the forward buffers the backward reads; a view counts as the buffer it views."""
    facts = storage(graph)
    forward = {id(v) for n in graph.nodes if n.phase is Phase.FORWARD for v in n.outputs}
    saved = {r for n in graph.nodes if n.phase is Phase.BACKWARD for r in facts.reads[id(n)]}
    return sum(facts.owner[r].nbytes for r in saved & forward)


def _is_exact_cast(node: Node) -> bool:
    """A cast that loses nothing: integer/bool → float (below 2^24) or float → wider float."""
    if node.op != "_to_copy" or set(node.kwargs) != {"dtype"}:
        return False
    src, dst = node.args[0].dtype, node.kwargs["dtype"]
    if not dst.is_floating_point:
        return False
    return not src.is_floating_point or dst.itemsize > src.itemsize


def _gradients_in(graph: Graph) -> dict[int, Value]:
    """The gradients the backward hands over: defined before the optimizer phase, read by it
    or returned. (A sharded graph's bucket reductions then count once, not per slice.)"""
    phase = {id(v): n.phase for n in graph.nodes for v in n.outputs}
    taken = {id(v) for n in graph.nodes if n.phase is Phase.OPTIMIZER for v in n.inputs}
    taken |= {id(v) for v in graph.outputs}
    return {
        id(v): v
        for v in graph.values()
        if v.role is Role.GRAD and phase.get(id(v)) is not Phase.OPTIMIZER and id(v) in taken
    }


def _loss_seed(graph: Graph) -> Node:
    """The backward's seed: the `full_like(loss, 1)` autograd starts from."""
    losses = {id(v) for v in graph.outputs if v.role is Role.OUTPUT}
    for node in graph.nodes:
        if (
            node.phase is Phase.BACKWARD
            and node.op == "full_like"
            and id(node.args[0]) in losses
            and node.args[1] == 1
        ):
            return node
    raise VerifyError("fp16 loss scaling found no backward seed `full_like(loss, 1)` to scale")


class _Lowering:
    """One walk over the source graph, emitting the lowered graph node by node."""

    def __init__(self, graph: Graph, low: torch.dtype) -> None:
        self.src, self.low = graph, low
        self.producers = graph.producers()
        self.env: dict[int, Value] = {id(v): v for v in graph.inputs}  # source id → lowered
        self.casts: dict[tuple, Value] = {}  # (source id, dtype[, phase]) → the cast value
        self.weights = {id(v) for v in graph.inputs if v.role.persistent}  # ...and their views
        for node in graph.nodes:
            if kind(node.op) is Kind.VIEW and id(node.inputs[0]) in self.weights:
                self.weights.update(id(v) for v in node.outputs)
        self.fixed: set[int] = set()  # values that must be cast, never re-created (the seed)
        self.b = GraphBuilder.rewriting(graph)
        self.loss_scale: Value | None = None
        self.found_inf: Value | None = None
        self.inv_scale: Value | None = None
        self.unscaled: dict[int, Value] = {}
        self.grads = _gradients_in(graph)

    def run(self, loss_scaling: bool) -> Graph:
        scaling = loss_scaling and any(n.phase is Phase.BACKWARD for n in self.src.nodes)
        seed = _loss_seed(self.src) if scaling else None
        if scaling:
            self.loss_scale = self.b.input(LOSS_SCALE, (), _F32, Role.INPUT)
        for node in self.src.nodes:
            self.b.phase, self.b.source = node.phase, node.source
            if scaling and self.found_inf is None and node.phase is Phase.OPTIMIZER:
                self.found_inf = self._found_inf()
            self._lower(node)
            if node is seed:
                self._scale_seed(node.outputs[0])
        outputs = [self.master(v) for v in self.src.outputs]
        if scaling:
            self.b.phase, self.b.source = Phase.OPTIMIZER, ""
            outputs.append(self.found_inf or self._found_inf())
        graph = self.b.graph(outputs)
        eliminate_dead_nodes(graph)
        mark_activations(graph)
        return graph

    # --- reading values in a dtype -----------------------------------------------------------

    def current(self, v: Value) -> Value:
        return self.env[id(v)]

    def as_dtype(self, v: Value, dtype: torch.dtype, *, shortcuts: bool = True) -> Value:
        """Source value `v` in `dtype`: itself, or its one cast (made on first request).

        `shortcuts=False` casts `v` itself even when it is a view or a constant: a gradient
        keeps its low-precision value (the one that lives until its update) in the graph.
        """
        cur = self.env[id(v)]
        if cur.dtype == dtype:
            return cur
        key = self._key(v, dtype)
        if key not in self.casts:
            self.casts[key] = self._convert(v, cur, dtype, shortcuts)
        return self.casts[key]

    def _key(self, v: Value, dtype: torch.dtype) -> tuple:
        """Casts of weights are per phase: the backward casts the master again."""
        return (id(v), dtype, self.b.phase) if id(v) in self.weights else (id(v), dtype)

    def _convert(self, v: Value, cur: Value, dtype: torch.dtype, shortcuts: bool) -> Value:
        node = self.producers.get(id(v))
        tag = DTYPE_NAMES[dtype]
        if node is not None and shortcuts and id(v) not in self.fixed:
            op_kind = kind(node.op)
            if op_kind is Kind.VIEW:  # view of the cast: every view of v shares one cast
                outs = self.b.emit(
                    node.op,
                    node.args,
                    node.kwargs,
                    names=[f"{o.name}.{tag}" for o in node.outputs],
                    read=lambda s: self.as_dtype(s, dtype),
                )
                for o, new in zip(node.outputs, outs, strict=True):
                    self.casts[self._key(o, dtype)] = new
                return outs[node.outputs.index(v)]
            if op_kind is Kind.CREATION:  # make the constant in the dtype asked for
                kwargs = node.kwargs | {"dtype": dtype}
                name = f"{v.name}.{tag}"
                return self.b.emit(node.op, node.args, kwargs, names=name, read=self.current)[0]
            if _is_exact_cast(node):  # cast the source once instead of a cast of a cast
                return self.as_dtype(node.args[0], dtype)
        return self.b.emit1("_to_copy", (cur,), {"dtype": dtype}, f"{v.name}.{tag}")

    def master(self, v: Value) -> Value:
        """`v` in its traced dtype; a gradient also divided by the loss scale (fp16)."""
        if id(v) not in self.grads:
            return self.as_dtype(v, v.dtype)
        grad = self.as_dtype(v, v.dtype, shortcuts=False)
        if self.loss_scale is None:
            return grad
        if id(v) not in self.unscaled:
            if self.inv_scale is None:
                self.inv_scale = self.b.emit1("reciprocal", (self.loss_scale,), {}, "inv_scale")
            self.unscaled[id(v)] = self.b.emit1(
                "mul.Tensor", (grad, self.inv_scale), {}, f"{v.name}.unscaled"
            )
        return self.unscaled[id(v)]

    # --- nodes ------------------------------------------------------------------------------

    def _lower(self, node: Node) -> None:
        if node.op == "copy_":
            dst, new = node.args
            value = self.master(new)
            if self.found_inf is not None:  # a skipped step writes back what was there
                value = self.b.emit1(
                    "where.self", (self.found_inf, dst, value), {}, f"{new.name}.kept"
                )
            self.b.write(dst, value)
            return
        read, kwargs = self._reads(node)
        outs = self.b.emit(
            node.op,
            node.args,
            kwargs,
            names=[v.name for v in node.outputs],
            roles=[v.role for v in node.outputs],
            read=read,
            fresh=False,
        )
        for old, new in zip(node.outputs, outs, strict=True):
            self.env[id(old)] = new

    def _reads(self, node: Node) -> tuple[Read, dict]:
        """How `node` reads each input, and its kwargs (a reduction may gain `dtype=f32`)."""
        kwargs = dict(node.kwargs)
        if node.phase is Phase.OPTIMIZER:
            return self.master, kwargs
        floats = [v for v in node.inputs if self.env[id(v)].dtype in (_F32, self.low)]
        if node.op == attention.BACKWARD:  # the row log-sum-exp is an accumulator: kept fp32
            floats = [v for v in floats if v is not node.args[attention.LSE_ARG]]
        op_kind = kind(node.op)
        if not floats or op_kind in (Kind.VIEW, Kind.CREATION) or node.op == "_to_copy":
            return self.current, kwargs
        if accumulates(node):
            if node.op in _TAKES_DTYPE and "dtype" not in kwargs:
                kwargs["dtype"] = _F32  # accumulate in fp32 without an fp32 copy of the input
                return self.current, kwargs
            return self._reader(floats, _F32), kwargs
        tensors = [v for v in floats if v.shape != ()]
        if op_kind is Kind.POINTWISE and not tensors:
            return self._reader(floats, _F32), kwargs
        if op_kind is Kind.POINTWISE:
            return self._reader(tensors, self.low), kwargs
        return self._reader(floats, self.low), kwargs

    def _reader(self, cast: list[Value], dtype: torch.dtype) -> Read:
        chosen = {id(v) for v in cast}
        return lambda v: self.as_dtype(v, dtype) if id(v) in chosen else self.env[id(v)]

    # --- fp16 loss scaling ----------------------------------------------------------------

    def _scale_seed(self, seed: Value) -> None:
        scaled = self.b.emit1(
            "mul.Tensor", (self.env[id(seed)], self.loss_scale), {}, f"{seed.name}.scaled"
        )
        self.env[id(seed)] = scaled
        self.fixed.add(id(seed))

    def _found_inf(self) -> Value:
        """True iff a gradient holds inf or nan: each summed in fp32, then isnan(total · 0)."""
        b = self.b
        with b.at(Phase.OPTIMIZER):
            sums = [
                b.emit1("sum", (self.env[id(g)],), {"dtype": _F32}, f"{g.name}.sum")
                for g in self.grads.values()
            ]
            total = b.emit1("sum", (b.emit1("stack", (sums,), {}, "grad_sums"),), {}, "grad_total")
            zeroed = b.emit1("mul.Tensor", (total, 0.0), {}, "grad_total.zeroed")  # inf·0 = nan
            return b.emit1("isnan", (zeroed,), {}, FOUND_INF, Role.OUTPUT)
