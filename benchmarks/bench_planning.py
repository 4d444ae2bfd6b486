"""How long planning takes after tracing: the default plan, byte budgets and the sweep.

Process CPU time (`time.process_time`, all threads of this process), not wall time: the
machine is shared, and CPU time is what a plan costs whatever else runs. The model is built
on the meta device and traced once (its time is reported apart); each plan then starts from
that trace, as `memfit plan` does.

    PYTHONPATH=. python benchmarks/bench_planning.py gpt2-small:8:1024 --budgets 8GiB,5GiB
"""

from __future__ import annotations

import argparse
import time

from compiler.budget import Budget, BudgetError, compile_within, sweep_budgets
from compiler.compile import CompileOptions, optimize, trace_model
from compiler.models import resolve_model
from compiler.plan import fmt_bytes
from examples.loss import lm_loss


def cpu(fn):  # noqa: ANN001, ANN201
    """(result, CPU seconds) of fn()."""
    start = time.process_time()
    result = fn()
    return result, time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="MODEL:BATCH:SEQ")
    parser.add_argument("--budgets", default="", help="comma-separated byte budgets")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    name, batch, seq = args.config.split(":")
    example = resolve_model(name, device="meta")
    options = CompileOptions(batch_size=int(batch), seq_len=int(seq))
    n_layers = len(getattr(example.module, "blocks", [1]))
    traced, seconds = cpu(lambda: trace_model(example, lm_loss, options))
    print(f"{args.config}: trace {seconds:.1f} s CPU", flush=True)
    step, seconds = cpu(lambda: optimize(traced, options))
    print(
        f"  default plan: {seconds:.1f} s CPU, peak {fmt_bytes(step.plan.peak_bytes)}", flush=True
    )
    for text in filter(None, args.budgets.split(",")):
        start = time.process_time()
        try:
            step = compile_within(traced, options, Budget.parse(text), n_layers)
            found = f"peak {fmt_bytes(step.plan.peak_bytes)}"
        except BudgetError:  # an infeasible budget is a result too
            found = "infeasible"
        seconds = time.process_time() - start
        print(f"  budget {text}: {seconds:.1f} s CPU, {found}", flush=True)
    if args.sweep:
        points, seconds = cpu(lambda: sweep_budgets(traced, options, n_layers))
        print(f"  --sweep ({len(points)} points): {seconds:.1f} s CPU", flush=True)


if __name__ == "__main__":
    main()
