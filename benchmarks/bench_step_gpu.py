"""The whole bf16 training step, side by side: PyTorch eager, torch.compile and memfit.

    python benchmarks/bench_step_gpu.py                  # gpt2-small 8×1024, llama-small 4×1024
    python benchmarks/bench_step_gpu.py --out benchmarks/results/step-bf16-h200
    python benchmarks/bench_step_gpu.py --dry-run        # CPU, tiny models, Triton interpreter

Every system runs forward, backward and AdamW with bf16 compute and fp32 master weights:
- `eager`: the module under `torch.autocast(bfloat16)` with `torch.optim.AdamW(fused=True)`;
- `compile`, `compile-max-autotune`: the same with `torch.compile(module)`, default mode and
  `mode="max-autotune-no-cudagraphs"`;
- `memfit`: the compiled step (`precision="bf16"`, Triton kernels) on its planned arena;
- `memfit-graph`: the same step captured once and replayed as a CUDA graph (CUDA only);
- `memfit-offload`: the memfit step with AdamW's states in host memory, each update run by the
  CPU while the device runs the rest of the backward (`--offload-optimizer`).

Each system runs in a fresh process (a compile or a crash cannot disturb the others, and each
peak starts from an empty allocator), with its own time limit. Reported per system: median step
ms, tokens/s, MFU (model FLOPs, counted by `torch.utils.flop_counter` on one eager forward and
backward, over the device's dense bf16 peak), peak memory (allocator, everything the step holds:
parameters, master weights, moments, activations, workspace) and where one profiled step's
time goes: matmul, attention, fused pointwise/row kernels, optimizer, and the gaps in which
the device ran no kernel (host overhead, launches).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

SYSTEMS = ("eager", "compile", "compile-max-autotune", "memfit", "memfit-graph", "memfit-offload")
CLASSES = ("matmul", "attention", "pointwise/row", "optimizer", "gaps")
DENSE_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1}
WORKLOADS = [("gpt2-small", 8, 1024), ("llama-small", 4, 1024)]
DRY_WORKLOADS = [("gpt2-tiny", 2, 32), ("llama-tiny", 2, 32)]

console = Console(width=160)


@dataclass
class Result:
    system: str
    model: str
    batch: int
    seq: int
    step_ms: float = 0.0
    tokens_per_s: float = 0.0
    mfu: float | None = None
    peak_bytes: int | None = None
    split_ms: dict[str, float] = field(default_factory=dict)
    error: str = ""


def classify(name: str, optimizer_kernels: frozenset[str] = frozenset()) -> str:
    """The class of one profiled kernel (or, on a CPU, one top-level ATen op) by its name."""
    low = name.lower()
    if name in optimizer_kernels or any(k in low for k in ("adam", "multi_tensor", "foreach")):
        return "optimizer"
    if any(k in low for k in ("flash", "fmha", "attention", "sdpa", "attn")):
        return "attention"
    matmul = ("gemm", "cutlass", "xmma", "cublas", "nvjet", "matmul", "aten::mm", "aten::bmm")
    if any(k in low for k in matmul) or low in ("aten::addmm", "aten::linear"):
        return "matmul"
    return "pointwise/row"


def time_split(
    intervals: Iterable[tuple[str, float, float]], step_us: float, optimizer: frozenset[str]
) -> dict[str, float]:
    """Milliseconds per kernel class within one step, and the gaps: step time not covered by
    any kernel. `intervals` are (name, start µs, end µs); overlapping kernels count once."""
    split = dict.fromkeys(CLASSES, 0.0)
    covered, last_end = 0.0, float("-inf")
    for name, start, end in sorted(intervals, key=lambda i: i[1]):
        split[classify(name, optimizer)] += (end - start) / 1e3
        covered += max(0.0, end - max(start, last_end))
        last_end = max(last_end, end)
    split["gaps"] = max(0.0, step_us - covered) / 1e3
    return split


def model_flops(model_name: str, batch: int, seq: int) -> int:
    """FLOPs of one forward + backward of the model as written (no recomputation), counted
    by PyTorch's FlopCounterMode on the meta device: the numerator of MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    from compiler.models import resolve_model
    from examples.loss import lm_loss

    model = resolve_model(model_name, device="meta")
    tokens = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        lm_loss(model.module(tokens), tokens).backward()
    return counter.get_total_flops()


def dense_peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((t * 1e12 for key, t in DENSE_BF16_TFLOPS.items() if key in name), None)


