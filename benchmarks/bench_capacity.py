"""The largest batch that fits a memory cap: eager PyTorch against memfit's plans.

Every number is a whole training step's peak (fp32, AdamW unless a column says otherwise):
parameters, gradients, optimizer states, activations and the batch.

eager (measured): PyTorch's step peak at the allocator on the CPU (bench_memory's `eager_peak`:
forward, backward, AdamW.step, zero_grad, on top of the parameters, moments and batch), measured
at the real sequence length for batch 1 and 2. At a fixed sequence length everything that grows
with the batch (activations, the batch, attention scores) grows linearly in it, so the peak is
P + b·A, fitted exactly to the two; a third batch (`--eager-check`) is measured and printed
beside the line's prediction, and the largest eager batch is the floor of (cap - P) / A.

memfit: its plans on the meta device (no weights, no step run): the planned step peak (arena +
parameters + optimizer states + batch + kernel scratch; measured = planned, see bench_memory),
by bisection over the batch, per column of `COLUMNS`: CompileOptions overrides, and whether the
cap is also the byte budget (`--memory-budget`: the least recompute that fits). A trace is the
expensive part, so each batch is traced once per set of trace-relevant overrides and planned
for every column and cap that shares it; every answer is cached per (batch, column, cap).

    PYTHONPATH=. python benchmarks/bench_capacity.py gpt2-small:1024 llama-small:1024 \\
        --caps 4GiB,8GiB
"""

from __future__ import annotations

import argparse
import datetime
import math
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from benchmarks.bench_memory import eager_peak
from compiler.budget import fit_bytes, parse_size
from compiler.compile import CompiledStep, CompileOptions, TracedStep, optimize, trace_model
from compiler.models import resolve_model
from compiler.models.adapter import decoder_blocks
from compiler.plan import fmt_bytes
from examples.loss import lm_loss

MAX_BATCH = 256  # a trace on the meta device costs the same at any batch (~3 s for gpt2-small)
EAGER_BATCHES = (1, 2)  # the line's two points
EAGER_CHECK = 3  # the batch that checks the line
TRACES = 16  # traces kept for reuse (tens of MB each)


@dataclass(frozen=True)
class Column:
    """One memfit configuration of the table: a new column is one entry of `COLUMNS`."""

    label: str
    overrides: Mapping[str, object] = field(default_factory=dict)  # CompileOptions fields
    budget: bool = False  # the cap is also the byte budget (least recompute that fits)


COLUMNS: tuple[Column, ...] = (
    Column("memfit default"),  # the default plan: min-cut recompute
    Column("memfit budget", budget=True),
    Column("memfit 8-bit", {"optimizer": "adamw8bit"}, budget=True),
    Column("memfit offload", {"offload_optimizer": True}),
    Column("memfit budget + offload", {"offload_optimizer": True}, budget=True),
)

# CompileOptions fields that `optimize` reads and `trace_model` does not (and that key the
# trace's shared pre-recompute passes): columns differing only in these share a trace. Any
# other override (the optimizer, a new option) gets its own trace, which is always correct.
PLAN_ONLY = frozenset(
    {
        "recompute",
        "precision",
        "backend",
        "fused_cross_entropy",
        "accumulate_grads",
        "offload_optimizer",
    }
)


def trace_key(column: Column) -> tuple[tuple[str, str], ...]:
    """What of a column's overrides its trace depends on."""
    return tuple(sorted((k, repr(v)) for k, v in column.overrides.items() if k not in PLAN_ONLY))


def largest(fits: Callable[[int], bool], limit: int, known: int = 0) -> int:
    """The largest batch in 1..limit with fits(batch), 0 if none: doubling, then bisection.

    `fits` is taken to be monotone (true up to some batch, false beyond). `known` is a batch
    known to fit (0: none), e.g. the answer under a smaller cap, so a search starts there.
    A result equal to `limit` means "at least limit"."""
    lo = min(known, limit)
    if lo == 0:
        if limit < 1 or not fits(1):
            return 0
        lo = 1
    hi = 2 * lo
    while hi <= limit and fits(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, limit + 1)  # fits(lo), not fits(hi) (limit + 1: never asked)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@dataclass(frozen=True)
class LinearPeak:
    """peak(b) = fixed + b · per_sample: exact at a fixed sequence length, where everything
    that grows with the batch grows linearly in it."""

    fixed: float  # P: parameters, moments, gradients, what does not scale with the batch
    per_sample: float  # A: activations and batch bytes of one sample

    @classmethod
    def through(cls, b1: int, peak1: float, b2: int, peak2: float) -> LinearPeak:
        """The line through two measured (batch, peak) points."""
        if b1 == b2:
            raise ValueError(f"two distinct batches are needed, got {b1} twice")
        per_sample = (peak2 - peak1) / (b2 - b1)
        return cls(peak1 - b1 * per_sample, per_sample)

    def at(self, batch: int) -> float:
        return self.fixed + batch * self.per_sample

    def largest(self, cap: float) -> int:
        """The largest batch whose predicted peak is at most `cap` (0 if none)."""
        if self.per_sample <= 0:
            raise ValueError(f"the peak does not grow with the batch ({self.per_sample:+.0f} B)")
        return max(math.floor((cap - self.fixed) / self.per_sample), 0)


