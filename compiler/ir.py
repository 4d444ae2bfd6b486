"""memfit's IR: values, nodes and one graph for a whole training step.

The node list *is* the schedule (as in torch.fx): passes reorder it, the planner reads
lifetimes off it, the runtime walks it. Every node names an op from the closed set in
`compiler.ops`; non-tensor arguments are plain literals so the graph prints as text a person
can read and diff, and `parse(dump(g))` gives the same graph back.
"""

from __future__ import annotations

import ast
import enum
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


class Role(enum.StrEnum):
    """What a value is for; the memory plan groups bytes by it."""

    PARAM = "param"
    BUFFER = "buffer"
    OPTIMIZER_STATE = "optimizer_state"
    HOST_STATE = "host_state"  # optimizer state in host memory, updated there (offload)
    GRAD_ACCUM = "grad_accum"  # gradients summed over the micro-steps of one optimizer step
    INPUT = "input"
    GRAD = "grad"
    ACTIVATION = "activation"
    TEMPORARY = "temporary"
    OUTPUT = "output"

    @property
    def persistent(self) -> bool:
        """Persistent values outlive a step and are never placed in the arena."""
        return self in (
            Role.PARAM,
            Role.BUFFER,
            Role.OPTIMIZER_STATE,
            Role.HOST_STATE,
            Role.GRAD_ACCUM,
        )

    @property
    def on_host(self) -> bool:
        """Held in host memory: no part of the device's peak."""
        return self is Role.HOST_STATE


class Phase(enum.StrEnum):
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"


DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.uint16: "u16",
    torch.uint32: "u32",
    torch.bool: "b8",
}
DTYPES_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}
MEMORY_FORMATS: dict[str, torch.memory_format] = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
}


