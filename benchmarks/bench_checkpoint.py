"""memfit's recompute budget against per-layer full checkpointing, at checkpointing's memory.

Per-layer full checkpointing is what users reach for today: `torch.utils.checkpoint` around
each transformer block. This script measures that step's real peak (PyTorch eager, AdamW,
every block checkpointed; bytes held at the allocator, after a warm-up step), then asks memfit
for the cheapest plan that fits the same bytes (`--memory-budget`), and reports what each pays
in recomputation. Checkpointing's price is counted on memfit's own graph (recomputing each
block's forward up to what its backward reads, so not the last matmul of each block, which
`torch.utils.checkpoint` does run): that makes the reference cheaper, never dearer, than the
real thing. memfit's own per-layer checkpointing plan, with its peak, is the second row.

    PYTHONPATH=. python benchmarks/bench_checkpoint.py gpt2-small:4:512 llama-small:4:512
    PYTHONPATH=. python benchmarks/bench_checkpoint.py --device cuda gpt2-small:8:1024
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from benchmarks.bench_memory import batch, held
from compiler.budget import Budget, compile_within
from compiler.compile import CompileOptions, optimize, trace_model
from compiler.models import resolve_model
from compiler.passes.recompute import RecomputePolicy
from compiler.plan import fmt_bytes
from examples.loss import lm_loss
from runtime.arena import allocations


def checkpointed(blocks: nn.ModuleList) -> None:
    """Wrap each block's forward in torch.utils.checkpoint (non-reentrant, as recommended)."""
    for block in blocks:
        forward = block.forward
        block.forward = lambda *a, f=forward, **k: checkpoint(f, *a, use_reentrant=False, **k)


def torch_checkpoint_peak(name: str, b: int, t: int, device: torch.device) -> int:
    """Peak bytes of one eager AdamW step with every block checkpointed (parameters included)."""
    torch.manual_seed(0)
    example = resolve_model(name, device=device)
    model = example.module
    checkpointed(model.blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    def step(x: Tensor, y: Tensor) -> None:
        lm_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(*(v.to(device) for v in batch(example.vocab_size, b, t, 0)))
    x, y = (v.to(device) for v in batch(example.vocab_size, b, t, 1))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    state = [s for per_param in opt.state.values() for s in per_param.values()]
    persistent = held([*model.parameters(), *model.buffers(), *state, x, y])
    return persistent + allocations(lambda: step(x, y)).peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="*", default=["gpt2-small:4:512", "llama-small:4:512"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    table = Table(title=f"recomputation at the memory of per-layer full checkpointing ({device})")
    for column in ("model", "batch×seq", "plan", "step peak", "extra FLOPs", "memfit / ckpt"):
        table.add_column(column, justify="left" if column in ("model", "plan") else "right")
    for spec in args.configs:
        name, b, t = spec.split(":")
        start = time.perf_counter()
        torch_peak = torch_checkpoint_peak(name, int(b), int(t), device)
        example = resolve_model(name, device="meta")
        n_layers = len(example.module.blocks)
        options = CompileOptions(int(b), int(t))
        traced = trace_model(example, lm_loss, options)
        policy = RecomputePolicy(checkpoint_layers=n_layers)
        ckpt = optimize(traced, replace(options, recompute=policy))
        assert ckpt.plan is not None
        ckpt_extra = ckpt.plan.extra_flops_percent
        rows = [
            ("torch.utils.checkpoint, each block", torch_peak, ckpt_extra),
            ("memfit, per-layer checkpointing", ckpt.plan.peak_bytes, ckpt_extra),
        ]
        for label, peak in (
            ("torch's", torch_peak),
            ("memfit checkpointing's", ckpt.plan.peak_bytes),
        ):
            fit = compile_within(traced, options, Budget(nbytes=peak), n_layers=n_layers)
            assert fit.plan is not None
            rows.append(
                (
                    f"memfit --memory-budget {label} peak",
                    fit.plan.peak_bytes,
                    fit.plan.extra_flops_percent,
                )
            )
        for k, (label, peak, extra) in enumerate(rows):
            ratio = f"{extra / ckpt_extra:.2f}" if k >= 2 else ""
            table.add_row(
                name if k == 0 else "",
                f"{b}×{t}" if k == 0 else "",
                label,
                fmt_bytes(peak),
                f"{extra:.2f}%",
                ratio,
            )
        table.add_section()
        print(f"{spec}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    Console(width=150).print(table)
    print(
        "extra FLOPs: recomputation as a share of the step's FLOPs (forward, backward, AdamW);"
        " memfit / ckpt: memfit's extra FLOPs over per-layer checkpointing's at the same budget."
    )


if __name__ == "__main__":
    main()
