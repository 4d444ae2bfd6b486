"""Step time of `memfit train`'s step on the arena and eager backends against plain PyTorch.

One process, the same model weights, batch and AdamW (weight decay 0.1, as train compiles
it), the three steps timed in turn round after round (interleaved, so a machine shared with
other work slows all three alike): the median of each, and the ratios to plain PyTorch
(`loss.backward()` then `torch.optim.AdamW.step()`, gradients set to None between steps).
memfit's step is the one `train` compiles (min-cut recompute, the fused loss head), run by
`runtime.backend.backend_for` as train runs it. `--profile` then shows where the arena
step's time goes: ATen self time by op, and what is left of the wall time (Python dispatch
per node).

    .venv/bin/python benchmarks/bench_train_step.py                          # gpt2-small 2x256
    .venv/bin/python benchmarks/bench_train_step.py gpt2-tiny:8:64 --rounds 20 --profile
    .venv/bin/python benchmarks/bench_train_step.py gpt2-small:8:1024 --device cuda \
        --backends arena,eager,triton --precision bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from compiler.compile import CompileOptions, compile_model
from compiler.models import resolve_model
from compiler.trace import AdamW
from examples.loss import lm_loss
from runtime.backend import backend_for, fusion_of
from runtime.program import Program, initial_state

WEIGHT_DECAY = 0.1  # TrainConfig's default
LR = 1e-3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Step = Callable[[Tensor, Tensor], float]


def plain_step(name: str, device: torch.device, precision: str) -> Step:
    torch.manual_seed(0)
    model = resolve_model(name).module.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step(x: Tensor, y: Tensor) -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def memfit_step(
    name: str, spec: str, b: int, t: int, device: torch.device, precision: str
) -> tuple[Step, Program]:
    """`spec`: a backend, or BACKEND:lean for the step without recomputation and without the
    chunked loss head (more memory, fewer FLOPs: the head's logits are not computed twice)."""
    backend, _, variant = spec.partition(":")
    torch.manual_seed(0)
    example = resolve_model(name)
    options = CompileOptions(
        b, t, AdamW(weight_decay=WEIGHT_DECAY), precision=precision, backend=fusion_of(backend)
    )
    if variant == "lean":
        options = replace(options, recompute=None, fused_cross_entropy=False)
    compiled = compile_model(example, lm_loss, options)
    state = initial_state(compiled.graph, example.module, device)
    program = Program(compiled.graph, state, device, backend_for(compiled, backend, device))

    def step(x: Tensor, y: Tensor) -> float:
        return float(program.step(x, y, LR)[0])

    return step, program


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="gpt2-small:2:256", help="MODEL:BATCH:SEQ")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--backends", default="arena,eager,arena:lean")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    name, b, t = args.config.split(":")
    b, t = int(b), int(t)
    device = torch.device(args.device)
    vocab = resolve_model(name, device="meta").vocab_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (b, t + 1), generator=gen)
    tokens, targets = x[:, :-1].contiguous().to(device), x[:, 1:].contiguous().to(device)

    steps: dict[str, Step] = {}
    programs: dict[str, Program] = {}
    for backend in args.backends.split(","):
        start = time.perf_counter()
        steps[backend], programs[backend] = memfit_step(name, backend, b, t, device, args.precision)
        print(f"compiled for {backend} in {time.perf_counter() - start:.1f} s", flush=True)
    steps["pytorch"] = plain_step(name, device, args.precision)

    times: dict[str, list[float]] = {k: [] for k in steps}
    losses: dict[str, list[float]] = {k: [] for k in steps}
    for k, step in steps.items():  # warm-up: AdamW moments, allocator caches, kernels
        losses[k].append(step(tokens, targets))
    for _ in range(args.rounds):
        for k, step in steps.items():
            sync(device)
            start = time.perf_counter()
            losses[k].append(step(tokens, targets))
            sync(device)
            times[k].append(time.perf_counter() - start)

    base = statistics.median(times["pytorch"])
    print(f"\n{name} {b}x{t} {args.device} {args.precision}, {args.rounds} interleaved rounds,")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'step':<12}{'median s':>10}{'min s':>10}{'tokens/s':>12}{'/ pytorch':>11}  losses")
    for k, ts in times.items():
        med = statistics.median(ts)
        shown = " ".join(f"{v:.4f}" for v in losses[k][:3])
        print(
            f"{k:<10}{med:>10.4f}{min(ts):>10.4f}{b * t / med:>12,.0f}{med / base:>11.3f}  {shown}"
        )

    if args.profile:
        for backend in [k for k in programs if not k.startswith("triton")]:
            profile(backend, steps[backend], tokens, targets, len(programs[backend].graph.nodes))


def profile(
    backend: str, step: Callable[[Tensor, Tensor], float], x: Tensor, y: Tensor, nodes: int
) -> None:
    """ATen self time by op over one step, and the wall time no ATen op accounts for."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    start = time.perf_counter()
    step(x, y)
    wall = time.perf_counter() - start
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step(x, y)
    events = prof.key_averages()
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)
    aten = sum(e.self_cpu_time_total for e in events) / 1e6
    print(f"\n{backend}: {nodes} nodes, wall {wall:.4f} s (unprofiled), ATen self {aten:.4f} s")
    for e in top[:15]:
        print(f"  {e.key:<40}{e.count:>6}{e.self_cpu_time_total / 1e3:>10.1f} ms")


if __name__ == "__main__":
    main()