@dataclass(eq=False)
class Value:
    """A tensor in the graph: defined once, by a graph input or by one node."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    role: Role = Role.TEMPORARY

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def type_str(self) -> str:
        return f"{DTYPE_NAMES[self.dtype]}[{','.join(map(str, self.shape))}]"

    def __repr__(self) -> str:
        return f"%{self.name}"


@dataclass(eq=False)
class Node:
    """One op applied to values and literals. `args` may nest Values inside lists (cat)."""

    op: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[Value]
    phase: Phase = Phase.FORWARD
    source: str = ""
    group: int | None = None  # fused group id (passes/fusion.py); members run as one kernel

    @property
    def inputs(self) -> list[Value]:
        """Distinct input values, in argument order."""
        seen: dict[int, Value] = {}
        for v in _values_in((self.args, tuple(self.kwargs.values()))):
            seen.setdefault(id(v), v)
        return list(seen.values())

    def map_args(self, fn: Any) -> None:
        """Replace every Value argument `v` by `fn(v)` (used by rewriting passes)."""
        self.args = map_values(self.args, fn)
        self.kwargs = map_values(self.kwargs, fn)

    def __repr__(self) -> str:
        return format_node(self)


@dataclass(eq=False)
class Graph:
    """A whole training step. Inputs include persistent state (params, optimizer states)."""

    inputs: list[Value] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)

    def values(self) -> Iterator[Value]:
        yield from self.inputs
        for node in self.nodes:
            yield from node.outputs

    def value(self, name: str) -> Value:
        for v in self.values():
            if v.name == name:
                return v
        raise KeyError(f"no value named %{name}")

    def producers(self) -> dict[int, Node]:
        """id(value) → the node that defines it (graph inputs have none)."""
        return {id(v): n for n in self.nodes for v in n.outputs}

    def users(self) -> dict[int, list[Node]]:
        """id(value) → nodes reading it, in schedule order."""
        out: dict[int, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                out.setdefault(id(v), []).append(n)
        return out

    def copy(self) -> Graph:
        """A structural copy sharing Value objects (passes that reorder or add nodes use it)."""
        nodes = [
            Node(n.op, n.args, dict(n.kwargs), list(n.outputs), n.phase, n.source, n.group)
            for n in self.nodes
        ]
        return Graph(list(self.inputs), nodes, list(self.outputs))

    def __str__(self) -> str:
        return dump(self)


def _values_in(obj: Any) -> Iterator[Value]:
    if isinstance(obj, Value):
        yield obj
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from _values_in(item)


def map_values(obj: Any, fn: Any) -> Any:
    """`obj` (args, kwargs, lists of them) with every Value `v` replaced by `fn(v)`."""
    if isinstance(obj, Value):
        return fn(obj)
    if isinstance(obj, list | tuple):
        return type(obj)(map_values(item, fn) for item in obj)
    if isinstance(obj, dict):
        return {k: map_values(a, fn) for k, a in obj.items()}
    return obj


# --- text form -------------------------------------------------------------------------------


def format_literal(obj: Any) -> str:
    if isinstance(obj, Value):
        return f"%{obj.name}"
    if isinstance(obj, torch.dtype):
        return DTYPE_NAMES[obj]
    if isinstance(obj, torch.memory_format):
        return next(k for k, v in MEMORY_FORMATS.items() if v == obj)
    if isinstance(obj, list):
        return "[" + ", ".join(format_literal(x) for x in obj) + "]"
    if isinstance(obj, tuple):
        inner = ", ".join(format_literal(x) for x in obj)
        return f"({inner},)" if len(obj) == 1 else f"({inner})"
    if isinstance(obj, float):
        return repr(obj)
    if obj is None or isinstance(obj, bool | int | str):
        return repr(obj)
    raise TypeError(f"cannot print literal {obj!r} of type {type(obj).__name__}")


def format_node(node: Node) -> str:
    outs = ", ".join(f"%{v.name}: {v.type_str} {v.role}" for v in node.outputs)
    args = [format_literal(a) for a in node.args]
    args += [f"{k}={format_literal(a)}" for k, a in node.kwargs.items()]
    call = f"{node.op}({', '.join(args)})"
    lhs = f"{outs} = " if outs else ""
    where = f" @ {node.source}" if node.source else ""
    group = f" group={node.group}" if node.group is not None else ""
    return f"{lhs}{call}  # {node.phase}{group}{where}"


def dump(graph: Graph) -> str:
    lines = [f"input %{v.name}: {v.type_str} {v.role}" for v in graph.inputs]
    lines += [format_node(n) for n in graph.nodes]
    lines += [f"output {', '.join(f'%{v.name}' for v in graph.outputs)}"]
    return "\n".join(lines) + "\n"


_DECL = re.compile(r"%([\w.]+): (\w+)\[([\d,]*)\] (\w+)")
_VALUE_REF = re.compile(r"%([\w.]+)")


class ParseError(ValueError):
    pass


def parse(text: str) -> Graph:
    """Inverse of `dump`."""
    graph = Graph()
    env: dict[str, Value] = {}

    def declare(decl: str, lineno: int) -> Value:
        m = _DECL.fullmatch(decl.strip())
        if not m:
            raise ParseError(f"line {lineno}: bad value declaration {decl!r}")
        name, dtype, dims, role = m.groups()
        shape = tuple(int(d) for d in dims.split(",")) if dims else ()
        value = Value(name, shape, DTYPES_BY_NAME[dtype], Role(role))
        env[name] = value
        return value

    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("input "):
            graph.inputs.append(declare(line[len("input ") :], lineno))
        elif line.startswith("output"):
            names = _VALUE_REF.findall(line)
            graph.outputs = [env[n] for n in names]
        else:
            graph.nodes.append(_parse_node(line, lineno, env, declare))
    return graph


def _parse_node(line: str, lineno: int, env: dict[str, Value], declare: Any) -> Node:
    body, _, comment = line.partition("  # ")
    phase_text, _, source = comment.partition(" @ ")
    phase_text, _, group_text = phase_text.strip().partition(" group=")
    lhs, eq, call = body.partition(" = ")
    if not eq:
        lhs, call = "", body
    op, _, arg_text = call.partition("(")
    expr = _VALUE_REF.sub(lambda m: f"__value__({m.group(1)!r})", f"f({arg_text}")
    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError as e:
        raise ParseError(f"line {lineno}: {e.msg}: {line!r}") from None
    assert isinstance(tree, ast.Call)
    args = tuple(_literal(a, env, lineno) for a in tree.args)
    kwargs = {k.arg: _literal(k.value, env, lineno) for k in tree.keywords if k.arg}
    outputs = [declare(d, lineno) for d in _split_decls(lhs)] if eq else []
    group = int(group_text) if group_text else None
    return Node(op.strip(), args, kwargs, outputs, Phase(phase_text), source.strip(), group)


def _split_decls(lhs: str) -> list[str]:
    return [m.group(0) for m in _DECL.finditer(lhs)]


def _literal(node: ast.expr, env: dict[str, Value], lineno: int) -> Any:
    match node:
        case ast.Constant(value=v):
            return v
        case ast.UnaryOp(op=ast.USub(), operand=operand):
            return -_literal(operand, env, lineno)
        case ast.List(elts=elts):
            return [_literal(e, env, lineno) for e in elts]
        case ast.Tuple(elts=elts):
            return tuple(_literal(e, env, lineno) for e in elts)
        case ast.Name(id=name) if name in DTYPES_BY_NAME:
            return DTYPES_BY_NAME[name]
        case ast.Name(id=name) if name in MEMORY_FORMATS:
            return MEMORY_FORMATS[name]
        case ast.Name(id="inf"):
            return math.inf
        case ast.Name(id="nan"):
            return math.nan
        case ast.Call(func=ast.Name(id="__value__"), args=[ast.Constant(value=str(name))]):
            if name not in env:
                raise ParseError(f"line {lineno}: %{name} is used before it is defined")
            return env[name]
    raise ParseError(f"line {lineno}: unsupported literal {ast.unparse(node)!r}")
