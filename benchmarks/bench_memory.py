"""Peak memory of one training step: eager PyTorch against memfit's planned arena, on the CPU.

Both sides are measured the same way, in one process: the bytes their tensors hold when the
step starts (parameters, AdamW moments, the batch, and for memfit the arena), plus the most
bytes the allocator hands out on top during the step (profiler memory events,
`runtime.arena.allocations`). Each side first runs one warm-up step, so AdamW's moments exist
and eager's `zero_grad(set_to_none=True)` has freed the gradients, as in steady training.
"step" columns leave out what both sides must hold anyway (parameters, buffers, moments).

Sides: eager PyTorch (forward, backward, `torch.optim.AdamW.step`, `zero_grad`);
`torch.compile` (inductor on the CPU) of the model's forward with the same loss, backward and
AdamW step (`--no-torch-compile` skips it); memfit keeping every activation the backward reads
(`recompute=None`), as `compile_model` compiles by default (the recompute pass's min-cut), and
under an activation fraction. Every memfit step updates parameters in place with the chunked
`memfit::update` (compiler/passes/fused_update.py). Each number is a whole step's peak:
parameters, buffers, AdamW moments, the batch, gradients, activations and temporaries (for
memfit: the arena and kernel scratch), measured at the allocator; memfit's planned peak is
printed beside its measured one.

    .venv/bin/python benchmarks/bench_memory.py                    # tiny and small configs
    .venv/bin/python benchmarks/bench_memory.py gpt2-tiny:8:64     # MODEL:BATCH:SEQ ...
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import replace

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from compiler.compile import CompileOptions, compile_model
from compiler.models import resolve_model
from compiler.optimizers import Optimizer
from compiler.passes.recompute import RecomputePolicy
from compiler.plan import fmt_bytes
from examples.loss import lm_loss
from runtime.arena import Arena, allocations
from runtime.program import Program

CONFIGS = ["gpt2-tiny:8:64", "llama-tiny:8:64", "gpt2-small:2:256", "llama-small:2:256"]


def held(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (tied weights count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def batch(vocab: int, b: int, t: int, seed: int) -> tuple[Tensor, Tensor]:
    x = torch.randint(0, vocab, (b, t + 1), generator=torch.Generator().manual_seed(seed))
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


Peaks = tuple[int, int]  # (whole step, the step's own bytes beyond params, buffers, moments)


def eager_peak(name: str, b: int, t: int, compiled: bool = False) -> Peaks:
    """Eager PyTorch's step, or with the model's forward under torch.compile (inductor)."""
    torch.manual_seed(0)
    example = resolve_model(name)
    model = example.module
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    forward = torch.compile(model) if compiled else model

    def step(x: Tensor, y: Tensor) -> None:
        lm_loss(forward(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(*batch(example.vocab_size, b, t, 0))
    x, y = batch(example.vocab_size, b, t, 1)
    state = [s for per_param in opt.state.values() for s in per_param.values()]
    persistent = held([*model.parameters(), *model.buffers(), *state])
    peak = persistent + held([x, y]) + allocations(lambda: step(x, y)).peak_bytes
    return peak, peak - persistent


def memfit_peaks(
    name: str,
    b: int,
    t: int,
    policy: RecomputePolicy | None,
    accumulate: bool = False,
    optimizer: Optimizer = Optimizer.ADAMW,
    offload: bool = False,
) -> tuple[Peaks, Peaks, float, float, int]:
    """(planned, measured, arena / lower bound, planning seconds, planned host bytes) of
    memfit's step. With offload the CPU is both device and host: measured counts the host's
    states and update copies too, so it is compared with planned device + host bytes."""
    torch.manual_seed(0)
    example = resolve_model(name)
    if policy is not None and policy.checkpoint_layers:  # every block of this model
        policy = replace(policy, checkpoint_layers=len(example.module.blocks))
    options = CompileOptions(
        b,
        t,
        recompute=policy,
        accumulate_grads=accumulate,
        optimizer=optimizer,
        offload_optimizer=offload,
    )
    compiled = compile_model(example, lm_loss, options)
    graph, plan, timings = compiled.graph, compiled.plan, compiled.context.timings
    assert plan is not None
    arena = Arena(graph, plan)
    program = Program.from_module(graph, example.module, backend=arena)
    program.step(*batch(example.vocab_size, b, t, 0))
    x, y = batch(example.vocab_size, b, t, 1)
    persistent = held(program.state.values())
    measured = persistent + held([arena.buffer, x, y])
    measured += allocations(lambda: program.step(x, y)).peak_bytes
    planned = plan.peak_bytes + plan.host_bytes
    planning = timings["schedule"] + timings["buffers"]
    own = (planned, planned - persistent), (measured, measured - persistent)
    return *own, plan.ratio, planning, plan.host_bytes


A8 = Optimizer.ADAMW8BIT
CHECKPOINTING = RecomputePolicy(checkpoint_layers=1)
MEMFIT = {  # label: (recompute policy, tied gradients accumulated in place, optimizer, offload)
    "memfit, no recompute": (None, False, Optimizer.ADAMW, False),
    "memfit default (min-cut)": (RecomputePolicy(), False, Optimizer.ADAMW, False),
    "memfit budget 0.5": (RecomputePolicy(activation_fraction=0.5), False, Optimizer.ADAMW, False),
    "memfit checkpointing + accumulate": (CHECKPOINTING, True, Optimizer.ADAMW, False),
    "memfit default, adamw8bit": (RecomputePolicy(), False, A8, False),
    "memfit checkpointing + accumulate, adamw8bit": (CHECKPOINTING, True, A8, False),
    "memfit default, offload": (RecomputePolicy(), False, Optimizer.ADAMW, True),
    "memfit checkpointing + accumulate, offload": (CHECKPOINTING, True, Optimizer.ADAMW, True),
}


def main(configs: list[str], torch_compile: bool = True) -> None:
    table = Table(title="peak bytes of one training step (AdamW), CPU, fp32")
    columns = ["side", "batch×seq", "planned", "measured", "/ eager", "step / eager"]
    columns += ["arena / bound", "plan s", "device (planned) / eager"]
    for column in columns:
        table.add_column(column, justify="left" if column == "side" else "right")
    for spec in configs:
        name, b, t = spec.split(":")
        start = time.perf_counter()
        eager = eager_peak(name, int(b), int(t))
        table.add_row(f"{name} eager", f"{b}×{t}", "", fmt_bytes(eager[0]), "1.00", "1.00")
        if torch_compile:
            try:
                peak = eager_peak(name, int(b), int(t), compiled=True)
                row = ["", fmt_bytes(peak[0]), f"{peak[0] / eager[0]:.2f}"]
                row.append(f"{peak[1] / eager[1]:.2f}")
            except Exception as e:  # noqa: BLE001 — say why instead of a number
                row = ["", f"failed: {type(e).__name__}", "", ""]
            table.add_row(f"{name} torch.compile", f"{b}×{t}", *row)
        for label, (policy, accumulate, optimizer, offload) in MEMFIT.items():
            planned, measured, ratio, planning, host = memfit_peaks(
                name, int(b), int(t), policy, accumulate, optimizer, offload
            )
            table.add_row(
                f"{name} {label}",
                f"{b}×{t}",
                fmt_bytes(planned[0]),
                fmt_bytes(measured[0]),
                f"{measured[0] / eager[0]:.2f}",
                f"{measured[1] / eager[1]:.2f}",
                f"{ratio:.3f}",
                f"{planning:.2f}",
                f"{(planned[0] - host) / eager[0]:.2f}",
            )
        print(f"{spec}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    Console(width=140).print(table)
    print(
        "Every number is a whole step's peak: parameters, buffers, AdamW moments (fp32; int8"
        " codes and fp32 block scales in the adamw8bit rows), the"
        " batch, gradients, activations, temporaries and kernel scratch (memfit: its arena)."
        " eager/torch.compile: measured (forward, backward, AdamW.step, zero_grad). memfit:"
        " planned and measured; '/ eager' compares measured whole steps, 'step / eager' the"
        " bytes beyond parameters, buffers and moments (each side's own). offload rows: AdamW"
        " states in host memory (--offload-optimizer); on the CPU host and device are one"
        " memory, so planned and measured count the host's states and update copies too, and"
        " 'device (planned) / eager' is the device's share alone, as CUDA would hold it"
        " (measured on CUDA by tests/test_offload.py)."
    )


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--no-torch-compile"]
    main(args or CONFIGS, torch_compile="--no-torch-compile" not in sys.argv)
