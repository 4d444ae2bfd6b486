"""Fit a step into a memory budget, with the arena plan in the loop; and the Pareto sweep.

A budget is bytes (`12GB`, `800MiB`: the planned step peak, arena plus parameters, optimizer
states, batch and kernel scratch) or a fraction (`0.5`: of the activation bytes the backward
reads with no recomputation). Bytes are met by searching recompute policies on what the real
plan measures (`fit_bytes`), so the answer holds for the arena, not for an estimate.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from compiler.compile import CompiledStep, CompileOptions, TracedStep, optimize
from compiler.errors import MemfitError
from compiler.ir import Role
from compiler.passes.recompute import InfeasibleBudgetError, RecomputePolicy
from compiler.plan import fmt_bytes

MAX_ROUNDS = 8
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


class BudgetError(MemfitError):
    """The budget is malformed, or no recomputation fits the step into it."""


@dataclass(frozen=True)
class Budget:
    nbytes: int | None = None  # planned step peak
    fraction: float | None = None  # of no-recompute activation bytes

    @classmethod
    def parse(cls, text: str) -> Budget:
        """'0.5' → a fraction; '12GB', '800MiB', '123456' → bytes."""
        m = _SIZE.fullmatch(text)
        if m and not m.group(2) and ("." in m.group(1) or float(m.group(1)) <= 1):
            fraction = float(m.group(1))
            if not 0 < fraction <= 1:
                raise BudgetError(f"--memory-budget fraction {text!r} must be in (0, 1]")
            return cls(fraction=fraction)
        return cls(nbytes=parse_size(text, "--memory-budget"))


def parse_size(text: str, flag: str) -> int:
    """'8GiB', '512 MB', '1.5GB', '123456' (bytes) → bytes."""
    m = _SIZE.fullmatch(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise BudgetError(
            f"{flag} {text!r} is not a size: write a number with an optional unit, e.g. 16GiB,"
            " 512MB or 1000000 (bytes); units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        )
    nbytes = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if nbytes <= 0:
        raise BudgetError(f"{flag} {text!r} must be more than 0 bytes")
    return nbytes


Planner = Callable[[RecomputePolicy], CompiledStep]  # recompute policy → the planned step


def compile_within(
    traced: TracedStep, options: CompileOptions, budget: Budget | None, n_layers: int | None = None
) -> CompiledStep:
    """The least-recompute compilation of `traced` whose plan fits `budget` (None: the
    options' own recompute policy)."""
    if budget is None:
        return optimize(traced, options)
    if budget.fraction is not None:
        policy = RecomputePolicy(activation_fraction=budget.fraction)
        return optimize(traced, replace(options, recompute=policy))
    assert budget.nbytes is not None
    step = fit_bytes(
        lambda policy: optimize(traced, replace(options, recompute=policy)), budget.nbytes, n_layers
    )
    if step is None:
        raise _infeasible(traced, options, budget.nbytes, n_layers)
    return step


def fit_bytes(plan: Planner, nbytes: int, n_layers: int | None = None) -> CompiledStep | None:
    """The least-recompute plan whose step peak is at most `nbytes`, or None.

    Two searches, the cheaper fit wins: the recompute program, its activation budget lowered
    round by round by what the real plan is over; and (given `n_layers`) per-layer
    checkpointing of as few leading blocks as fit. The program counts saved bytes, not the
    burst of values one backward use recomputes at once, so where that burst sets the peak,
    checkpointing fits budgets the program's plans miss. Neither search is complete, since
    the peak is not monotone in the bytes saved (a looser activation budget can peak lower), so
    when both miss, the sweep's fractions are tried: a budget a swept plan meets is met.
    """
    fits = [_programmed(plan, nbytes)]
    if n_layers:
        fits.append(_checkpointed(plan, nbytes, n_layers, fits[0]))
    found = [step for step in fits if step is not None]
    if not found:
        swept = (plan(RecomputePolicy(activation_fraction=f)) for f in FRACTIONS)
        found = [step for step in swept if _fits(step, nbytes)]
    return min(found, key=_extra_flops) if found else None


def _extra_flops(step: CompiledStep) -> int:
    report = step.context.recompute
    return report.extra_flops if report else 0


def _fits(step: CompiledStep, nbytes: int) -> bool:
    return step.peak_bytes <= nbytes


def _programmed(plan: Planner, nbytes: int) -> CompiledStep | None:
    """The recompute program's plan, its activation budget iterated on the real plan's peak
    (from the min-cut down, at most to the fewest bytes any choice saves)."""
    step = plan(RecomputePolicy())  # the min-cut: cheap ops only
    report = step.context.recompute
    activation = report.saved_bytes_after if report else 0
    floor = 0  # until the program says how few bytes any choice saves
    for _ in range(MAX_ROUNDS):
        assert step.plan is not None
        over = step.plan.peak_bytes - nbytes
        if over <= 0:
            return step
        if activation == floor:  # the fewest saved bytes are still over
            return None
        activation = max(activation - over, floor)
        try:
            step = plan(RecomputePolicy(activation_budget=activation))
        except InfeasibleBudgetError as e:
            floor = activation = e.smallest
            step = plan(RecomputePolicy(activation_budget=activation))
    step = fewest_saved(plan)  # out of rounds: the last resort
    return step if _fits(step, nbytes) else None


def fewest_saved(plan: Planner) -> CompiledStep:
    """The program's plan that saves the fewest bytes, whatever it recomputes."""
    try:
        return plan(RecomputePolicy(activation_budget=0))
    except InfeasibleBudgetError as e:
        return plan(RecomputePolicy(activation_budget=e.smallest))


def _checkpointed(
    plan: Planner, nbytes: int, n_layers: int, programmed: CompiledStep | None
) -> CompiledStep | None:
    """Checkpointing of the fewest leading blocks that fits (fewer blocks, more bytes, fewer
    FLOPs); skipped when one block already costs more than `programmed`. The peak falls about
    linearly with the blocks checkpointed, so each probe interpolates between the bracket's
    peaks (a bisection step whenever that did not halve the bracket): about two plans
    instead of log2(n_layers)."""

    def blocks(m: int) -> CompiledStep:
        return plan(RecomputePolicy(checkpoint_layers=n_layers, checkpoint_blocks=m))

    fewest = blocks(1)
    if programmed is not None and _extra_flops(programmed) <= _extra_flops(fewest):
        return None
    if _fits(fewest, nbytes):
        return fewest
    best = blocks(n_layers)
    if not _fits(best, nbytes):
        return None
    assert fewest.plan is not None and best.plan is not None
    lo, hi = 1, n_layers  # blocks(lo) does not fit, blocks(hi) does
    peak_lo, peak_hi = fewest.plan.peak_bytes, best.plan.peak_bytes
    interpolate = True
    while hi - lo > 1:
        if interpolate and peak_lo > peak_hi:
            mid = lo + -(-(peak_lo - nbytes) * (hi - lo) // (peak_lo - peak_hi))
            mid = min(max(mid, lo + 1), hi - 1)
        else:
            mid = (lo + hi) // 2
        width = hi - lo
        step = blocks(mid)
        assert step.plan is not None
        if _fits(step, nbytes):
            best, hi, peak_hi = step, mid, step.plan.peak_bytes
        else:
            lo, peak_lo = mid, step.plan.peak_bytes
        interpolate = 2 * (hi - lo) <= width
    return best


def _infeasible(
    traced: TracedStep, options: CompileOptions, nbytes: int, n_layers: int | None
) -> BudgetError:
    """Name the smallest achievable peak and what dominates it.

    The fewest saved bytes is not the lowest peak (recomputing much at once has its own peak),
    so the smallest peak of the tightest policies is reported.
    """
    policies = [RecomputePolicy(activation_fraction=f) for f in FRACTIONS[-2:]]
    if n_layers:
        policies.append(RecomputePolicy(checkpoint_layers=n_layers))
    candidates = [replace(options, recompute=p) for p in policies]
    plans = [optimize(traced, c).plan for c in candidates]
    plan = min((p for p in plans if p is not None), key=lambda p: p.peak_bytes)
    largest = max(plan.values, key=lambda v: v.size)
    by_role = sorted(plan.breakdown().items(), key=lambda kv: -kv[1])
    dominant = ", ".join(f"{r} {fmt_bytes(b)}" for r, b in by_role[:3] if b)
    return BudgetError(
        f"no recomputation fits a {fmt_bytes(nbytes)} budget: the smallest achievable step peak"
        f" is {fmt_bytes(plan.peak_bytes)} (at the peak: {dominant}; the largest single tensor"
        f" is %{largest.name}, {fmt_bytes(largest.size)} ({largest.role}))"
    )


@dataclass(frozen=True)
class SweepPoint:
    label: str
    peak_bytes: int
    activation_bytes: int
    extra_flops: int
    step_flops: int

    @property
    def extra_percent(self) -> float:
        return 100 * self.extra_flops / max(self.step_flops, 1)


FRACTIONS = (0.75, 0.5, 0.35, 0.25, 0.15, 0.1)


def sweep_budgets(traced: TracedStep, options: CompileOptions, n_layers: int) -> list[SweepPoint]:
    """Peak vs extra FLOPs over budgets, with no-recompute and per-layer checkpointing."""
    runs: list[tuple[str, RecomputePolicy | None]] = [("no recompute", None)]
    runs += [("min-cut (default)", RecomputePolicy())]
    runs += [(f"budget {f:g}", RecomputePolicy(activation_fraction=f)) for f in FRACTIONS]
    runs += [("per-layer checkpointing", RecomputePolicy(checkpoint_layers=n_layers))]
    if n_layers > 1:
        last_kept = RecomputePolicy(checkpoint_layers=n_layers, checkpoint_blocks=n_layers - 1)
        runs += [("checkpoint all but last", last_kept)]
    points = []
    for label, policy in runs:
        step = optimize(traced, replace(options, recompute=policy))
        assert step.plan is not None
        report = step.context.recompute
        activation = step.plan.breakdown().get(Role.ACTIVATION, 0)
        points.append(
            SweepPoint(
                label,
                step.plan.peak_bytes,
                activation,
                _extra_flops(step),
                (report.step_flops if report else 0) or 1,
            )
        )
    return points
