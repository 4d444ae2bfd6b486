"""`memfit::update`: an elementwise update of persistent tensors, run in place chunk by chunk.

Traced AdamW computes each new parameter and moment out of place and then copies it in: the
arena holds the gradient plus two or three parameter-sized temporaries during the largest
update (the tied 147 MiB embedding of gpt2-small). `passes/fused_update.py` outlines each such
update — the pointwise nodes of the optimizer phase that compute a group of in-place writes —
into one call of this op. It walks the targets in chunks of rows: for each chunk it runs the
update's body on row slices of its inputs (new values of one chunk only, each freed after its
last read), then writes the chunk's results over the targets' rows. Elementwise, each row of
a target is read before it is written and never read again, so the result is the traced
update's bit for bit (same ATen ops on the same elements), with scratch of a few chunks
instead of whole tensors.

The body is part of the op's arguments (so the graph's text form carries it): a Python literal
`(steps, outputs)`; each step is `(op, args, kwargs, dtype)`, args referring to earlier tensors
as `"$k"`: the targets first, then the other inputs, then each step's result. Inputs are either
shaped like the targets (sliced per chunk) or 0-dim (the optimizer's scalars, read whole).
"""

from __future__ import annotations

import ast
import math
from functools import cache
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from compiler.ir import Node

UPDATE = "memfit::update"
CHUNK_ELEMENTS = 1 << 18  # elements of one chunk of a target: 1 MiB in fp32
_DTYPE = "dtype:"

Step = tuple[str, tuple[Any, ...], dict[str, Any], torch.dtype]


@torch.library.custom_op(UPDATE, mutates_args=("targets",))
def update(targets: list[Tensor], inputs: list[Tensor], body: str, chunk: int) -> None:
    """Run `body` over row chunks of `targets` (and same-shaped `inputs`), writing its
    outputs over the targets' rows."""
    update_into(targets, inputs, body, chunk)


@update.register_fake
def _(targets: list[Tensor], inputs: list[Tensor], body: str, chunk: int) -> None:
    return None


def chunk_rows(shape: tuple[int, ...]) -> int:
    """Rows of a target per chunk, so that one chunk has about CHUNK_ELEMENTS elements."""
    row = math.prod(shape[1:])
    return max(1, min(shape[0] if shape else 1, CHUNK_ELEMENTS // max(row, 1)))


def encode(n_in: int, steps: list[Step], outputs: list[int]) -> str:
    """The body as a Python literal `(n_in, steps, outputs)`, dtypes written `"dtype:f32"`."""
    from compiler.ir import DTYPE_NAMES

    def lit(obj: Any) -> Any:
        if isinstance(obj, torch.dtype):
            return _DTYPE + DTYPE_NAMES[obj]
        if isinstance(obj, list | tuple):
            return type(obj)(lit(x) for x in obj)
        return obj

    plain = tuple((op, lit(a), tuple(lit(tuple(kw.items()))), lit(dt)) for op, a, kw, dt in steps)
    return repr((n_in, plain, tuple(outputs)))


@cache
def decode(body: str) -> tuple[int, list[Step], list[int], list[int]]:
    """(n_in, steps, outputs, last): `last[j]` is the step after which step j's result is
    freed (-1: at once, nothing reads it; len(steps): an output, kept to the chunk's end)."""
    from compiler.ir import DTYPES_BY_NAME

    def val(obj: Any) -> Any:
        if isinstance(obj, str) and obj.startswith(_DTYPE):
            return DTYPES_BY_NAME[obj[len(_DTYPE) :]]
        if isinstance(obj, list | tuple):
            return type(obj)(val(x) for x in obj)
        return obj

    n_in, plain, outputs = ast.literal_eval(body)
    steps = [(op, val(a), dict(val(kw)), val(dt)) for op, a, kw, dt in plain]
    last = [-1] * len(steps)
    for i, (_, args, kwargs, _) in enumerate(steps):
        for k in _refs((args, tuple(kwargs.values()))):
            if k >= n_in:
                last[k - n_in] = i
    for k in outputs:
        last[k - n_in] = len(steps)
    return n_in, steps, list(outputs), last


def _refs(obj: Any) -> list[int]:
    if isinstance(obj, str) and obj.startswith("$"):
        return [int(obj[1:])]
    if isinstance(obj, list | tuple):
        return [k for x in obj for k in _refs(x)]
    return []


def _bind(obj: Any, env: list[Tensor | None]) -> Any:
    if isinstance(obj, str) and obj.startswith("$"):
        return env[int(obj[1:])]
    if isinstance(obj, list | tuple):
        return type(obj)(_bind(x, env) for x in obj)
    return obj


def update_into(targets: list[Tensor], inputs: list[Tensor], body: str, chunk: int) -> None:
    """The update, chunk by chunk: the op's implementation on every backend but Triton."""
    rows = targets[0].shape[0] if targets[0].ndim else 1
    for start in range(0, rows, chunk):
        _run_chunk(targets, inputs, body, slice(start, min(start + chunk, rows)))


def _run_chunk(targets: list[Tensor], inputs: list[Tensor], body: str, rows: slice) -> None:
    """One chunk: every result it makes dies when this returns."""
    from compiler.ops import resolve

    n_in, steps, outputs, last = decode(body)
    env: list[Tensor | None] = [t[rows] if t.ndim else t for t in (*targets, *inputs)]
    for i, (op, args, kwargs, _) in enumerate(steps):
        env.append(resolve(op)(*_bind(args, env), **_bind(kwargs, env)))
        for k in _refs((args, tuple(kwargs.values()))):
            if k >= n_in and last[k - n_in] == i:
                env[k] = None
        if last[i] == -1:
            env[n_in + i] = None
    results = [env[k] for k in outputs]
    env.clear()
    for target, result in zip(targets, results, strict=True):
        (target[rows] if target.ndim else target).copy_(result)


def workspace_bytes(node: Node) -> int:
    """The most bytes one chunk's results hold at once (each freed after its last read)."""
    targets, _, body, chunk = node.args
    shape = targets[0].shape
    elements = (min(chunk, shape[0]) if shape else 1) * math.prod(shape[1:])
    n_in, steps, _, last = decode(body)
    live = peak = 0
    for i, (_, args, kwargs, dtype) in enumerate(steps):
        live += elements * dtype.itemsize
        peak = max(peak, live)
        for k in set(_refs((args, tuple(kwargs.values())))):
            if k >= n_in and last[k - n_in] == i:
                live -= elements * steps[k - n_in][3].itemsize
        if last[i] == -1:
            live -= elements * dtype.itemsize
    return peak
