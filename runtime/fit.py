"""Will the planned step fit the device? Checked before anything is allocated on it.

The capacity is `--device-memory`, or on CUDA the free memory of the device. A plan that does
not fit stops the run with what would fit, each alternative planned again (on a meta-device
model, nothing allocated): a byte `--memory-budget` (recomputation), the largest `--batch`
that fits, and the smallest `--grad-accum` that keeps the tokens per step with that batch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compiler.budget import Budget, BudgetError, parse_size
from compiler.compile import CompiledStep
from compiler.errors import MemfitError
from compiler.ir import Role
from compiler.plan import fmt_bytes

Replan = Callable[..., CompiledStep]  # (budget, **CompileOptions changes) → the planned step


class FitError(MemfitError):
    """The planned step does not fit the device's memory."""


def device_capacity(spec: str | None, device: torch.device | str) -> int | None:
    """Bytes the step may use: `--device-memory`, else a CUDA device's free memory, else None
    (no check on CPU without the flag)."""
    if spec is not None:
        return parse_size(spec, "--device-memory")
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


def host_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes the host can still give without swapping (Linux's MemAvailable), None elsewhere."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    found = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def check_host_fit(step: CompiledStep, available: int | None) -> None:
    """An offloaded optimizer's pinned host memory must fit the host's available memory (pinned
    pages cannot be swapped out: a host that runs short kills the run instead)."""
    assert step.plan is not None
    need = step.plan.host_bytes
    if need and available is not None and need > available:
        raise FitError(
            f"--offload-optimizer holds {fmt_bytes(need)} of pinned host memory (AdamW states"
            f" {fmt_bytes(step.plan.offload['host_state_bytes'])} and the updates' copies), and"
            f" this host has {fmt_bytes(available)} available; nothing was allocated. Drop"
            " --offload-optimizer, or use --optimizer adamw8bit (1/4 of the state bytes)"
        )


def held_state(step: CompiledStep) -> dict[Role, int]:
    """Device bytes, by role, of what persists across steps: parameters, buffers, AdamW
    moments, gradient sums (offloaded moments are in host memory)."""
    assert step.plan is not None
    return {r: b for r, b in step.plan.outside.items() if r.persistent and not r.on_host}


def check_fit(
    step: CompiledStep,
    peak: int,
    capacity: int,
    batch: int,
    grad_accum: int,
    budget: Budget | None,
    replan: Replan,
) -> None:
    """Raise a FitError naming what would fit if `step`'s planned `peak` (its validation
    included) exceeds `capacity`."""
    if peak <= capacity:
        return
    where = f"--device-memory {fmt_bytes(capacity)}"
    held = held_state(step)
    state = sum(held.values())
    if state >= capacity:
        listed = ", ".join(f"{role} {fmt_bytes(b)}" for role, b in held.items())
        raise FitError(
            f"{where} is smaller than the model's state alone ({fmt_bytes(state)}: {listed}),"
            " before any activation: no budget or batch fits; use a device with more memory,"
            " --lora (with --quantize-base) or a smaller model"
        )
    ways = _what_fits(capacity, batch, grad_accum, budget, replan)
    advice = "; ".join(ways) if ways else "nothing smaller fits either (batch 1 included)"
    raise FitError(
        f"the planned step peaks at {fmt_bytes(peak)}, more than {where}"
        f" (state {fmt_bytes(state)}); nothing was allocated. What fits, as planned: {advice}"
    )


def _what_fits(
    capacity: int, batch: int, grad_accum: int, budget: Budget | None, replan: Replan
) -> list[str]:
    ways = []
    if budget is None or budget.nbytes is None or budget.nbytes > capacity:
        kib = capacity // 1024  # as the flag will be written
        fitted = _plan_or_none(replan, Budget(nbytes=kib * 1024)) if kib else None
        if fitted is not None:
            ways.append(
                f"--memory-budget {kib}KiB (recomputes +{_extra(fitted):.1f}% FLOPs,"
                f" peak {fmt_bytes(fitted.peak_bytes)})"
            )
    found = _largest_batch(batch, capacity, lambda b: _plan_or_none(replan, budget, batch_size=b))
    if found is not None:
        ways.append(f"--batch {found[0]} (peak {fmt_bytes(found[1].peak_bytes)})")
    tokens = batch * grad_accum

    def accumulated(b: int) -> CompiledStep | None:
        if tokens % b:
            return None
        return _plan_or_none(replan, budget, batch_size=b, grad_accum=tokens // b)

    found = _largest_batch(batch, capacity, accumulated)
    if found is not None:
        b, step = found
        ways.append(
            f"--batch {b} --grad-accum {tokens // b} (the same tokens per step, peak"
            f" {fmt_bytes(step.peak_bytes)})"
        )
    return ways


def _largest_batch(
    batch: int, capacity: int, plan: Callable[[int], CompiledStep | None]
) -> tuple[int, CompiledStep] | None:
    """The largest of batch/2, batch/4, ..., 1 whose plan fits, with that plan."""
    smaller = batch // 2
    while smaller >= 1:
        step = plan(smaller)
        if step is not None and step.peak_bytes <= capacity:
            return smaller, step
        smaller //= 2
    return None


def _plan_or_none(replan: Replan, budget: Budget | None, **changes: Any) -> CompiledStep | None:
    try:
        return replan(budget, **changes)
    except BudgetError:
        return None


def _extra(step: CompiledStep) -> float:
    assert step.plan is not None
    return step.plan.extra_flops_percent
