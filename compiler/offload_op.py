"""`memfit::host_update` and `memfit::host_update_wait`: an optimizer update the CPU runs while
the device goes on with the backward (optimizer-state offload, as ZeRO-Offload does).

`passes/offload.py` turns each chunked update whose targets include optimizer states
(`memfit::update`, compiler/update_op.py) into a `host_update` at the same place. The states
live in host memory (`Role.HOST_STATE`) and are never on the device. At the `host_update` the
update's device tensors (the parameter, its gradient, the optimizer's 0-dim scalars) are
copied to the host — into pinned memory, asynchronously, on CUDA; the device's stream orders
the copies before anything later reuses the gradient's arena bytes — and the update is queued
on one host worker thread. The worker waits for those copies and runs the same body as
`memfit::update`, in place on the host copies and states. The step's one `host_update_wait`,
placed after the last read of every parameter, waits for the queue and copies each updated
parameter back. So the gradient's device bytes die at its `host_update`, the states cost the
device nothing, and the host updates overlap the rest of the backward.

Results equal the on-device update bit for bit on a CPU device (the same ATen ops on the same
values); on CUDA they are the CPU's rounding of the same ops (no fused multiply-adds).
The queue belongs to the process: a step's `host_update_wait` drains every update queued since
the last one, and programs run one step at a time.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from compiler.update_op import decode, update_into

if TYPE_CHECKING:
    from compiler.ir import Node

HOST_UPDATE = "memfit::host_update"
HOST_WAIT = "memfit::host_update_wait"
OPS = (HOST_UPDATE, HOST_WAIT)

_pending: list[tuple[Future[None], list[tuple[Tensor, Tensor]]]] = []
_lock = threading.Lock()


@cache
def _worker() -> ThreadPoolExecutor:
    """One thread: updates run in the order they were queued (ATen parallelises each op)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="memfit-host-update")


def to_host(t: Tensor) -> Tensor:
    """A host copy of `t` the device may go on overwriting: pinned and asynchronous from CUDA."""
    return t.to("cpu", non_blocking=t.is_cuda, copy=True)


@torch.library.custom_op(HOST_UPDATE, mutates_args=("states",))
def host_update(
    targets: list[Tensor], states: list[Tensor], inputs: list[Tensor], body: str, chunk: int
) -> Tensor:
    """Queue `body` (targets, then host `states`, then `inputs`, as `memfit::update` takes
    them) on the host; `targets` take their new values at the next `host_update_wait`. Returns
    a token, empty, that the wait takes so that it follows every update."""
    copies = [to_host(t) for t in targets]
    host_inputs = [to_host(t) for t in inputs]  # the device may reuse their bytes at once
    copied = torch.cuda.Event() if any(t.is_cuda for t in (*targets, *inputs)) else None
    if copied is not None:
        copied.record()

    def run() -> None:
        if copied is not None:
            copied.synchronize()
        update_into([*copies, *states], host_inputs, body, chunk)

    with _lock:
        _pending.append((_worker().submit(run), list(zip(targets, copies, strict=True))))
    return _token(targets, states)


@host_update.register_fake
def _(
    targets: list[Tensor], states: list[Tensor], inputs: list[Tensor], body: str, chunk: int
) -> Tensor:
    return _token(targets, states)


def _token(targets: list[Tensor], states: list[Tensor]) -> Tensor:
    """Empty, on the device of the update's first target."""
    return (targets or states)[0].new_empty(0)


@torch.library.custom_op(HOST_WAIT, mutates_args=("params",))
def host_update_wait(params: list[Tensor], tokens: list[Tensor]) -> None:
    """Wait for every queued host update, then copy its new targets back into `params`."""
    with _lock:
        done = list(_pending)
        _pending.clear()
    failed = [e for future, _ in done if (e := future.exception()) is not None]
    if failed:  # every update has finished: nothing is left running
        raise failed[0]
    queued = {d.data_ptr() for _, back in done for d, _ in back}
    if queued != {p.data_ptr() for p in params}:  # another program's updates, or lost ones
        raise RuntimeError(
            f"memfit::host_update_wait: {len(queued)} queued host updates write other tensors"
            f" than this step's {len(params)} offloaded parameters"
        )
    for _, back in done:
        for device, host in back:
            device.copy_(host, non_blocking=device.is_cuda)


@host_update_wait.register_fake
def _(params: list[Tensor], tokens: list[Tensor]) -> None:
    return None


def flops(node: Node) -> int:
    """One per element per step of the body, as `memfit::update` counts (run on the host)."""
    targets, states, _, body, _ = node.args
    return (targets or states)[0].numel * len(decode(body).steps)
