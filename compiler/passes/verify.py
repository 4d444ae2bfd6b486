"""The verifier: the IR invariants every pass must keep. Runs after every pass.

Checked: each value is defined exactly once and before its first use; every op is in the op
set; every node's declared output shapes and dtypes are what the op computes (by running it on
meta tensors, so the check is exact and costs no memory); in-place writes target persistent
values and come after every read of them; outputs are defined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compiler.errors import VerifyError
from compiler.ir import Graph, Node, Value, format_node
from compiler.meta import infer_outputs
from compiler.ops import OP_KINDS
from compiler.ops import written as written_by


def verify(graph: Graph, *, after: str = "", check_shapes: bool = True) -> Graph:
    """Return `graph` unchanged if it is well formed; raise VerifyError naming the node if not."""
    ctx = f" after pass {after!r}" if after else ""
    defined: dict[int, object] = {}
    names: set[str] = set()
    everywhere = {id(v) for v in graph.values()}
    persistent = {id(v) for v in graph.inputs if v.role.persistent}

    def define(v: Value, where: object) -> None:
        if id(v) in defined or v.name in names:
            raise VerifyError(f"%{v.name} is defined twice{ctx} (again by {where})")
        defined[id(v)] = where
        names.add(v.name)

    for v in graph.inputs:
        define(v, "graph input")
    written: dict[int, Node] = {}
    for i, node in enumerate(graph.nodes):
        here = _At(i, node)
        if node.op not in OP_KINDS:
            raise VerifyError(f"unknown op {node.op!r} at {here}{ctx}")
        for v in node.inputs:
            if id(v) not in everywhere:
                raise VerifyError(f"dangling input %{v.name} (defined nowhere) at {here}{ctx}")
            if id(v) not in defined:
                raise VerifyError(f"%{v.name} is used before it is defined at {here}{ctx}")
            if id(v) in written:
                raise VerifyError(f"%{v.name} is read after its in-place write at {here}{ctx}")
        if node.op == "copy_":
            _check_copy(node, _At(i, node, ctx))
        for dst in written_by(node):
            if id(dst) not in persistent:
                raise VerifyError(
                    "an in-place write must target a persistent graph input, not"
                    f" %{dst.name} at {here}{ctx}"
                )
            written[id(dst)] = node
        for v in node.outputs:
            define(v, here)
        if check_shapes:
            _check_shapes(node, _At(i, node, ctx))
    for v in graph.outputs:
        if id(v) not in defined:
            raise VerifyError(f"graph output %{v.name} is never defined{ctx}")
    return graph


@dataclass(frozen=True)
class _At:
    """Where a node is, for error messages: printed only when one is raised."""

    index: int
    node: Node
    suffix: str = ""

    def __str__(self) -> str:
        return f"node {self.index} `{format_node(self.node)}`{self.suffix}"


def _check_copy(node: Node, here: _At) -> None:
    dst, src = node.args
    if (dst.shape, dst.dtype) != (src.shape, src.dtype):
        raise VerifyError(
            f"shape mismatch: copy_ of {src.type_str} into %{dst.name}: {dst.type_str} at {here}"
        )


def _check_shapes(node: Node, here: _At) -> None:
    if node.op == "copy_":
        return
    key = _signature(node)
    if key in _CHECKED:
        return
    try:
        computed = infer_outputs(node)
    except Exception as exc:  # the op itself rejects its inputs: that is the finding
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VerifyError(f"op rejects its inputs at {here}: {msg}") from None
    if len(computed) != len(node.outputs):
        raise VerifyError(
            f"{node.op} yields {len(computed)} outputs, node declares {len(node.outputs)} at {here}"
        )
    for v, t in zip(node.outputs, computed, strict=True):
        if tuple(t.shape) != v.shape or t.dtype != v.dtype:
            got = Value(v.name, tuple(t.shape), t.dtype).type_str
            raise VerifyError(
                f"shape mismatch: %{v.name} is declared {v.type_str} but {node.op} computes"
                f" {got} at {here}"
            )
    if len(_CHECKED) >= _MAX_CHECKED:
        _CHECKED.clear()
    _CHECKED.add(key)


# Signatures of nodes whose shapes were checked: the check runs the op on contiguous meta
# tensors, so it depends only on the op, its literals and its values' types. Each pass keeps
# most nodes as they were and a model repeats its blocks: without this, checking the same
# nodes again after every pass is most of a plan's time (gpt2-small 8x1024: 85 %).
_CHECKED: set[tuple[Any, ...]] = set()
_MAX_CHECKED = 1 << 20


def _signature(node: Node) -> tuple[Any, ...]:
    def literal(a: object) -> object:
        if isinstance(a, Value):
            return (Value, a.shape, a.dtype)
        if isinstance(a, list | tuple):
            return (type(a), *map(literal, a))
        return (type(a), a)

    kwargs = tuple((k, literal(a)) for k, a in node.kwargs.items())
    outputs = tuple((v.shape, v.dtype) for v in node.outputs)
    return (node.op, literal(node.args), kwargs, outputs)
