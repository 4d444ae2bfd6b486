"""`memfit train`: train a model with a compiled step on Arrow data, resumable."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from memfit.cli import ARGS
from memfit.options import lowering_kwargs, lowering_options, mesh_options, planning_options
from runtime.train_config import TrainConfig

if TYPE_CHECKING:
    from runtime.train import Trainer

console = Console()
DEFAULT = TrainConfig()


@click.command()
@click.argument("model", metavar="[MODEL]", default=DEFAULT.model)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A `memfit prepare` directory (default: the embedded corpus).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT.out,
    show_default=True,
    help="Run directory: metrics.jsonl and checkpoints/.",
)
@click.option("--steps", type=int, default=DEFAULT.steps, show_default=True)
@click.option("--batch", "batch_size", type=int, default=DEFAULT.batch_size, show_default=True)
@click.option("--seq", "seq_len", type=int, default=None, help="Default: the model's block size.")
@click.option(
    "--grad-accum",
    type=int,
    default=DEFAULT.grad_accum,
    show_default=True,
    help="Micro-batches per optimizer step.",
)
@click.option("--lr", type=float, default=DEFAULT.lr, show_default=True, help="Peak learning rate.")
@click.option(
    "--warmup",
    type=int,
    default=DEFAULT.warmup,
    show_default=True,
    help="Linear warmup steps, then cosine decay to 10% of --lr.",
)
@click.option("--weight-decay", type=float, default=DEFAULT.weight_decay, show_default=True)
@click.option(
    "--val-every",
    type=int,
    default=DEFAULT.val_every,
    show_default=True,
    help="Validation loss every N steps (0: only at the end).",
)
@click.option(
    "--checkpoint-every",
    type=int,
    default=DEFAULT.checkpoint_every,
    show_default=True,
    help="Checkpoint every N steps (and at the end).",
)
@click.option(
    "--keep-checkpoints",
    type=click.IntRange(min=1),
    default=DEFAULT.keep_checkpoints,
    show_default=True,
    help="How many of the newest checkpoints to keep.",
)
@click.option("--seed", type=int, default=DEFAULT.seed, show_default=True)
@lowering_options
@planning_options
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out.")
@click.option(
    "--deterministic",
    is_flag=True,
    help="Bit-identical runs whatever the thread count (trains on one thread).",
)
@mesh_options(dp_default=None)
@click.option(
    "--document-mask",
    is_flag=True,
    help="Keep attention inside each packed document (split at the data's EOS); positions"
    " restart per document.",
)
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    default=None,
    help="Launch this many ranks here and train on them (as torchrun --standalone does);"
    " --dp/--tp/--zero split them.",
)
def train_command(
    model: str,
    precision: str,
    lora: str | None,
    quantize_base: str | None,
    optimizer: str,
    offload_optimizer: bool,
    nproc_per_node: int | None,
    **options: object,
) -> None:
    """Train MODEL (default: gpt2-tiny on the embedded corpus, CPU) with a compiled step.

    With --nproc-per-node N (or under `torchrun --nproc-per-node N`) each process is one rank
    of a --dp × --tp mesh (gloo on CPU, NCCL on CUDA); rank 0 prints, logs and writes full
    checkpoints, which resume on any mesh.
    """
    if nproc_per_node is not None and "RANK" not in os.environ:
        from runtime.distributed import launch_here

        sys.exit(launch_here(nproc_per_node, _without_nproc(click.get_current_context())))
    from compiler.plan import fmt_bytes  # torch and the compiler load when a run starts, not
    from runtime.train import Trainer  # for --help

    lowering = lowering_kwargs(precision, lora, quantize_base, optimizer, offload_optimizer)
    cfg = TrainConfig(model=model, **lowering, **options)  # type: ignore[arg-type]
    if int(os.environ.get("RANK", "0")):  # other ranks train quietly
        console.quiet = True
    with console.status("preparing data and compiling the step") as status:
        trainer = Trainer(cfg, progress=status.update)
    for notice in trainer.notices:
        console.print(f"[bold]note:[/] {notice}", highlight=False)
    _print_plan(trainer)
    first: float | None = None
    last = None
    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=cfg.steps, completed=trainer.step, loss=0.0, tps=0)
        for record in trainer.run():
            first = record.loss if first is None else first
            last = record
            progress.update(
                task,
                completed=record.step,
                loss=record.loss,
                tps=record.tokens / max(record.seconds, 1e-9),
            )
            if record.val_loss is not None:
                progress.console.print(f"step {record.step}: val loss {record.val_loss:.4f}")
    if trainer.parallel is not None:
        trainer.parallel.close()
    if last is not None and first is not None:
        console.print(
            f"trained {cfg.model} ({trainer.vocab_size:,}-token vocabulary"
            f"{', from the data' if trainer.vocab_from_data else ''}) to step {last.step}:"
            f" loss {first:.4f} → {last.loss:.4f}"
            f" (validation {'n/a' if last.val_loss is None else f'{last.val_loss:.4f}'});"
            f" run directory {cfg.out}"
        )
    if trainer.measured_peak is not None:
        measured, planned = trainer.measured_peak, trainer.planned_peak
        console.print(
            f"measured peak {fmt_bytes(measured)} / planned {fmt_bytes(planned)}"
            f" = {measured / planned:.3f}",
            highlight=False,
        )


def _print_plan(trainer: Trainer) -> None:
    from compiler.plan import fmt_bytes

    """The plan about to run: bytes by role at the peak, recomputation's cost, the backend."""
    step = trainer.compiled
    if step.plan is None:  # a mesh rank's step is run unplanned
        console.print(f"backend {trainer.backend} (unplanned)", highlight=False)
        return
    cfg = trainer.cfg
    step.plan.config = {"model": cfg.model, "batch": cfg.batch_size, "seq": trainer.seq_len}
    step.plan.config |= {"precision": cfg.precision, "backend": trainer.backend}
    if cfg.grad_accum > 1:
        step.plan.config["grad accum"] = cfg.grad_accum
    console.print(step.plan.table())
    how = "one arena" if trainer.arena is not None else "allocator-managed, op by op"
    console.print(
        f"backend {trainer.backend} ({how}); planned peak {fmt_bytes(trainer.planned_peak)};"
        f" recomputation +{step.plan.extra_flops_percent:.2f}% FLOPs",
        highlight=False,
    )


def _without_nproc(ctx: click.Context) -> list[str]:
    """The command line the ranks run: this one without --nproc-per-node."""
    args, kept = ctx.meta[ARGS], []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            kept.append(arg)
    return kept
