"""Run a planned graph out of ONE arena: a single uint8 allocation holds every activation,
gradient and temporary of a step, each a typed view at its MemoryPlan offset.

Each op writes through its ATen `out=` overload into its planned view; view ops make views;
copy_ writes persistent state. Where ATen's out= would allocate, the op is run a way that does
not: creation ops fill their view, clone/_to_copy copy into it, embedding is index_select,
`x.Scalar` ops run as `x.Tensor` with the scalar made a 0-dim tensor once, here (as ATen would
make one on every call), the scatter-like ops copy `self` into their view and update it in
place, and memfit's own ops (the fused loss head, attention) write into their views
themselves. An op with no allocation-free form computes, then copies into its view:
`fallbacks` names them (the allocation test counts them). Graph outputs are views into the
arena, valid until the next step. Results equal `runtime.eager.run_graph` bit for bit. A
Program runs out of an arena with
`Program.from_module(compiled.graph, model, backend=Arena(compiled.graph, compiled.plan))`."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function

from compiler import offload_op, update_op
from compiler.ir import Graph, Node, Value
from compiler.liveness import UPDATES_SELF
from compiler.meta import bind, results, run_node
from compiler.ops import INTO, OP_KINDS, Kind, kind, out_variant, resolve
from compiler.plan import MemoryPlan
from runtime.interpreter import Env, Interpreter, Step

Run = Callable[[Env], list[Tensor]]
Binder = Callable[[Env], Any]

_ARITHMETIC = ("add", "sub", "mul", "div", "eq", "ne", "lt", "gt", "le", "ge")
_TENSOR_FORM = {f"{p}.Scalar": f"{p}.Tensor" for p in _ARITHMETIC} | {
    "pow.Scalar": "pow.Tensor_Tensor"
}
_FILL = {"full": 1, "full_like": 1, "scalar_tensor": 0}  # index of the fill value in args
_CONSTANT = {"zeros": 0, "zeros_like": 0, "ones": 1, "ones_like": 1}
_IN_PLACE = {
    "index_put": torch.ops.aten.index_put_.default,
    "index_add": torch.ops.aten.index_add_.default,
    "scatter.value": torch.ops.aten.scatter_.value,
    "scatter.src": torch.ops.aten.scatter_.src,
    "scatter_add": torch.ops.aten.scatter_add_.default,
    "slice_scatter": lambda out, src, dim=0, start=None, end=None, step=1: (
        torch.ops.aten.slice.Tensor(out, dim, start, end, step).copy_(src)
    ),
    "select_scatter": lambda out, src, dim, index: out.select(dim, index).copy_(src),
}
assert _IN_PLACE.keys() == UPDATES_SELF


class Arena(Interpreter):
    """Runs `graph` as `plan` lays it out; callable as a `runtime.program.Backend`."""

    def __init__(
        self,
        graph: Graph,
        plan: MemoryPlan,
        device: torch.device | str = "cpu",
        buffer: Tensor | None = None,
    ) -> None:
        """`buffer`: uint8 bytes to lay the plan out in (steps that never run at once share
        one, e.g. a micro-step and the step that applies the update); default: a new one."""
        super().__init__(graph, device)
        if buffer is None:
            buffer = torch.empty(plan.arena_bytes, dtype=torch.uint8, device=self.device)
        if buffer.numel() < plan.arena_bytes:
            raise ValueError(f"the buffer holds {buffer.numel()} bytes, the plan needs more")
        self.buffer = buffer
        placed = {v.name: v for v in plan.values}
        self.views: Env = {}
        for node in graph.nodes:
            for v in node.outputs:
                if (p := placed.get(v.name)) is not None:
                    raw = self.buffer[p.offset : p.offset + v.nbytes]
                    self.views[id(v)] = raw.view(v.dtype).view(v.shape)
        self.fallbacks: set[str] = set()
        self.steps = self.schedule()
        self.compiled = {id(step): self.compile(step) for step in self.steps}

    def schedule(self) -> list[Step]:
        """What runs, in order: every node (a subclass may launch groups as kernels)."""
        return list(self.graph.nodes)

    def run_node(self, node: Node, env: Env) -> list[Tensor]:
        return self.compiled[id(node)](env)

    def runner(self, step: Step) -> Run:
        return self.compiled[id(step)]

    def compile(self, node: Node) -> Run:
        """One node as a function of the environment of tensors, writing into its views."""
        op, args, kwargs = node.op, node.args, node.kwargs
        if op == update_op.UPDATE:  # in place: it has no outputs of its own
            return partial(_run_into, op, update_op.update_into, [], args)
        if op in offload_op.OPS:  # host memory and an empty token: nothing in the arena
            return partial(run_node, node, device=self.device)
        if kind(op) is Kind.WRITE:
            return partial(_write, _binder(args[0]), _binder(args[1]))
        if kind(op) is Kind.VIEW:
            return partial(_define, _call(resolve(op), args, kwargs))
        if op == "empty.memory_format":
            return lambda env: [self.views.get(id(node.outputs[0]))]
        outs = [self.views[id(v)] for v in node.outputs]
        if op in _FILL or op in _CONSTANT:
            value = args[_FILL[op]] if op in _FILL else _CONSTANT[op]
            return lambda env: [outs[0].fill_(value)]
        if op in ("clone", "_to_copy"):
            src = _binder(args[0])
            return lambda env: [outs[0].copy_(src(env))]
        if op == "embedding":
            return partial(_embedding, outs, args)
        if op in _IN_PLACE:
            return partial(_update_copy, outs, _IN_PLACE[op], args, kwargs)
        if op in INTO:
            return partial(_run_into, op, INTO[op], outs, args)
        if _TENSOR_FORM.get(op) in OP_KINDS:
            op = _TENSOR_FORM[op]
        args = self._wrap_scalars(node, op)
        found = out_variant(op)
        if found is None:
            self.fallbacks.add(node.op)
            return partial(_compute_then_copy, outs, _call(resolve(op), args, kwargs))
        fn, names = found
        return _run_out(fn, dict(zip(names, outs, strict=True)), args, kwargs)

    def _wrap_scalars(self, node: Node, op: str) -> tuple[Any, ...]:
        """Python numbers passed where `op` takes a Tensor become 0-dim CPU tensors, made once
        here instead of by ATen on every call, with the same result bit for bit: in the dtype
        the op computes in, or for bf16/fp16 in float64 as ATen wraps them (its kernels read
        the scalar at float precision), which promotes alike only when no tensor is 0-dim."""
        schema = resolve(op)._schema.arguments
        tensors = [a for a in node.args if isinstance(a, Value)]
        if not tensors:
            return node.args
        meta = torch.empty(tensors[0].shape, dtype=tensors[0].dtype, device="meta")
        args = list(node.args)
        for i, a in enumerate(args):
            if not isinstance(a, int | float) or isinstance(a, bool) or i >= len(schema):
                continue
            if schema[i].type.kind() != "TensorType":
                continue
            dtype = torch.result_type(meta, a)
            if dtype in (torch.bfloat16, torch.float16):
                if any(not t.shape for t in tensors):
                    continue
                dtype = torch.float64 if isinstance(a, float) else torch.int64
            args[i] = torch.tensor(a, dtype=dtype)
        return tuple(args)


def _write(dst: Binder, src: Binder, env: Env) -> list[Tensor]:
    """copy_: the new value into the persistent tensor (no outputs)."""
    dst(env).copy_(src(env))
    return []


def _define(call: Binder, env: Env) -> list[Tensor]:
    """Run a view op: its results alias its input, nothing is written."""
    return results(call(env))


def _run_out(fn: Callable[..., Any], outs: dict[str, Tensor], args: Any, kwargs: Any) -> Run:
    """The usual case: the op's out= overload writes into the planned views."""
    call, written = _call(fn, args, {**kwargs, **outs}), list(outs.values())

    def run(env: Env) -> list[Tensor]:
        call(env)
        return written

    return run