@dataclass(frozen=True)
class Answer:
    """memfit's plan at one batch: its step peak, None when no plan fits the budget."""

    peak: int | None
    extra_flops: float = 0.0  # recomputation's share of the step's FLOPs


class Memfit:
    """memfit's answers for one model and sequence length, traced and planned on demand."""

    def __init__(self, name: str, seq: int, log: Callable[[str], None]) -> None:
        self.name, self.seq, self.log = name, seq, log
        self.answers: dict[tuple[int, str, int], Answer] = {}  # (batch, column, cap)
        self.traced: dict[tuple[int, tuple[tuple[str, str], ...]], TracedStep] = {}
        self.traces = self.plans = 0

    def trace(self, column: Column, batch: int) -> TracedStep:
        """The column's step at `batch`, traced once for every column sharing its trace key
        (the oldest traces beyond TRACES are dropped: the caps' searches revisit few)."""
        key = (batch, trace_key(column))
        if key not in self.traced:
            while len(self.traced) >= TRACES:
                del self.traced[next(iter(self.traced))]
            self.traced[key] = self._trace(column, batch)
        return self.traced[key]

    def _trace(self, column: Column, batch: int) -> TracedStep:
        start = time.perf_counter()
        example = resolve_model(self.name, device="meta")
        self.n_layers = len(decoder_blocks(example.module) or [1])
        traced = trace_model(example, lm_loss, self.options(column, batch))
        self.traces += 1
        what = f" {dict(trace_key(column))}" if trace_key(column) else ""
        self.log(f"traced batch {batch}{what} in {time.perf_counter() - start:.1f} s")
        return traced

    def options(self, column: Column, batch: int) -> CompileOptions:
        return replace(CompileOptions(batch_size=batch, seq_len=self.seq), **column.overrides)

    def plan(self, traced: TracedStep, options: CompileOptions) -> CompiledStep:
        self.plans += 1
        return optimize(traced, options)

    def answer(self, column: Column, batch: int, cap: int) -> Answer:
        """The column's plan at `batch` under `cap` (a default plan does not depend on the cap,
        so it is cached under cap 0)."""
        key = (batch, column.label, cap if column.budget else 0)
        if key not in self.answers:
            start = time.perf_counter()
            traced = self.trace(column, batch)
            options = self.options(column, batch)
            if column.budget:
                step = fit_bytes(
                    lambda policy: self.plan(traced, replace(options, recompute=policy)),
                    cap,
                    self.n_layers,
                )
            else:
                step = self.plan(traced, options)
            self.answers[key] = found = _answer(step)
            peak = fmt_bytes(found.peak) if found.peak is not None else "no plan within"
            within = f" within {fmt_bytes(cap)}" if column.budget else ""
            seconds = time.perf_counter() - start
            self.log(f"{column.label}{within}, batch {batch}: {peak} ({seconds:.1f} s)")
        return self.answers[key]

    def fits(self, column: Column, cap: int) -> Callable[[int], bool]:
        def fits(batch: int) -> bool:
            peak = self.answer(column, batch, cap).peak
            return peak is not None and peak <= cap

        return fits


def _answer(step: CompiledStep | None) -> Answer:
    if step is None:
        return Answer(None)
    report = step.context.recompute
    share = report.extra_flops / report.step_flops if report and report.step_flops else 0.0
    return Answer(step.peak_bytes, share)


def eager_line(
    name: str, seq: int, check: int | None, log: Callable[[str], None]
) -> tuple[LinearPeak, list[str]]:
    """The eager peak's line through batches EAGER_BATCHES at `seq`, and the lines that report
    it (with the measurement at batch `check` beside its prediction)."""
    measured = {}
    for batch in (*EAGER_BATCHES, *([check] if check else [])):
        start = time.perf_counter()
        measured[batch] = eager_peak(name, batch, seq)[0]
        seconds = time.perf_counter() - start
        log(f"eager batch {batch}: {fmt_bytes(measured[batch])} ({seconds:.0f} s)")
    (b1, p1), (b2, p2) = ((b, measured[b]) for b in EAGER_BATCHES)
    line = LinearPeak.through(b1, p1, b2, p2)
    lines = [
        f"eager: measured {fmt_bytes(p1)} at batch {b1}, {fmt_bytes(p2)} at batch {b2};"
        f" peak(b) = P + b·A with P = {fmt_bytes(line.fixed)}, A = {fmt_bytes(line.per_sample)}"
    ]
    if check:
        got, want = measured[check], line.at(check)
        lines.append(
            f"eager check at batch {check}: measured {fmt_bytes(got)}, predicted"
            f" {fmt_bytes(want)} ({100 * (got - want) / want:+.2f}%)"
        )
    else:
        lines.append("eager check: not measured (--eager-check 0); the line is unchecked")
    return line, lines


