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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Body:
    """A decoded body and how one chunk runs it."""

    n_in: int  # targets + inputs: env slots before the first step's result
    steps: list[Step]
    outputs: list[int]  # env slots holding the targets' new values
    last: list[int]  # step after which result j dies (-1: unread; len(steps): an output)
    into: list[int]  # step i writes over result into[i] (it dies there; -1: a new tensor)
    home: list[int]  # step i writes straight into target home[i]'s rows (-1: it does not)


@cache
def decode(body: str) -> Body:
    """Parse a body; a step writes over a result that dies at it (same dtype), as the
    arena's in-place rule does: elementwise, each element is read before it is written."""
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
    for i, step in enumerate(steps):
        for k in _reads(step):
            if k >= n_in:
                last[k - n_in] = i
    for k in outputs:
        last[k - n_in] = len(steps)
    into = [-1] * len(steps)
    for i, step in enumerate(steps):
        dying = [k - n_in for k in _reads(step) if k >= n_in and last[k - n_in] == i]
        into[i] = next((j for j in dying if steps[j][3] == step[3]), -1)
    return Body(n_in, steps, list(outputs), last, into, _homes(n_in, steps, outputs, into))


def _homes(n_in: int, steps: list[Step], outputs: list[int], into: list[int]) -> list[int]:
    """The step that starts the in-place chain ending in a target's new value writes into
    that target's rows when no later step reads the target's old value."""
    root = list(range(len(steps)))
    for i, j in enumerate(into):
        if j >= 0:
            root[i] = root[j]
    last_read: dict[int, int] = {}
    for i, step in enumerate(steps):
        for k in _reads(step):
            last_read[k] = i
    home = [-1] * len(steps)
    for t, k in enumerate(outputs):
        if k >= n_in and last_read.get(t, -1) <= (r := root[k - n_in]) and home[r] == -1:
            home[r] = t
    return home


def permute_targets(body: str, order: list[int]) -> str:
    """`body` taking its targets in another order: target `order[j]` becomes target j."""
    code = decode(body)
    moved = {old: new for new, old in enumerate(order)}

    def ref(obj: Any) -> Any:
        if isinstance(obj, str) and obj.startswith("$"):
            return f"${moved.get(int(obj[1:]), int(obj[1:]))}"
        if isinstance(obj, list | tuple):
            return type(obj)(ref(x) for x in obj)
        return obj

    steps = [(op, ref(a), {k: ref(v) for k, v in kw.items()}, dt) for op, a, kw, dt in code.steps]
    outputs = [moved.get(k, k) for k in (code.outputs[old] for old in order)]
    return encode(code.n_in, steps, outputs)


def _reads(step: Step) -> list[int]:
    return _refs((step[1], tuple(step[2].values())))


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
    from compiler.ops import out_variant, resolve

    code = decode(body)
    env: list[Tensor | None] = [t[rows] if t.ndim else t for t in (*targets, *inputs)]
    for i, step in enumerate(code.steps):
        op, args, kwargs, _ = step
        found = out_variant(op) if code.into[i] >= 0 or code.home[i] >= 0 else None
        if found is None:
            result = resolve(op)(*_bind(args, env), **_bind(kwargs, env))
        else:
            home = code.home[i]
            result = env[home] if home >= 0 else env[code.n_in + code.into[i]]
            found[0](*_bind(args, env), **_bind(kwargs, env), **{found[1][0]: result})
        for k in _reads(step):
            if k >= code.n_in and code.last[k - code.n_in] == i:
                env[k] = None
        env.append(result if code.last[i] >= 0 else None)
    results = [env[k] for k in code.outputs]
    env.clear()
    for target, result in zip(targets, results, strict=True):
        rows_of = target[rows] if target.ndim else target
        if result.data_ptr() != rows_of.data_ptr():  # not computed in place
            rows_of.copy_(result)


def flops(node: Node) -> int:
    """One per element per step, as the traced pointwise nodes counted."""
    targets, _, body, _ = node.args
    return targets[0].numel * len(decode(body).steps)


def workspace_bytes(node: Node) -> int:
    """The most bytes one chunk's results hold at once (each freed after its last read, or
    continued in place by the step it dies at)."""
    from compiler.ops import out_variant

    targets, _, body, chunk = node.args
    shape = targets[0].shape
    elements = (min(chunk, shape[0]) if shape else 1) * math.prod(shape[1:])
    code = decode(body)
    size = [elements * step[3].itemsize for step in code.steps]
    live = peak = 0
    for i, step in enumerate(code.steps):
        in_place = max(code.into[i], code.home[i]) >= 0 and out_variant(step[0]) is not None
        if not in_place:
            live += size[i]
            peak = max(peak, live)
        for j in {k - code.n_in for k in _reads(step) if k >= code.n_in}:
            if code.last[j] == i and not (in_place and j == code.into[i]):
                live -= size[j]
        if code.last[i] == -1:
            live -= size[i]
    return peak