def _embedding(outs: list[Tensor], args: Any, env: Env) -> list[Tensor]:
    """embedding as index_select, which has an out= form that does not allocate."""
    weight, ids = bind(args[:2], env)
    torch.index_select(weight, 0, ids.reshape(-1), out=outs[0].flatten(0, -2))
    return outs


def _run_into(
    name: str, fn: Callable[..., Any], outs: list[Tensor], args: Any, env: Env
) -> list[Tensor]:
    """memfit's own ops: their computation, given the planned views as its outputs; under the
    op's name in a profile, so their scratch is told apart from the rest (see `allocations`)."""
    with record_function(name):
        fn(*bind(args, env), *outs)
    return outs


def _compute_then_copy(outs: list[Tensor], call: Binder, env: Env) -> list[Tensor]:
    """The fallback for ops with no allocation-free form: their results are allocated."""
    for o, t in zip(outs, results(call(env)), strict=True):
        o.copy_(t)
    return outs


def _update_copy(
    outs: list[Tensor], update: Callable[..., Any], args: Any, kwargs: Any, env: Env
) -> list[Tensor]:
    """A scatter-like op: `self` copied into the planned view (unless planned in place), then
    updated there."""
    dst, src = outs[0], bind(args[0], env)
    if dst.data_ptr() != src.data_ptr():
        dst.copy_(src)
    update(dst, *bind(args[1:], env), **bind(kwargs, env))
    return outs