def build_step(
    system: str, model_name: str, batch: int, seq: int, device: torch.device
) -> tuple[Callable[[], object], frozenset[str]]:
    """(step function, names of the optimizer's kernels) for one system, built on `device`."""
    from compiler.models import resolve_model
    from examples.loss import lm_loss

    torch.manual_seed(0)
    model = resolve_model(model_name, device="cpu")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (batch, seq), generator=gen).to(device)
    targets = tokens.roll(-1, 1)
    if system.startswith("memfit"):
        from compiler.codegen.fusibility import group_members
        from compiler.codegen.triton import group_kernels
        from compiler.compile import CompileOptions, compile_model
        from compiler.ir import Phase
        from runtime.program import Program
        from runtime.triton_backend import TritonArena

        offload = system == "memfit-offload"
        options = CompileOptions(
            batch, seq, precision="bf16", backend="triton", offload_optimizer=offload
        )
        compiled = compile_model(model, lm_loss, options)
        arena = TritonArena(compiled.graph, compiled.plan, device)
        program = Program.from_module(compiled.graph, model.module, device, backend=arena)
        del model
        members = group_members(compiled.graph)
        by_phase: dict[str, set[Phase]] = {}
        for kernel in group_kernels(compiled.graph):
            by_phase.setdefault(kernel.name, set()).update(n.phase for n in members[kernel.group])
        optimizer = frozenset(k for k, p in by_phase.items() if p == {Phase.OPTIMIZER})
        step = partial(program.step, tokens, targets)
        if system == "memfit-graph":
            from runtime.cuda_graph import GraphedStep

            step()  # the eager step the capture needs: it compiles the kernels
            step = partial(GraphedStep(program, tokens, targets).step, tokens, targets)
        return step, optimizer
    module = model.module.to(device)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    forward = module
    if system == "compile":
        forward = torch.compile(module)
    elif system == "compile-max-autotune":
        forward = torch.compile(module, mode="max-autotune-no-cudagraphs")

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = lm_loss(forward(tokens), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, frozenset()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(system: str, model_name: str, batch: int, seq: int, args: argparse.Namespace) -> Result:
    """One system on one workload, in this process."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    result = Result(system, model_name, batch, seq)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    step, optimizer = build_step(system, model_name, batch, seq, device)
    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    result.step_ms = statistics.median(times)
    result.tokens_per_s = batch * seq / (result.step_ms / 1e3)
    if device.type == "cuda":
        result.peak_bytes = torch.cuda.max_memory_allocated() - before
    if peak := dense_peak_flops(device, args.peak_tflops):
        flops = model_flops(model_name, batch, seq)
        result.mfu = flops / (result.step_ms / 1e3) / peak
    activities = [ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        _sync(device)
        step_us = (time.perf_counter() - start) * 1e6
    result.split_ms = time_split(_intervals(prof, device), step_us, optimizer)
    return result


def _intervals(prof: object, device: torch.device) -> list[tuple[str, float, float]]:
    """Device kernels (CUDA) or top-level ATen ops (CPU) of a profile: (name, start, end) µs."""
    out = []
    for e in prof.events():  # type: ignore[attr-defined]
        on_device = e.device_type == torch.autograd.DeviceType.CUDA
        if on_device if device.type == "cuda" else e.cpu_parent is None and not on_device:
            out.append((e.name, e.time_range.start, e.time_range.end))
    return out


def run_isolated(system: str, workload: tuple[str, int, int], args: argparse.Namespace) -> Result:
    """`measure` in a fresh process with its own time limit; a failure becomes a row."""
    model_name, batch, seq = workload
    cmd = [sys.executable, __file__, "--one", system, "--model", model_name]
    cmd += ["--batch", str(batch), "--seq", str(seq), "--device", args.device]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return Result(system, model_name, batch, seq, error=f"over {args.timeout} s")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Result(system, model_name, batch, seq, error=tail[:160])
    return Result(**json.loads(lines[-1]))


def table(results: list[Result]) -> Table:
    first = results[0]
    out = Table(title=f"{first.model} {first.batch}×{first.seq}, bf16 step (fwd + bwd + AdamW)")
    columns = ("system", "step ms", "tokens/s", "vs compile", "MFU", "peak GiB", *CLASSES)
    for c in columns:
        out.add_column(c, justify="left" if c == "system" else "right")
    base = next((r.tokens_per_s for r in results if r.system == "compile" and not r.error), None)
    for r in results:
        if r.error:
            out.add_row(r.system, f"failed: {r.error}")
            continue
        out.add_row(
            r.system,
            f"{r.step_ms:.1f}",
            f"{r.tokens_per_s:,.0f}",
            f"{r.tokens_per_s / base:.2f}×" if base else "—",
            f"{r.mfu:.1%}" if r.mfu is not None else "—",
            f"{r.peak_bytes / 2**30:.2f}" if r.peak_bytes is not None else "—",
            *(f"{r.split_ms.get(c, 0.0):.1f}" for c in CLASSES),
        )
    out.caption = "time split: ms of one profiled step per kernel class; gaps: no kernel running"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models, interpreter")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compiles happen)")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per system")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak, if not known here")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.txt")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one system in this process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(asdict(measure(args.one, args.model, args.batch, args.seq, args))))
        return
    systems = args.systems.split(",")
    if unknown := set(systems) - set(SYSTEMS):
        parser.error(f"--systems: unknown {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    workloads = WORKLOADS
    if args.dry_run:
        args.device, args.steps, args.warmup = "cpu", min(args.steps, 2), 1
        os.environ["TRITON_INTERPRET"] = "1"
        workloads = DRY_WORKLOADS
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("no CUDA device here: --dry-run runs the script on the CPU")
        device = f"{torch.cuda.get_device_name()} · torch {torch.__version__}"
    else:
        device = f"cpu · torch {torch.__version__}"
        systems = [s for s in systems if s != "memfit-graph"]  # CUDA graphs need CUDA
    all_results = []
    for workload in workloads:
        results = [run_isolated(s, workload, args) for s in systems]
        all_results += results
        console.print(table(results))
    console.print(device)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps([asdict(r) for r in all_results], indent=1))
        with Path(f"{args.out}.txt").open("w") as f:
            Console(file=f, width=160).print(
                *(table([r for r in all_results if r.model == m]) for m, _, _ in workloads), device
            )


if __name__ == "__main__":
    main()
