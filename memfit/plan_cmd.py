"""`memfit plan MODEL`: where every byte of one training step lives, without running it.

The model is built on the meta device (no weights allocated), traced, and planned: the table
shows bytes by role at the peak and the arena against its lower bound; json, png and html are
the same plan for tools and for people (schema: docs/plan-schema.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from compiler.precisions import PRECISIONS
from memfit.options import (
    PlanError,
    adapter_options,
    lowering_kwargs,
    mesh_options,
    model_shape_options,
    planning_options,
)

if TYPE_CHECKING:
    from compiler.budget import SweepPoint
    from compiler.plan import MemoryPlan

FORMATS = ("table", "json", "png", "html")

console = Console()


@click.command()
@model_shape_options
@click.option(
    "--precision",
    default="fp32",
    show_default=True,
    help=f"Compute precision of the planned step ({', '.join(PRECISIONS)}).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="table: terminal summary; json: the whole plan; png/html: timeline and arena map.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File for json/png/html (default: json to stdout, png/html to plan-MODEL-bB-tT.EXT).",
)
@adapter_options
@mesh_options()
@planning_options
@click.option(
    "--sweep",
    is_flag=True,
    help="Peak memory vs extra FLOPs over budgets (with no recompute and per-layer"
    " checkpointing); --format png draws it.",
)
def plan_command(
    model: str,
    batch_size: int,
    seq_len: int | None,
    precision: str,
    fmt: str,
    out: Path | None,
    memory_budget: str | None,
    lora: str | None,
    quantize_base: str | None,
    optimizer: str,
    offload_optimizer: bool,
    dp: int,
    tp: int,
    zero: int,
    recompute: bool,
    device_memory: str | None,
    backend: str,
    sweep: bool,
) -> None:
    """Plan MODEL's training step (forward, backward, AdamW): schedule, liveness, one arena.

    With --dp/--tp/--zero (or --device-memory) it plans one rank of that mesh from shapes only.
    """
    # the compiler (torch, scipy) loads when a plan is made, not for --help
    import torch

    from compiler.budget import Budget, compile_within, sweep_budgets
    from compiler.compile import CompileOptions, trace_model
    from compiler.models import resolve_model
    from compiler.models.adapter import decoder_blocks
    from compiler.passes.recompute import RecomputePolicy
    from compiler.plan import fmt_bytes
    from examples.loss import lm_loss
    from memfit.parallel_cmd import parallel_plan_command
    from runtime.backend import fusion_of, planned_backend

    if dp * tp > 1 or zero or device_memory:
        _refuse_with_a_mesh(
            {
                "--format": fmt if fmt in ("png", "html") else None,
                "--out": out,
                "--lora": lora,
                "--quantize-base": quantize_base,
                "--optimizer": optimizer if optimizer != "adamw" else None,
                "--offload-optimizer": offload_optimizer or None,
                "--sweep": sweep or None,
            },
            memory_budget,
        )
        click.get_current_context().invoke(
            parallel_plan_command,
            model=model,
            batch_size=batch_size,
            seq_len=seq_len,
            dp=dp,
            tp=tp,
            zero=zero,
            precision=precision,
            device_memory=device_memory,
            memory_budget=memory_budget,
            recompute=recompute,
            fmt=fmt if fmt in ("table", "json") else "table",
        )
        return
    if precision not in PRECISIONS:
        raise PlanError(
            f"--precision {precision!r} is not one memfit compiles; valid choices:"
            f" {', '.join(PRECISIONS)}"
        )
    budget = Budget.parse(memory_budget) if memory_budget is not None else None
    with console.status(f"building {model} on the meta device"):
        example = resolve_model(model, device="meta")
    seq = seq_len or example.block_size
    if seq > example.block_size:
        raise PlanError(
            f"--seq {seq} is longer than {model}'s block size ({example.block_size} tokens)"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = planned_backend(backend, device)  # on a CPU machine plan triton only if asked
    options = CompileOptions(
        batch_size=batch_size,
        seq_len=seq,
        recompute=RecomputePolicy() if recompute else None,
        backend=fusion_of(backend),
        **lowering_kwargs(precision, lora, quantize_base, optimizer, offload_optimizer),
    )
    with console.status(f"tracing {model} (batch {batch_size} × {seq})"):
        traced = trace_model(example, lm_loss, options)
    config = {"model": model, "batch": batch_size, "seq": seq, "precision": precision}
    if backend == "triton":  # the only backend that changes the plan (fused groups)
        config["backend"] = backend
    config |= {k: v for k, v in (("lora", lora), ("quantize_base", quantize_base)) if v}
    if optimizer != "adamw":
        config["optimizer"] = optimizer
    if offload_optimizer:
        config["offload_optimizer"] = True
    n_layers = len(decoder_blocks(example.module) or [1])
    if sweep:
        with console.status("planning the sweep"):
            points = sweep_budgets(traced, options, n_layers)
        _emit_sweep(points, config, fmt, out or _default_path(model, batch_size, seq, fmt))
        return
    with console.status(f"planning {model}"):
        compiled = compile_within(traced, options, budget, n_layers)
    plan = compiled.plan
    assert plan is not None
    plan.config = config | ({"memory_budget": memory_budget} if budget else {})
    _emit(plan, fmt, out or _default_path(model, batch_size, seq, fmt))
    if fmt == "table":
        t, order = compiled.context.timings, compiled.context.schedule
        assert order is not None
        console.print(
            f"planned in {t['schedule'] + t['buffers']:.2f} s (schedule {t['schedule']:.2f} s,"
            f" buffers {t['buffers']:.2f} s); live peak {fmt_bytes(order.peak_traced)}"
            f" in the traced order → {fmt_bytes(order.peak)} scheduled ({order.strategy})",
            highlight=False,
        )


def _emit_sweep(points: list[SweepPoint], config: dict, fmt: str, path: Path | None) -> None:
    from compiler.plan import fmt_bytes
    from compiler.sweep_render import write_sweep_png

    if fmt == "json":
        doc = json.dumps({"config": config, "points": [asdict(p) for p in points]}, indent=1)
        click.echo(doc) if path is None else path.write_text(doc + "\n")
        return
    table = Table(title="peak memory vs recomputation: " + ", ".join(map(str, config.values())))
    for column in ("plan", "step peak", "activations at peak", "extra FLOPs"):
        table.add_column(column, justify="left" if column == "plan" else "right")
    for p in points:
        table.add_row(
            p.label,
            fmt_bytes(p.peak_bytes),
            fmt_bytes(p.activation_bytes),
            f"{p.extra_percent:.2f}%",
        )
    console.print(table)
    if fmt != "table":
        assert path is not None
        write_sweep_png(points, config, path.with_suffix(".png"))
        console.print(f"wrote {path.with_suffix('.png')}", highlight=False)


def _default_path(model: str, batch: int, seq: int, fmt: str) -> Path | None:
    if fmt in ("table", "json"):
        return None
    return Path(f"plan-{Path(model).stem}-b{batch}-t{seq}.{fmt}")


def _emit(plan: MemoryPlan, fmt: str, path: Path | None) -> None:
    from compiler.plan_render import write_html, write_png

    if fmt == "table":
        console.print(plan.table())
    elif fmt == "json" and path is None:
        click.echo(plan.to_json(), nl=False)
    elif fmt == "json":
        path.write_text(plan.to_json())
    elif fmt in ("png", "html"):
        assert path is not None
        (write_png if fmt == "png" else write_html)(plan, path)
        console.print(f"wrote {path}", highlight=False)


def _refuse_with_a_mesh(given: dict[str, object], memory_budget: str | None) -> None:
    """Flags the per-rank plan of a mesh does not honour yet: refused before any planning,
    rather than planned without them."""
    from compiler.budget import Budget

    ignored = [
        flag if value is True else f"{flag} {value}" for flag, value in given.items() if value
    ]
    if ignored:
        raise PlanError(
            f"{', '.join(ignored)}: not planned with a mesh (--dp/--tp/--zero/--device-memory)"
            " yet; the per-rank plan prints a table or json (--format json). Drop the flag, or"
            " plan one process without the mesh flags"
        )
    if memory_budget is not None and Budget.parse(memory_budget).fraction is not None:
        raise PlanError(
            f"--memory-budget {memory_budget}: a fraction of the activation memory is planned"
            " for one process; with a mesh give the rank's size, e.g. --memory-budget 40GB"
        )
