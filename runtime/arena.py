"""Run a planned graph out of ONE arena: a single uint8 allocation holds every activation,
gradient and temporary of a step, each a typed view at its MemoryPlan offset.

Each op writes through its ATen `out=` overload into its planned view; view ops make views;
copy_ writes persistent state. Where ATen's out= would allocate, the op is run a way that does
not: creation ops fill their view, clone/_to_copy copy into it, embedding is index_select,
`x.Scalar` ops run as `x.Tensor` with the scalar made a 0-dim tensor once, here (as ATen would
make one on every call), the scatter-like ops copy `self` into their view and update it in
place, and memfit's own ops (the fused loss head) write into their views themselves. An op
with no allocation-free form computes, then copies into its view: `fallbacks` names them (the
allocation test counts them). Graph outputs are views into the arena, valid until the next
step. Results equal `runtime.eager.run_graph` bit for bit. A Program runs out of an arena with
`Program.from_module(compiled.graph, model, backend=Arena(compiled.graph, compiled.plan))`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from compiler import custom_ops, update_op
from compiler.ir import Graph, Node, Value
from compiler.ops import OP_KINDS, Kind, kind, out_variant, resolve
from compiler.passes.buffers import UPDATES_SELF
from compiler.plan import MemoryPlan

Env = dict[int, Tensor]
Step = Callable[[Env], Any]

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


class Arena:
    """Runs `graph` as `plan` lays it out; callable as a `runtime.program.Backend`."""

    def __init__(self, graph: Graph, plan: MemoryPlan, device: torch.device | str = "cpu") -> None:
        self.graph = graph
        self.device = torch.device(device)
        self.buffer = torch.empty(plan.arena_bytes, dtype=torch.uint8, device=self.device)
        placed = {v.name: v for v in plan.values}
        self.views: Env = {}
        for node in graph.nodes:
            for v in node.outputs:
                if (p := placed.get(v.name)) is not None:
                    raw = self.buffer[p.offset : p.offset + v.nbytes]
                    self.views[id(v)] = raw.view(v.dtype).view(v.shape)
        self.fallbacks: set[str] = set()
        self.steps = [self._compile(node) for node in graph.nodes]

    def __call__(
        self, graph: Graph, feeds: Mapping[str, Tensor], device: torch.device | None = None
    ) -> list[Tensor]:
        if graph is not self.graph:
            raise ValueError("this arena was planned for another graph")
        env = dict(self.views)
        env.update((id(v), feeds[v.name]) for v in graph.inputs)
        for step in self.steps:
            step(env)
        return [env[id(v)] for v in graph.outputs]

    def _compile(self, node: Node) -> Step:
        """One node as a closure over the environment of tensors."""
        op, args, kwargs = node.op, node.args, node.kwargs
        outs = [id(v) for v in node.outputs]
        out = outs[0] if outs else 0
        if op == update_op.UPDATE:  # in place: it has no outputs of its own
            return partial(_run_into, update_op.update_into, [], args)
        if kind(op) is Kind.WRITE:
            return lambda env: _bind(args[0], env).copy_(_bind(args[1], env))
        if kind(op) is Kind.VIEW:
            return partial(_define, outs, resolve(op), args, kwargs)
        if op in _FILL or op in _CONSTANT:
            value = args[_FILL[op]] if op in _FILL else _CONSTANT[op]
            return lambda env: env[out].fill_(value)
        if op == "empty.memory_format":
            return lambda env: None
        if op in ("clone", "_to_copy"):
            return lambda env: env[out].copy_(_bind(args[0], env))
        if op == "embedding":
            return lambda env: torch.index_select(
                _bind(args[0], env), 0, _bind(args[1], env).reshape(-1), out=env[out].flatten(0, -2)
            )
        if op in _IN_PLACE:
            return partial(_update_copy, out, _IN_PLACE[op], args, kwargs)
        if op in custom_ops.INTO:
            return partial(_run_into, custom_ops.INTO[op], outs, args)
        if _TENSOR_FORM.get(op) in OP_KINDS:
            op = _TENSOR_FORM[op]
        args = self._wrap_scalars(node, op)
        found = out_variant(op)
        if found is None:
            self.fallbacks.add(node.op)
            return partial(_compute_then_copy, outs, resolve(op), args, kwargs)
        fn, names = found
        return partial(_run_out, fn, dict(zip(names, outs, strict=True)), args, kwargs)

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


def _define(outs: list[int], fn: Callable[..., Any], args: Any, kwargs: Any, env: Env) -> None:
    """Run a view op: its results alias its input, nothing is written."""
    env.update(zip(outs, _results(fn(*_bind(args, env), **_bind(kwargs, env))), strict=True))


def _run_out(
    fn: Callable[..., Any], outs: dict[str, int], args: Any, kwargs: Any, env: Env
) -> None:
    """The usual case: the op's out= overload writes into the planned views."""
    fn(*_bind(args, env), **_bind(kwargs, env), **{n: env[o] for n, o in outs.items()})


def _run_into(fn: Callable[..., Any], outs: list[int], args: Any, env: Env) -> None:
    """memfit's own ops: their computation, given the planned views as its outputs."""
    fn(*_bind(args, env), *(env[o] for o in outs))


def _compute_then_copy(
    outs: list[int], fn: Callable[..., Any], args: Any, kwargs: Any, env: Env
) -> None:
    """The fallback for ops with no allocation-free form: their results are allocated."""
    for o, t in zip(outs, _results(fn(*_bind(args, env), **_bind(kwargs, env))), strict=True):
        env[o].copy_(t)


def _update_copy(out: int, update: Callable[..., Any], args: Any, kwargs: Any, env: Env) -> None:
    """A scatter-like op: `self` copied into the planned view (unless planned in place), then
    updated there."""
    dst, src = env[out], _bind(args[0], env)
    if dst.data_ptr() != src.data_ptr():
        dst.copy_(src)
    update(dst, *_bind(args[1:], env), **_bind(kwargs, env))


def _results(result: Any) -> list[Tensor]:
    return list(result) if isinstance(result, list | tuple) else [result]


def _bind(obj: Any, env: Env) -> Any:
    if isinstance(obj, Value):
        return env[id(obj)]
    if isinstance(obj, list | tuple):
        return type(obj)(_bind(x, env) for x in obj)
    if isinstance(obj, dict):
        return {k: _bind(v, env) for k, v in obj.items()}
    return obj


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
