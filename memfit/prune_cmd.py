"""`memfit prune MODEL`: what magnitude pruning costs in validation loss on the default corpus.

Trains MODEL densely for --steps on the embedded corpus, then prunes a copy of those weights
(masks applied in the graph, compiler/prune.py) and measures the validation loss one-shot and
after --finetune-steps of training with the masks, next to the dense model trained as long.
`memfit/cli.py` registers the command with `main.add_command(prune_command, "prune")`.
"""

from __future__ import annotations

from itertools import islice
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:  # torch and the compiler load when the command runs, not for --help
    from torch import nn


def revived(module: nn.Module) -> int:
    """Pruned weights that are no longer zero (the masks in the graph keep this at 0)."""
    from compiler.prune import MaskedLinear

    masked = [m for m in module.modules() if isinstance(m, MaskedLinear)]
    return sum(int((m.weight[~m.weight_mask] != 0).sum()) for m in masked)


@click.command()
@click.argument("model", metavar="MODEL", default="gpt2-tiny")
@click.option(
    "--sparsity", type=click.FloatRange(0, 1, max_open=True), default=0.5, show_default=True
)
@click.option(
    "--structured",
    default="unstructured",
    show_default=True,
    help="unstructured, or N:M (e.g. 2:4) kept along the input dimension; n:m means m = 4.",
)
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--finetune-steps", type=click.IntRange(min=0), default=50, show_default=True)
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seq", "seq_len", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--val-batches", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def prune_command(
    model: str,
    sparsity: float,
    structured: str,
    steps: int,
    finetune_steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    val_batches: int,
    seed: int,
) -> None:
    """Prune MODEL's Linear weights by magnitude and report the validation-loss cost."""
    import torch

    from compiler.compile import CompileOptions
    from compiler.models import resolve_model
    from compiler.prune import MaskedLinear, parse_pattern, prune_linears
    from runtime.corpus_runs import corpus_batches, load_state, train_steps, validation_loss

    pattern = parse_pattern(structured, sparsity)
    console = Console()
    torch.manual_seed(seed)
    example = resolve_model(model)
    train = corpus_batches("train", batch_size, seq_len, seed)
    val = list(islice(corpus_batches("val", batch_size, seq_len), val_batches))
    options = CompileOptions(batch_size=batch_size, seq_len=seq_len)
    with console.status(f"training {model} densely for {steps} steps"):
        program, _ = train_steps(example, train, steps, lr, options)
        load_state(example.module, program.state)
        dense = validation_loss(example.module, val)
        snapshot = {k: t.clone() for k, t in program.state.items()}
        for x, y in islice(train, finetune_steps):
            program.step(x, y, lr)
        load_state(example.module, program.state)
        dense_more = validation_loss(example.module, val)
    load_state(example.module, snapshot)
    achieved = prune_linears(example.module, sparsity, pattern)
    with console.status(f"pruned {len(achieved)} Linear weights; fine-tuning with the masks"):
        one_shot = validation_loss(example.module, val)
        program, _ = train_steps(example, train, finetune_steps, lr, options)
        load_state(example.module, program.state)
        tuned = validation_loss(example.module, val)
    table = Table(title=f"{model}: {structured} pruning, sparsity {sparsity:g} (val loss)")
    for column in ("model", "steps", "val loss", "cost"):
        table.add_column(column, justify="left" if column == "model" else "right")
    rows = [
        ("dense", steps, dense, None),
        ("pruned, one-shot", steps, one_shot, dense),
        ("dense", steps + finetune_steps, dense_more, None),
        ("pruned + fine-tuned", steps + finetune_steps, tuned, dense_more),
    ]
    for name, n, loss, reference in rows:
        cost = "" if reference is None else f"{loss - reference:+.4f} ({loss / reference - 1:+.1%})"
        table.add_row(name, str(n), f"{loss:.4f}", cost)
    masked = [m for m in example.module.modules() if isinstance(m, MaskedLinear)]
    weights = sum(m.weight_mask.numel() for m in masked)
    table.caption = (
        f"{len(achieved)} Linear weights ({weights:,} entries; the tied lm_head is kept), batch"
        f" {batch_size}×{seq_len}, lr {lr:g}, {len(val)} validation batches of the embedded corpus"
    )
    console.print(table)
    console.print(f"pruned weights non-zero after fine-tuning: {revived(example.module)}")
