"""memfit's command line: compile, plan, train, prepare data, bench.

Errors a user can act on (bad MODEL, unsupported op, bad data...) print as one paragraph and
exit with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.console import Console

from compiler.errors import MemfitError
from memfit.compile_cmd import compile_command
from memfit.export_cmd import export_command
from memfit.kernels_cmd import inspect_kernels_command
from memfit.plan_cmd import plan_command
from memfit.prepare_cmd import prepare_command
from memfit.prune_cmd import prune_command
from memfit.train_cmd import train_command
from pipelines.errors import DataError

console = Console(stderr=True)


class _Group(click.Group):
    """Turns MemfitError/DataError into one readable paragraph unless --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (MemfitError, DataError, ValueError, KeyError) as exc:
            if ctx.params.get("debug"):
                raise
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def main(debug: bool) -> None:
    """memfit: a training compiler that makes transformer training fit in less memory.

    MODEL is a built-in example (gpt2-tiny, gpt2-mini, gpt2-small, llama-tiny, llama-mini,
    llama-small, llama-7b, llama-13b, llama-70b), hf:DIR (a local Hugging Face model
    directory) or path/to/file.py:factory.
    """


@main.group()
def inspect() -> None:
    """Look inside a compiled artifact."""


inspect.add_command(inspect_kernels_command, "kernels")
main.add_command(compile_command, "compile")
main.add_command(plan_command, "plan")
main.add_command(train_command, "train")
main.add_command(prepare_command, "prepare")
main.add_command(prune_command, "prune")
main.add_command(export_command, "export")
