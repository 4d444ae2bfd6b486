"""`memfit prepare`: the command line over `pipelines.prepare`.

`memfit/cli.py` registers the command with `cli.add_command(prepare_command, "prepare")`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from pipelines.errors import DataError

if TYPE_CHECKING:  # pyarrow and numpy load when the command runs, not for --help
    from pipelines.manifest import Manifest


class DataErrorExit(click.ClickException):
    """A DataError shown as one paragraph, exit status 2, no traceback."""

    exit_code = 2


@click.command("prepare")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option(
    "--tokenizer",
    default="byte",
    show_default=True,
    help="byte, bpe (trained on INPUTS), or hf:DIR (a Hugging Face model's tokenizer.json).",
)
@click.option(
    "--vocab-size",
    type=click.IntRange(min=257),
    default=8192,
    show_default=True,
    help="BPE vocabulary size (with --tokenizer bpe).",
)
@click.option(
    "--text-column",
    default="text",
    show_default=True,
    help="JSONL field / Parquet column holding the text.",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.01,
    show_default=True,
    help="Share of documents held out for validation.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes [default: 1 for small inputs, else all cores].",
)
@click.option("--overwrite", is_flag=True, help="Replace prepared data already in --out.")
def prepare_command(
    inputs: tuple[Path, ...],
    out: Path,
    tokenizer: str,
    vocab_size: int,
    text_column: str,
    val_fraction: float,
    workers: int | None,
    overwrite: bool,
) -> None:
    """Tokenize text, JSONL or Parquet INPUTS (files or directories) into Arrow files in --out."""
    from pipelines.prepare import prepare

    try:
        manifest = prepare(
            list(inputs),
            out,
            tokenizer,
            vocab_size=vocab_size,
            text_column=text_column,
            val_fraction=val_fraction,
            workers=workers,
            overwrite=overwrite,
        )
    except DataError as e:
        raise DataErrorExit(str(e)) from e
    Console().print(_summary(manifest, out))


def _summary(manifest: Manifest, out: Path) -> Table:
    tokenizer = manifest.tokenizer
    table = Table(title=f"{out} ({tokenizer['kind']} tokenizer, vocab {tokenizer['vocab_size']})")
    for column in ("split", "documents", "tokens", "file", "MB"):
        table.add_column(column, justify="left" if column in ("split", "file") else "right")
    for name, info in manifest.splits.items():
        table.add_row(
            name, f"{info.documents:,}", f"{info.tokens:,}", info.file, f"{info.bytes / 1e6:.1f}"
        )
    return table
