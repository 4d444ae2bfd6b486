"""`memfit compile MODEL`: trace and optimise one training step, write the artifact."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from compiler.artifact import summarize, write_artifact
from compiler.compile import CompileOptions, compile_model, pass_manager
from compiler.ir import Graph
from examples.loss import lm_loss
from memfit.models import resolve_model
from memfit.options import model_shape_options

console = Console()


@click.command()
@model_shape_options
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Artifact directory (default: artifacts/MODEL-bBATCH-tSEQ).",
)
@click.option(
    "--dump-after",
    multiple=True,
    metavar="PASS",
    help="Also write the IR after PASS (repeatable; 'trace' is the traced graph).",
)
def compile_command(
    model: str,
    batch_size: int,
    seq_len: int | None,
    out_dir: Path | None,
    dump_after: tuple[str, ...],
) -> None:
    """Trace MODEL's training step (forward, backward, AdamW) and run the pass pipeline."""
    known = {"trace", *pass_manager().names}
    if unknown := set(dump_after) - known:
        raise click.BadParameter(
            f"{', '.join(sorted(unknown))} (passes: {', '.join(sorted(known))})",
            param_hint="--dump-after",
        )
    with console.status(f"building {model} on the meta device"):
        example = resolve_model(model, device="meta")
    seq = seq_len or example.block_size
    out_dir = out_dir or Path("artifacts") / f"{Path(model).stem}-b{batch_size}-t{seq}"
    options = CompileOptions(
        batch_size=batch_size, seq_len=seq, dump_after=set(dump_after), dump_dir=out_dir
    )
    with console.status(f"tracing {model} (batch {batch_size} × {seq}) and running passes"):
        compiled = compile_model(example, lm_loss, options)
    write_artifact(out_dir, compiled, model)
    console.print(_summary_table(compiled.graph, model, out_dir))


def _summary_table(graph: Graph, model: str, out_dir: Path) -> Table:
    summary = summarize(graph)
    phases = ", ".join(f"{k} {v}" for k, v in summary.nodes_by_phase.items())
    table = Table(
        title=f"{model}: {summary.nodes} nodes ({phases}); {summary.parameters:,} parameters"
    )
    table.add_column("role")
    table.add_column("declared bytes", justify="right")
    for role, nbytes in summary.bytes_by_role.items():
        if nbytes:
            table.add_row(role, f"{nbytes / 2**20:,.1f} MiB")
    table.caption = f"artifact: {out_dir}/ (manifest.json, graph.txt)"
    return table
