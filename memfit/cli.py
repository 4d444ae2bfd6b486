"""memfit's command line: compile, plan, train, prepare data, bench.

Errors a user can act on (bad MODEL, unsupported op, bad data...) print as one paragraph and
exit with status 2; `--debug` shows the traceback instead.

A command's module is imported only when that command runs or shows its help: torch, scipy
and matplotlib take seconds to load, and `memfit --help` should answer at once. The one-line
summaries `memfit --help` lists are therefore declared here (tests/test_cli_speed.py checks
them against each command's own docstring).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click
from rich.console import Console

from compiler.errors import MemfitError
from pipelines.errors import DataError

console = Console(stderr=True)
ARGS = "memfit.args"  # the command line as given, in click's shared context meta

# name: (module, attribute, the first sentence of the command's docstring)
COMMANDS = {
    "compile": (
        "memfit.compile_cmd",
        "compile_command",
        "Trace MODEL's training step (forward, backward, AdamW) and run the pass pipeline.",
    ),
    "plan": (
        "memfit.plan_cmd",
        "plan_command",
        "Plan MODEL's training step (forward, backward, AdamW): schedule, liveness, one arena.",
    ),
    "train": (
        "memfit.train_cmd",
        "train_command",
        "Train MODEL (default: gpt2-tiny on the embedded corpus, CPU) with a compiled step.",
    ),
    "prepare": (
        "memfit.prepare_cmd",
        "prepare_command",
        "Tokenize text, JSONL or Parquet INPUTS (files or directories) into Arrow files in --out.",
    ),
    "prune": (
        "memfit.prune_cmd",
        "prune_command",
        "Prune MODEL's Linear weights by magnitude and report the validation-loss cost.",
    ),
    "export": (
        "memfit.export_cmd",
        "export_command",
        "Write RUN_DIR's trained weights to --out as a Hugging Face directory.",
    ),
}
INSPECT_COMMANDS = {
    "kernels": (
        "memfit.kernels_cmd",
        "inspect_kernels_command",
        "List the fused groups of a compiled ARTIFACT: ops, bytes moved, FLOPs.",
    ),
}


class _LazyGroup(click.Group):
    """Subcommands from a table of (module, attribute, summary), imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str, str]], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands or name not in self.lazy:
            return super().get_command(ctx, name)
        module, attribute, _ = self.lazy[name]
        command = getattr(importlib.import_module(module), attribute)
        self.add_command(command, name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The listing from the summaries in the table: no command module is imported."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        rows = [
            (name, click.utils.make_default_short_help(self.lazy[name][2], limit))
            if name in self.lazy
            else (name, self.commands[name].get_short_help_str(limit))
            for name in names
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


class _Group(_LazyGroup):
    """Turns MemfitError/DataError/OSError into one readable paragraph unless --debug.

    `--debug` is accepted anywhere on the command line (`memfit train … --debug` too): it is
    taken out of the arguments before click parses them.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--debug" in args[1:]:
            args = ["--debug", *(a for a in args if a != "--debug")]
        ctx.meta[ARGS] = list(args)  # what `train --nproc-per-node` hands its ranks
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (MemfitError, DataError, OSError, ValueError, KeyError) as exc:
            if ctx.params.get("debug"):
                raise
            rank = f" (rank {os.environ['RANK']})" if "RANK" in os.environ else ""
            console.print(
                f"[bold red]error{rank}:[/] {_message(exc)}", highlight=False, markup=True
            )
            sys.exit(2)


def _message(exc: Exception) -> str:
    """The paragraph a user reads: an OSError names its file and the system's reason."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, MemfitError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror} (rerun with --debug for the traceback)"
    return str(exc)


@click.group(cls=_Group, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def main(debug: bool) -> None:
    """memfit: a training compiler that makes transformer training fit in less memory.

    MODEL is a built-in example (gpt2-tiny, gpt2-mini, gpt2-small, llama-tiny, llama-mini,
    llama-small, llama-7b, llama-13b, llama-70b), hf:DIR (a local Hugging Face model
    directory) or path/to/file.py:factory.
    """


@main.group(cls=_LazyGroup, lazy=INSPECT_COMMANDS)
def inspect() -> None:
    """Look inside a compiled artifact."""
