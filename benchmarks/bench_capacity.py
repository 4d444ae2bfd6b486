"""The largest batch that fits a memory cap: eager PyTorch against memfit's plans.

memfit answers from its plan, on the meta device (no weights allocated, no step run): the
largest batch whose planned step peak (arena + parameters, AdamW moments, batch, kernel
scratch; measured = planned, see bench_memory) is at most the cap, by bisection over the batch
size — with the default plan (min-cut recompute) and with a byte budget equal to the cap
(`--memory-budget`: the least recompute that fits).

Eager PyTorch cannot be planned, and a full-size step on this CPU takes minutes, so its peak is
measured (bench_memory's `eager_peak`: the allocator's peak over forward, backward, AdamW.step)
at small shapes and extrapolated: peak(b, T) = P + b·(a·T + c·T²), fitted exactly to batch 1 and
2 at the smallest T and batch 1 at twice that T (P: what does not grow with the batch —
parameters, moments, gradients; a: per-token activations; c: attention's T×T scores). This
holds only where activations set eager's peak at the measured shapes; where the AdamW and
gradient phase does (gpt2-small at seq 256 on the CPU), the fit is noise: a fit with a ≤ 0 or
c < 0 prints n/a, and any eager figure should be checked by a measurement at the real shape.

    PYTHONPATH=. python benchmarks/bench_capacity.py gpt2-small:1024 --caps 4GiB,8GiB
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from benchmarks.bench_memory import eager_peak
from compiler.budget import Budget, BudgetError, compile_within, parse_size
from compiler.compile import CompileOptions, optimize, trace_model
from compiler.models import resolve_model
from compiler.plan import fmt_bytes
from examples.loss import lm_loss

MAX_BATCH = 256


def largest(fits: Callable[[int], bool]) -> int:
    """The largest batch in 1..MAX_BATCH with fits(batch), 0 if none (fits is monotone)."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= MAX_BATCH and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, MAX_BATCH + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def memfit_fits(name: str, seq: int, cap: int, budget: bool) -> Callable[[int], bool]:
    def fits(batch: int) -> bool:
        example = resolve_model(name, device="meta")
        options = CompileOptions(batch_size=batch, seq_len=seq)
        traced = trace_model(example, lm_loss, options)
        if not budget:
            step = optimize(traced, options)
            return step.plan is not None and step.plan.peak_bytes <= cap
        n_layers = len(getattr(example.module, "blocks", [1]))
        try:
            compile_within(traced, options, Budget(nbytes=cap), n_layers)
        except BudgetError:
            return False
        return True

    return fits


def eager_model(name: str, seq: int) -> Callable[[int, int], float] | None:
    """peak(b, T) fitted to measurements at T0 = seq // 4 (batch 1, 2) and 2·T0 (batch 1)."""
    t0 = max(seq // 4, 1)
    p11, p21, p12 = (eager_peak(name, b, t)[0] for b, t in ((1, t0), (2, t0), (1, 2 * t0)))
    per_sample_t0 = p21 - p11  # a·T0 + c·T0²
    fixed = p11 - per_sample_t0
    per_sample_2t0 = p12 - fixed  # a·2T0 + c·4T0²
    c = (per_sample_2t0 - 2 * per_sample_t0) / (2 * t0 * t0)
    a = (per_sample_t0 - c * t0 * t0) / t0
    if a <= 0 or c < 0:
        return None
    return lambda b, t: fixed + b * (a * t + c * t * t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="MODEL:SEQ")
    parser.add_argument("--caps", default="4GiB,8GiB")
    args = parser.parse_args()
    name, seq_text = args.config.split(":")
    seq = int(seq_text)
    caps = [parse_size(c, "--caps") for c in args.caps.split(",")]
    eager = eager_model(name, seq)
    print(f"{name}, seq {seq}: largest batch whose step peak fits the cap (AdamW, fp32)")
    for cap in caps:
        found = largest(lambda b, c=cap: eager(b, seq) <= c) if eager else "n/a"
        row = [f"eager (extrapolated) {found}"]
        row.append(f"memfit default {largest(memfit_fits(name, seq, cap, budget=False))}")
        row.append(f"memfit budget {largest(memfit_fits(name, seq, cap, budget=True))}")
        print(f"  cap {fmt_bytes(cap)}: " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main()
