"""Options several commands share, declared once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

F = Callable[..., Any]


def model_shape_options(func: F) -> F:
    """MODEL plus the batch shape the step is compiled for."""
    func = click.option(
        "--seq",
        "seq_len",
        type=click.IntRange(min=1),
        default=None,
        help="Sequence length (default: the model's block size).",
    )(func)
    func = click.option(
        "--batch",
        "batch_size",
        type=click.IntRange(min=1),
        default=8,
        show_default=True,
        help="Batch size the step is compiled for.",
    )(func)
    return click.argument("model", metavar="MODEL")(func)
