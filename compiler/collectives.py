"""Collectives as IR ops: torch.distributed calls the planner and the verifier can see.

Each op is a memfit custom op (torch.library) with a fake kernel, so a sharded graph verifies on
meta tensors and the memory plan counts the buffers a collective reads and writes. Groups are
named logically in the IR ("dp", "tp") and bound to process groups at run time (`bind_groups`),
so one graph serves every rank; a group of size 1 needs no binding and no torch.distributed.

The communicating ops start asynchronously and return their output buffer; `memfit::wait`
(which aliases its input, like a view) blocks until the data is there. The shard pass puts the
start right after the last gradient of a bucket and makes its wait depend on the next bucket's
start, so the reduction of one bucket runs while the backward computes the next, whatever
order a memory-minded schedule picks otherwise.

  all_reduce(xs, group, world)      the flattened concatenation of xs (a gradient bucket),
                                    summed over the group: [Σnumel]
  reduce_scatter(xs, group, world)  the same concatenation zero-padded to world·S elements,
                                    S = ⌈Σnumel/world⌉, summed; this rank's [S]
  all_gather(x, group, world)       every rank's x, flattened and concatenated: [world·numel]
  shard(xs, group, world)           this rank's [S] of the padded concatenation of xs (local,
                                    no communication: ZeRO's parameter shard)
  wait(x, after)                    x, once the collective that made it is done; `after`
                                    are values that must exist first (the next bucket's
                                    start), so no schedule can wait before the overlap

The list-taking ops pack their inputs into the output buffer themselves (whatever the inputs'
strides), so a bucket costs one buffer, not a concatenation and then a copy of it;
reduce_scatter's kernel also holds the packed bucket while the call is in flight.

`copy_to_group`, `reduce_from_group` and `gather_from_group` are the autograd functions of
Megatron-style tensor parallelism built from these ops (identity ↔ all-reduce, all-gather ↔
own chunk); make_fx records their forward and backward ops into the traced graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.13 renamed the tensor-in, tensor-out collectives (the old names warn there; the new
# ones do not exist before it).
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

ALL_REDUCE = "memfit::all_reduce"
REDUCE_SCATTER = "memfit::reduce_scatter"
ALL_GATHER = "memfit::all_gather"
SHARD = "memfit::shard"
WAIT = "memfit::wait"

_groups: dict[str, Any] = {}  # logical name → ProcessGroup, bound by the runtime
_pending: dict[int, tuple[Any, tuple[Tensor, ...]]] = {}  # data_ptr → (work, tensors kept alive)


@contextlib.contextmanager
def bind_groups(groups: Mapping[str, Any]) -> Iterator[None]:
    """Run graphs whose collectives name these groups ("dp", "tp" → ProcessGroup)."""
    saved = dict(_groups)
    _groups.update(groups)
    try:
        yield
    finally:
        _groups.clear()
        _groups.update(saved)


def _group(name: str, world: int) -> Any:
    group = _groups.get(name)
    if group is None:
        raise RuntimeError(
            f"collective on group {name!r} of {world} ranks, but no process group is bound to"
            " it: run the step under runtime.distributed (torchrun) or with bind_groups()"
        )
    size = dist.get_world_size(group)
    if size != world:
        raise RuntimeError(f"group {name!r} has {size} ranks; the graph was sharded for {world}")
    return group


def _start(out: Tensor, work: Any, *keep: Tensor) -> Tensor:
    if work is not None and out.numel():
        _pending[out.data_ptr()] = (work, keep)
    return out


def shard_size(numel: int, world: int) -> int:
    """Elements of each rank's shard of `numel` elements padded to a multiple of `world`."""
    return -(-numel // world)


def _pack(xs: list[Tensor], numel: int) -> Tensor:
    """The flattened concatenation of xs, zero-padded to `numel` elements."""
    out = xs[0].new_zeros(numel)
    offset = 0
    for x in xs:
        out[offset : offset + x.numel()] = x.reshape(-1)
        offset += x.numel()
    return out


@torch.library.custom_op(ALL_REDUCE, mutates_args=())
def all_reduce(xs: list[Tensor], group: str, world: int) -> Tensor:
    out = _pack(xs, sum(x.numel() for x in xs))
    if world == 1:
        return out
    return _start(out, dist.all_reduce(out, group=_group(group, world), async_op=True))


@all_reduce.register_fake
def _(xs: list[Tensor], group: str, world: int) -> Tensor:
    return xs[0].new_empty(sum(x.numel() for x in xs))


@torch.library.custom_op(REDUCE_SCATTER, mutates_args=())
def reduce_scatter(xs: list[Tensor], group: str, world: int) -> Tensor:
    size = shard_size(sum(x.numel() for x in xs), world)
    bucket = _pack(xs, world * size)
    if world == 1:
        return bucket
    out = bucket.new_empty(size)
    work = reduce_scatter_single(out, bucket, group=_group(group, world), async_op=True)
    return _start(out, work, bucket)


@reduce_scatter.register_fake
def _(xs: list[Tensor], group: str, world: int) -> Tensor:
    return xs[0].new_empty(shard_size(sum(x.numel() for x in xs), world))


@torch.library.custom_op(ALL_GATHER, mutates_args=())
def all_gather(x: Tensor, group: str, world: int) -> Tensor:
    flat = x.reshape(-1)
    if world == 1:
        return flat.clone()
    out = x.new_empty(world * x.numel())
    work = all_gather_single(out, flat.contiguous(), group=_group(group, world), async_op=True)
    return _start(out, work, flat)


@all_gather.register_fake
def _(x: Tensor, group: str, world: int) -> Tensor:
    return x.new_empty(world * x.numel())


@torch.library.custom_op(SHARD, mutates_args=())
def shard(xs: list[Tensor], group: str, world: int) -> Tensor:
    numel = sum(x.numel() for x in xs)
    size = shard_size(numel, world)
    rank = 0 if world == 1 else dist.get_rank(_group(group, world))
    out = xs[0].new_zeros(size)
    begin, end = rank * size, min((rank + 1) * size, numel)
    offset = 0
    for x in xs:  # copy the part of each x that falls in [begin, end)
        lo, hi = max(begin, offset), min(end, offset + x.numel())
        if lo < hi:
            out[lo - begin : hi - begin] = x.reshape(-1)[lo - offset : hi - offset]
        offset += x.numel()
    return out


@shard.register_fake
def _(xs: list[Tensor], group: str, world: int) -> Tensor:
    return xs[0].new_empty(shard_size(sum(x.numel() for x in xs), world))


_lib = torch.library.Library("memfit", "FRAGMENT")
_lib.define("wait(Tensor(a) x, Tensor[] after) -> Tensor(a)")


def _wait(x: Tensor, after: list[Tensor]) -> Tensor:
    entry = _pending.pop(x.data_ptr(), None) if x.numel() else None
    if entry is not None:
        entry[0].wait()
    return x


for _key in ("CPU", "CUDA"):
    _lib.impl("wait", _wait, _key)
_lib.impl("wait", lambda x, after: x, "Meta")

OPS: dict[str, torch._ops.OpOverload] = {
    ALL_REDUCE: torch.ops.memfit.all_reduce.default,
    REDUCE_SCATTER: torch.ops.memfit.reduce_scatter.default,
    ALL_GATHER: torch.ops.memfit.all_gather.default,
    SHARD: torch.ops.memfit.shard.default,
    WAIT: torch.ops.memfit.wait.default,
}


def reduced(x: Tensor, group: str, world: int) -> Tensor:
    """Sum of x over the group, waited for (what tensor parallelism needs at once)."""
    started = torch.ops.memfit.all_reduce([x], group, world)
    return torch.ops.memfit.wait(started, []).view(x.shape)


def gathered(x: Tensor, group: str, world: int) -> Tensor:
    """Every rank's x stacked: [world, *x.shape]."""
    flat = torch.ops.memfit.wait(torch.ops.memfit.all_gather(x, group, world), [])
    return flat.view(world, *x.shape)


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; the backward sums the partial gradients of the group (Megatron's f)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: str, world: int) -> Tensor:
        ctx.group, ctx.world = group, world
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return reduced(grad, ctx.group, ctx.world), None, None


class _ReduceFromGroup(torch.autograd.Function):
    """All-reduce forward; identity backward (Megatron's g)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: str, world: int) -> Tensor:
        return reduced(x, group, world)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad, None, None


class _GatherFromGroup(torch.autograd.Function):
    """All-gather forward [world, *x.shape]; the backward keeps this rank's slice.

    Every rank computes the same function of the gathered tensor, so the gradient of its own
    part is already complete locally.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: str, world: int) -> Tensor:
        ctx.group, ctx.world, ctx.shape = group, world, x.shape
        return gathered(x, group, world)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        mine = torch.ops.memfit.shard([grad], ctx.group, ctx.world)
        return mine.view(ctx.shape), None, None


def copy_to_group(x: Tensor, group: str, world: int) -> Tensor:
    return _CopyToGroup.apply(x, group, world) if world > 1 else x


def reduce_from_group(x: Tensor, group: str, world: int) -> Tensor:
    return _ReduceFromGroup.apply(x, group, world) if world > 1 else x


def gather_from_group(x: Tensor, group: str, world: int) -> Tensor:
    return _GatherFromGroup.apply(x, group, world) if world > 1 else x.unsqueeze(0)
