"""The triton backend: fused groups run as generated Triton kernels, every other node as ATen.

For each fused group (`Node.group`, set by `passes/fusion.py`) it launches the kernel
`compiler/codegen/triton.py` wrote; values internal to a group are never written. Matmuls,
views and index ops run as ATen nodes (cuBLAS on a GPU), the fused linear + cross-entropy ops
as `compiler/codegen/cross_entropy.py`, attention as `compiler/codegen/flash_attention.py`.
Two forms:
- `run_graph`, a `Backend` like `runtime.eager.run_graph`: each result is a fresh tensor;
- `TritonArena`, the `runtime.arena.Arena` runtime: kernels write into the planned views of the
  one arena allocation.
A group whose members are not contiguous in the schedule (a later pass reordered them), or
whose planned outputs overlap its inputs in a way one parallel kernel cannot honour, runs node
by node instead: slower, never wrong. Non-contiguous inputs (a permuted view) are copied to
contiguous memory before a launch: kernels index with static contiguous strides.

Kernels are compiled from their source file, cached on disk by content hash under
$MEMFIT_KERNEL_CACHE (default ~/.cache/memfit/kernels), so the same block in every layer and
every later run share one compilation. On a CPU device the kernels run in the Triton
interpreter (TRITON_INTERPRET=1 is set for them if the caller has not chosen).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from compiler import attention, custom_ops
from compiler.codegen.fusibility import group_members
from compiler.codegen.triton import Kernel, group_kernels
from compiler.ir import Graph, Node, Value
from compiler.meta import bind, results
from compiler.ops import Kind, kind
from runtime.arena import Arena, Run
from runtime.interpreter import Env, Interpreter, Step

CACHE_ENV = "MEMFIT_KERNEL_CACHE"
_RESHAPES = ("view", "_unsafe_view")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, "~/.cache/memfit/kernels")).expanduser()


_LOADED: dict[str, Callable[..., Any]] = {}


def require_interpreter() -> None:
    """Make sure kernels on CPU tensors will run in the Triton interpreter.

    Triton decides at import time: its own library (tl.sum, tl.max...) is interpreted only if
    TRITON_INTERPRET=1 was set before `triton` was first imported — and torch imports triton
    while tracing. Set it here if nothing imported triton yet, otherwise insist it was set.
    """
    if "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.standard.sum, InterpretedFunction):
        raise RuntimeError(
            "the triton backend on a CPU device runs in the Triton interpreter: export"
            " TRITON_INTERPRET=1 before starting Python (triton was imported without it)"
        )


def load_kernel(kernel: Kernel, device: torch.device) -> Callable[..., Any]:
    """The compiled (or, on CPU, interpreted) Triton function for `kernel`, cached by hash."""
    mode = "interpret" if device.type == "cpu" else "native"
    key = f"{kernel.key}-{mode}"
    if key in _LOADED:
        return _LOADED[key]
    path = cache_dir() / f"{kernel.name}_{kernel.key}.py"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(kernel.source)
        tmp.replace(path)  # atomic: concurrent runs never read half a file
    module_name = f"memfit_kernel_{key.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # triton resolves the kernel's globals through it
    spec.loader.exec_module(module)
    _LOADED[key] = getattr(module, kernel.name)
    return _LOADED[key]


_PLANS: weakref.WeakKeyDictionary[Graph, list[Step]] = weakref.WeakKeyDictionary()


def steps(graph: Graph) -> list[Step]:
    """The graph as kernels and eager nodes, in schedule order (cached per graph object)."""
    if graph in _PLANS:
        return _PLANS[graph]
    kernels = {k.group: k for k in group_kernels(graph)}
    positions: dict[int, list[int]] = {}
    for i, node in enumerate(graph.nodes):
        if node.group is not None:
            positions.setdefault(node.group, []).append(i)
    contiguous = {g for g, p in positions.items() if p[-1] - p[0] == len(p) - 1}
    plan: list[Step] = []
    for node in graph.nodes:
        if node.group not in contiguous:
            plan.append(node)
        elif not plan or not isinstance(plan[-1], Kernel) or plan[-1].group != node.group:
            plan.append(kernels[node.group])
    _PLANS[graph] = plan
    return plan


_KERNEL_OPS = custom_ops.OPS.keys() | attention.OPS.keys()  # memfit's ops with Triton kernels


def _run_custom(node: Node, env: Env, outs: Sequence[Tensor] = ()) -> list[Tensor]:
    """A fused cross-entropy or attention op through its Triton kernels, written into `outs`
    if given."""
    from compiler.codegen import cross_entropy, flash_attention  # import triton: mode is set

    fn = {
        custom_ops.FORWARD: cross_entropy.linear_cross_entropy,
        custom_ops.BACKWARD: cross_entropy.linear_cross_entropy_backward,
        attention.FORWARD: flash_attention.attention,
        attention.BACKWARD: flash_attention.attention_backward,
    }[node.op]
    return results(fn(*bind(node.args, env), *outs))


def launch(
    kernel: Kernel, fn: Callable[..., Any], ins: list[Tensor], outs: list[Tensor]
) -> list[Tensor]:
    """Launch a group's kernel on its inputs (made contiguous: it indexes with static
    strides) into `outs`."""
    args = [t.contiguous() for t in ins]
    fn[(kernel.grid,)](*args, *outs, BLOCK=kernel.block, num_warps=kernel.num_warps)
    return outs


class Triton(Interpreter):
    """Fused groups as kernels, the fused loss head through its Triton kernels, every other
    node as ATen; each result a fresh tensor."""

    def __init__(self, graph: Graph, device: torch.device | str = "cpu") -> None:
        super().__init__(graph, device)
        if self.device.type == "cpu":
            require_interpreter()
        self.steps = steps(graph)

    def run_node(self, node: Node, env: Env) -> list[Tensor]:
        if node.op in _KERNEL_OPS:
            return _run_custom(node, env)
        return super().run_node(node, env)

    def run_kernel(self, kernel: Kernel, env: Env) -> list[Tensor]:
        outs = [torch.empty(v.shape, dtype=v.dtype, device=self.device) for v in kernel.outputs]
        ins = [env[id(v)] for v in kernel.inputs]
        return launch(kernel, load_kernel(kernel, self.device), ins, outs)


def run_graph(
    graph: Graph, inputs: Mapping[str, Tensor], device: torch.device | str = "cpu"
) -> list[Tensor]:
    """Run `graph` on named inputs like `runtime.eager.run_graph`, fused groups as kernels."""
    return Triton(graph, device).run(inputs)


class TritonArena(Arena):
    """`runtime.arena.Arena` with fused groups launched as kernels into the planned views.

    The plan was made node by node: it may place a group's output where one of its inputs
    died at an earlier member. One kernel reads and writes a group at once, so that is safe
    only for an exact in-place update (same bytes, same shape: each lane reads its element
    before writing it); a group planned any other overlapping way runs as its nodes.
    """

    def schedule(self) -> list[Step]:
        """The steps, each group a kernel unless its planned views overlap (`Arena.__init__`
        calls this once, after laying out the views)."""
        if self.device.type == "cpu":
            require_interpreter()
        self.producer = self.graph.producers()
        self.launched: list[int] = []  # group ids run as kernels
        self.unfused: list[int] = []  # group ids run node by node (overlapping plan)
        members = group_members(self.graph)
        out: list[Step] = []
        for step in steps(self.graph):
            if isinstance(step, Kernel) and self._safe(step):
                out.append(step)
                self.launched.append(step.group)
            elif isinstance(step, Kernel):
                out += members[step.group]
                self.unfused.append(step.group)
            else:
                out.append(step)
        return out

    def run_kernel(self, kernel: Kernel, env: Env) -> list[Tensor]:
        return self.compiled[id(kernel)](env)

    def compile(self, step: Step) -> Run:
        if isinstance(step, Kernel):
            fn, outs = load_kernel(step, self.device), [self.views[id(v)] for v in step.outputs]
            return lambda env: launch(step, fn, [env[id(v)] for v in step.inputs], outs)
        if step.op in _KERNEL_OPS:  # the fused loss head's row kernels, flash attention
            outs = [self.views[id(v)] for v in step.outputs]
            return lambda env: _run_custom(step, env, outs)
        return super().compile(step)

    def _storage(self, v: Value) -> tuple[int, int, bool] | None:
        """The planned byte range `v` lives in (a view: its base's), and whether `v` is laid
        out as it (itself or reshapes of it); None outside the arena."""
        same_layout = True
        while id(v) not in self.views:
            node = self.producer.get(id(v))
            if node is None or kind(node.op) is not Kind.VIEW:
                return None
            same_layout &= node.op in _RESHAPES
            v = node.inputs[0]
        start = self.views[id(v)].data_ptr()
        return start, start + v.nbytes, same_layout

    def _safe(self, kernel: Kernel) -> bool:
        outs = [(v, self._storage(v)) for v in kernel.outputs]
        if any(r is None for _, r in outs):
            return False
        for i, (out, (lo, hi, _)) in enumerate(outs):
            for _, (olo, ohi, _) in outs[i + 1 :]:
                if lo < ohi and olo < hi:
                    return False
            for v in kernel.inputs:
                r = self._storage(v)
                exact = r == (lo, hi, True) and v.shape == out.shape
                if r is not None and r[0] < hi and lo < r[1] and not exact:
                    return False
        return True
