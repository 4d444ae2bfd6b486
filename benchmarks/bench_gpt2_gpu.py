"""Benchmark the triton backend against eager on a GPU: fused kernels one by one, then the step.

    python benchmarks/bench_gpt2_gpu.py                     # gpt2-small, batch 8 × 1024, CUDA
    python benchmarks/bench_gpt2_gpu.py --model llama-small --batch 4 --seq 1024
    TRITON_INTERPRET=1 python benchmarks/bench_gpt2_gpu.py --device cpu --model gpt2-tiny \\
        --batch 2 --seq 16 --steps 1          # smoke run of this script through the interpreter

Part 1, per fused group kind (Triton tutorials style): the generated kernel against the same
nodes run one ATen op at a time (what eager does), as time and effective bandwidth.
Part 2, the whole training step: eager, triton (fresh tensors) and triton on the planned arena:
median step time and peak device memory; plus the loss head's peak with and without the fused
linear cross-entropy (`passes/linear_cross_entropy.py:loss_head_peak`, from the graph: no device
needed).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from rich.console import Console
from rich.table import Table

from compiler.codegen.fusibility import group_members
from compiler.codegen.triton import group_kernels
from compiler.compile import CompileOptions, compile_model
from compiler.ir import Graph
from compiler.models import resolve_model
from compiler.passes.linear_cross_entropy import loss_head_peak
from compiler.passes.recompute import RecomputePolicy
from examples.loss import lm_loss
from runtime import eager, triton_backend
from runtime.interpreter import Interpreter
from runtime.program import Program

console = Console()


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median milliseconds of `fn` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def kernel_rows(graph: Graph, device: torch.device, repeat: int) -> Table:
    """The first group of each distinct kernel source: generated kernel vs node-by-node ATen."""
    members = group_members(graph)
    table = Table(title="fused groups: generated Triton kernel vs the same nodes in ATen")
    for column in ("kernel", "domain", "ops", "ATen ms", "Triton ms", "speedup", "Triton GB/s"):
        table.add_column(column, justify="right" if column.endswith(("ms", "up", "/s")) else "left")
    seen: set[str] = set()
    for kernel in group_kernels(graph):
        if kernel.key in seen:
            continue
        seen.add(kernel.key)
        feeds = {v.name: _random(v, device) for v in kernel.inputs}
        group = Graph(list(kernel.inputs), members[kernel.group], list(kernel.outputs))
        aten = timed(partial(Interpreter(group, device).run, feeds), device, repeat)
        fn = triton_backend.load_kernel(kernel, device)
        args = [feeds[v.name] for v in kernel.inputs]
        outs = [torch.empty(v.shape, dtype=v.dtype, device=device) for v in kernel.outputs]
        ms = timed(partial(triton_backend.launch, kernel, fn, args, outs), device, repeat)
        table.add_row(
            kernel.name,
            "×".join(map(str, kernel.domain)) or "scalar",
            str(len(kernel.ops)),
            f"{aten:.3f}",
            f"{ms:.3f}",
            f"{aten / ms:.2f}×",
            f"{kernel.bytes_moved / ms / 1e6:.0f}",
        )
    return table


def _random(v: object, device: torch.device) -> torch.Tensor:
    if v.dtype.is_floating_point:
        return torch.randn(v.shape, dtype=v.dtype, device=device)
    if v.dtype == torch.bool:
        return torch.rand(v.shape, device=device) > 0.5
    return torch.zeros(v.shape, dtype=v.dtype, device=device)


def step_rows(args: argparse.Namespace, device: torch.device) -> Table:
    """Median step time and peak memory per backend, the peak against the plan's.

    A backend's peak is what the device allocator held at most during its steps, counted from
    before its program (parameters, moments) and arena exist: the same things `plan.peak_bytes`
    counts (arena, parameters, moments, batch).
    """
    budget = f", recompute budget {args.memory_budget:g}" if args.memory_budget else ""
    table = Table(title=f"{args.model}: training step, batch {args.batch} × {args.seq}{budget}")
    for column in ("backend", "step ms (median)", "peak memory", "measured / planned"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    torch.manual_seed(0)
    model = resolve_model(args.model, device=device)
    policy = RecomputePolicy(activation_fraction=args.memory_budget or None)
    options = CompileOptions(args.batch, args.seq, backend="triton", recompute=policy)
    compiled = compile_model(model, lm_loss, options)
    assert compiled.plan is not None
    backends: dict[str, Callable[[], object]] = {
        "eager": lambda: eager.run_graph,
        "triton": lambda: triton_backend.run_graph,
        "triton (arena)": lambda: triton_backend.TritonArena(compiled.graph, compiled.plan, device),
    }
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (args.batch, args.seq), generator=gen)
    for name, make_backend in backends.items():
        gc.collect()
        before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        program = Program.from_module(compiled.graph, model.module, device, backend=make_backend())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = timed(partial(program.step, tokens, tokens.roll(1, 1)), device, args.steps)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() - before
            held = f"{peak / 2**30:.2f} GiB", f"{peak / compiled.plan.peak_bytes:.3f}"
        else:
            held = "n/a", "n/a"
        table.add_row(name, f"{ms:.1f}", *held)
        del program
    plain = compile_model(
        resolve_model(args.model, device="meta"),
        lm_loss,
        CompileOptions(args.batch, args.seq, fused_cross_entropy=False, recompute=None),
    )
    report = compiled.context.recompute
    extra = report.extra_flops if report else 0
    table.caption = (
        f"planned step peak {compiled.plan.peak_bytes / 2**30:.2f} GiB"
        f" (+{extra / 1e9:.0f} GFLOP recomputed);"
        f" loss head peak: {loss_head_peak(plain.graph) / 2**30:.2f} GiB materialised →"
        f" {loss_head_peak(compiled.graph) / 2**30:.2f} GiB fused linear cross-entropy;"
        f" {len(group_kernels(compiled.graph))} fused groups"
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="timed repetitions")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument(
        "--memory-budget",
        type=float,
        help="recompute to this fraction of the no-recompute activation bytes (default: min-cut)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device: pass --device cpu (with TRITON_INTERPRET=1) to smoke-test"
        )
    if device.type == "cpu":
        triton_backend.require_interpreter()
    if not args.skip_kernels:
        options = CompileOptions(args.batch, args.seq, backend="triton")
        graph = compile_model(resolve_model(args.model, device="meta"), lm_loss, options).graph
        console.print(kernel_rows(graph, device, args.steps))
    console.print(step_rows(args, device))
    console.print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")


if __name__ == "__main__":
    main()