NOTES = (
    "eager: allocator peak of forward + backward + AdamW.step + zero_grad (gradients and"
    " temporaries), plus parameters, AdamW moments and the batch held across the step;"
    " predicted at the answered batch by the line.",
    "memfit: planned step peak = arena (activations, gradients, temporaries) + parameters +"
    " optimizer states + batch + kernel scratch, on the meta device; in parentheses the planned"
    " peak at the answered batch, and for a budget column recomputation's extra FLOPs.",
    "memfit default: the default plan (min-cut recompute); memfit budget: --memory-budget equal"
    " to the cap (the least recompute that fits); memfit 8-bit: --optimizer adamw8bit (int8"
    " moments, fp32 block scales) with the same budget.",
    "memfit offload: --offload-optimizer (AdamW moments in host memory, updated by the CPU"
    " during the backward), the default plan or the same budget; its peak is the device's"
    " (the host holds the moments and the updates' copies, 1.85 GiB for gpt2-small).",
)


def run(
    name: str, seq: int, caps: list[int], columns: tuple[Column, ...], limit: int, check: int
) -> None:
    """Print one model's table, a row per cap as soon as it is complete."""
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"  [{time.perf_counter() - start:5.0f} s] {message}", file=sys.stderr, flush=True)

    print(f"{name}, seq {seq}: largest batch whose whole training step peak fits the cap")
    line, lines = eager_line(name, seq, check, log)
    eager_seconds = time.perf_counter() - start
    for text in lines:
        print(text, flush=True)
    labels = ["cap", "eager (measured)", *(c.label for c in columns)]
    print(_row(labels), flush=True)
    memfit = Memfit(name, seq, log)
    known = dict.fromkeys((c.label for c in columns), 0)
    for cap in sorted(caps):  # a larger cap's search starts from the smaller cap's answer
        found = line.largest(cap)
        cells = [f"{found} ({fmt_bytes(line.at(found))})" if found else "0"]
        for column in columns:
            found = largest(memfit.fits(column, cap), limit, known[column.label])
            known[column.label] = found
            cells.append(_cell(memfit, column, found, cap, limit))
        print(_row([fmt_bytes(cap), *cells]), flush=True)
    total = time.perf_counter() - start
    print(
        f"# {name}: {total:.0f} s (eager {eager_seconds:.0f} s; memfit {memfit.traces} traces,"
        f" {memfit.plans} plans, {total - eager_seconds:.0f} s)",
        flush=True,
    )


def _row(cells: list[str]) -> str:
    """A fixed-width row: the cap, then a column per side."""
    first, *rest = cells
    return f"{first:<10}" + "  ".join(f"{cell:<28}" for cell in rest).rstrip()


def _cell(memfit: Memfit, column: Column, found: int, cap: int, limit: int) -> str:
    if found == 0:
        return "0"
    answer = memfit.answer(column, found, cap)
    assert answer.peak is not None
    text = f"{'≥ ' if found == limit else ''}{found} ({fmt_bytes(answer.peak)}"
    return text + (f", +{100 * answer.extra_flops:.1f}% FLOPs)" if column.budget else ")")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="*", metavar="MODEL:SEQ")
    parser.add_argument("--models", dest="more", default="", help="MODEL:SEQ,... (as well)")
    parser.add_argument("--caps", default="4GiB,8GiB")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, help="the searched bound")
    parser.add_argument(
        "--eager-check", type=int, default=EAGER_CHECK, help="batch measured to check (0: none)"
    )
    parser.add_argument("--columns", default="", help="LABEL,... of COLUMNS (default: all)")
    args = parser.parse_args(argv)
    chosen = set(filter(None, args.columns.split(",")))
    if unknown := chosen - {c.label for c in COLUMNS}:
        parser.error(f"--columns: no column {sorted(unknown)}")
    columns = tuple(c for c in COLUMNS if not chosen or c.label in chosen)
    models = [*args.models, *filter(None, args.more.split(","))]
    if not models:
        parser.error("name at least one MODEL:SEQ")
    caps = [parse_size(c, "--caps") for c in args.caps.split(",")]
    command = shlex.join(["python", "benchmarks/bench_capacity.py", *sys.argv[1:]])
    print(f"# PYTHONPATH=. {command}   (CPU, fp32, {datetime.date.today()})")
    for note in NOTES:
        print(f"# {note}")
    print(f"# memfit searches batches 1..{args.max_batch}; '≥ {args.max_batch}': the bound fits")
    for spec in models:
        name, seq = spec.split(":")
        print(flush=True)
        run(name, int(seq), caps, columns, args.max_batch, args.eager_check)


if __name__ == "__main__":
    main()
