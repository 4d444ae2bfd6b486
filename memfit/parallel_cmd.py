"""`memfit plan MODEL --dp N --tp K --zero Z`: one rank's memory on a mesh, without the mesh.

Shapes only (meta tensors): the rank's step is compiled as `memfit train` would compile it on
rank 0 and planned (compiler/parallel_plan.py). Prints bytes by role at the rank's peak, the
hand-derived formula beside it for Llama examples under mixed-precision ZeRO, and with
`--device-memory` the largest batch per rank that fits. Mounted by `memfit plan` when a mesh
flag is given; also runs alone: `python -m memfit.parallel_cmd MODEL ...`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console

from compiler.budget import parse_size
from compiler.mesh import Mesh
from compiler.parallel_plan import example_config, largest_batch, llama_formula, rank_plan
from compiler.plan import fmt_bytes
from compiler.precisions import PRECISIONS, Precision
from examples.llama import LlamaConfig
from memfit.options import PlanError, mesh_options, model_shape_options

console = Console()
F = Callable[..., Any]


@click.command()
@model_shape_options
@mesh_options()
@click.option("--precision", type=click.Choice(PRECISIONS), default="bf16", show_default=True)
@click.option(
    "--device-memory",
    metavar="SIZE",
    default=None,
    help="Find the largest batch per rank whose peak fits, e.g. 80GB.",
)
@click.option("--memory-budget", metavar="SIZE", default=None, help="Fail unless the rank fits.")
@click.option(
    "--recompute/--no-recompute",
    default=True,
    show_default=True,
    help="memfit's min-cut recompute, or keep every activation (Korthikanti's accounting).",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def parallel_plan_command(
    model: str,
    batch_size: int,
    seq_len: int | None,
    dp: int,
    tp: int,
    zero: int,
    precision: str,
    device_memory: str | None,
    memory_budget: str | None,
    recompute: bool,
    fmt: str,
) -> None:
    """Plan one rank of MODEL on a --dp × --tp mesh with ZeRO --zero (shapes only)."""
    mesh, precision = Mesh(dp, tp, zero), Precision(precision)
    with console.status(f"planning rank 0 of {mesh.world} ({mesh})"):
        if device_memory is not None:
            batch_size, plan = largest_batch(
                model,
                mesh,
                precision,
                parse_size(device_memory, "--device-memory"),
                seq_len,
                recompute=recompute,
            )
        else:
            plan = rank_plan(model, mesh, precision, batch_size, seq_len, recompute=recompute)
    cfg = example_config(model)
    formula = None
    if isinstance(cfg, LlamaConfig) and zero >= 1 and precision.low_dtype and not recompute:
        formula = llama_formula(cfg, mesh, precision, max(batch_size, 1), plan.seq)
    if fmt == "json":
        out = plan.to_dict() | {"formula": formula}
        if device_memory is not None:
            out["largest_batch_per_rank"] = batch_size
        click.echo(json.dumps(out, indent=1))
    else:
        console.print(plan.table(formula))
        if device_memory is not None:
            fits = (
                f"{batch_size} rows per rank ({batch_size * dp} per step) fit"
                if batch_size
                else "not even one row per rank fits"
            )
            console.print(f"{device_memory} per device, seq {plan.seq}: {fits}", highlight=False)
    budget = parse_size(memory_budget, "--memory-budget") if memory_budget else None
    if budget is not None and plan.peak > budget:
        raise PlanError(
            f"rank 0 needs {fmt_bytes(plan.peak)} at its peak but --memory-budget is"
            f" {fmt_bytes(budget)}: raise --dp, --tp or --zero, or lower --batch or --seq"
        )


if __name__ == "__main__":
    parallel_plan_command()
