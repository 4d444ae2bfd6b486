"""`memfit plan MODEL`: where every byte of one training step lives, without running it.

The model is built on the meta device (no weights allocated), traced, and planned: the table
shows bytes by role at the peak and the arena against its lower bound; json, png and html are
the same plan for tools and for people (schema: docs/plan-schema.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import click
from rich.console import Console

from compiler.compile import CompileOptions, compile_model
from compiler.errors import MemfitError
from compiler.passes.precision import PRECISIONS
from compiler.plan import MemoryPlan, fmt_bytes
from compiler.plan_render import write_html, write_png
from examples.loss import lm_loss
from memfit.models import resolve_model
from memfit.options import model_shape_options

FORMATS = ("table", "json", "png", "html")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")

console = Console()


class PlanError(MemfitError):
    """A `memfit plan` request that makes no sense, or a plan that breaks its budget."""


def parse_size(text: str) -> int:
    """'8GiB', '512 MB', '1.5GB', '123456' (bytes) → bytes."""
    m = _SIZE.fullmatch(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise PlanError(
            f"--memory-budget {text!r} is not a size: write a number with an optional unit,"
            " e.g. 16GiB, 512MB or 1000000 (bytes); units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        )
    nbytes = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if nbytes <= 0:
        raise PlanError(f"--memory-budget {text!r} must be more than 0 bytes")
    return nbytes


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
@click.option(
    "--memory-budget",
    default=None,
    metavar="SIZE",
    help="Fail unless the step's peak (arena + parameters, states, batch) fits, e.g. 16GiB.",
)
def plan_command(
    model: str,
    batch_size: int,
    seq_len: int | None,
    precision: str,
    fmt: str,
    out: Path | None,
    memory_budget: str | None,
) -> None:
    """Plan MODEL's training step (forward, backward, AdamW): schedule, liveness, one arena."""
    if precision not in PRECISIONS:
        raise PlanError(
            f"--precision {precision!r} is not one memfit compiles; valid choices:"
            f" {', '.join(PRECISIONS)}"
        )
    budget = parse_size(memory_budget) if memory_budget is not None else None
    with console.status(f"building {model} on the meta device"):
        example = resolve_model(model, device="meta")
    seq = seq_len or example.block_size
    if seq > example.block_size:
        raise PlanError(
            f"--seq {seq} is longer than {model}'s block size ({example.block_size} tokens)"
        )
    with console.status(f"tracing and planning {model} (batch {batch_size} × {seq})"):
        options = CompileOptions(batch_size=batch_size, seq_len=seq, precision=precision)
        compiled = compile_model(example, lm_loss, options)
    plan = compiled.plan
    assert plan is not None
    plan.config = {"model": model, "batch": batch_size, "seq": seq, "precision": precision}
    _emit(plan, fmt, out or _default_path(model, batch_size, seq, fmt))
    if fmt == "table":
        t = compiled.context.timings
        stats = compiled.context.stats
        console.print(
            f"planned in {t['schedule'] + t['buffers']:.2f} s (schedule {t['schedule']:.2f} s,"
            f" buffers {t['buffers']:.2f} s); live peak {fmt_bytes(stats['schedule.peak_traced'])}"
            f" in the traced order → {fmt_bytes(stats['schedule.peak'])} scheduled"
            f" ({stats['schedule.strategy']})",
            highlight=False,
        )
    if budget is not None and plan.peak_bytes > budget:
        raise PlanError(
            f"the step needs {fmt_bytes(plan.peak_bytes)} at its peak (arena"
            f" {fmt_bytes(plan.arena_bytes)}, plus {fmt_bytes(sum(plan.outside.values()))} of"
            f" parameters, optimizer states and batch) but --memory-budget is"
            f" {fmt_bytes(budget)}: lower --batch or --seq"
        )


def _default_path(model: str, batch: int, seq: int, fmt: str) -> Path | None:
    if fmt in ("table", "json"):
        return None
    return Path(f"plan-{Path(model).stem}-b{batch}-t{seq}.{fmt}")


def _emit(plan: MemoryPlan, fmt: str, path: Path | None) -> None:
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