def _call(fn: Callable[..., Any], args: Any, kwargs: Mapping[str, Any]) -> Binder:
    """`fn(*args, **kwargs)` as a function of the environment, the walk over the arguments
    done once, here, and an OpOverload called through its C++ callable (past its Python
    `__call__`): per node and step, Python then does one call and a few lookups."""
    fn = getattr(fn, "_op", fn)
    bind_args, bind_kwargs = _binder(list(args)), _binder(dict(kwargs))
    if not _holds_value(kwargs):
        return lambda env: fn(*bind_args(env), **kwargs)
    return lambda env: fn(*bind_args(env), **bind_kwargs(env))


def _binder(obj: Any) -> Binder:
    """`lambda env: bind(obj, env)` with the structure of `obj` walked once (tuples of
    tensors become lists, which ATen takes alike)."""
    if isinstance(obj, Value):
        return operator.itemgetter(id(obj))
    if not _holds_value(obj):
        return lambda env: obj
    if isinstance(obj, dict):
        parts = {k: _binder(v) for k, v in obj.items()}
        return lambda env: {k: p(env) for k, p in parts.items()}
    items = list(obj)
    if len(items) > 1 and all(isinstance(x, Value) for x in items):
        getter = operator.itemgetter(*(id(x) for x in items))
        return lambda env: list(getter(env))
    slots = [(i, _binder(x)) for i, x in enumerate(items) if _holds_value(x)]

    def fill(env: Env) -> list[Any]:
        filled = items.copy()
        for i, b in slots:
            filled[i] = b(env)
        return filled

    return fill


def _holds_value(obj: Any) -> bool:
    if isinstance(obj, Value):
        return True
    if isinstance(obj, list | tuple):
        return any(_holds_value(x) for x in obj)
    if isinstance(obj, dict):
        return any(_holds_value(x) for x in obj.values())
    return False


@dataclass(frozen=True)
class Allocations:
    """What the allocator handed out while a function ran, from the profiler's memory events:
    the allocator's own record, so scratch that kernels allocate inside an op counts too."""

    peak_bytes: int  # most bytes allocated at once above the level when it started
    sizes: dict[str, list[int]]  # bytes of each allocation, by outermost ATen op ("" if none)

    @property
    def count(self) -> int:
        return sum(map(len, self.sizes.values()))


def allocations(fn: Callable[[], Any]) -> Allocations:
    """Run `fn` under the profiler's memory tracking and report every allocation it made."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int, str]] = []
    stack = [(e, "") for e in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        e, parent = stack.pop()
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size, parent))
        outer = parent or (e.name if e.tag == _EventType.TorchOp else "")
        stack += [(c, outer) for c in e.children]
    events.sort()
    level = peak = 0
    sizes: dict[str, list[int]] = {}
    for _, nbytes, parent in events:
        level += nbytes
        peak = max(peak, level)
        if nbytes > 0:
            sizes.setdefault(parent, []).append(nbytes)
    return Allocations(peak, sizes)
