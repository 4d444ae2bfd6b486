"""Options several commands share, declared once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from compiler.errors import MemfitError
from compiler.optimizers import OPTIMIZERS, Optimizer
from compiler.precisions import PRECISIONS, Precision

F = Callable[..., Any]


class PlanError(MemfitError):
    """A `memfit plan` request that makes no sense."""


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


def adapter_options(func: F) -> F:
    """--lora, --quantize-base: low-rank adapters on a frozen, optionally quantised base;
    --optimizer, --offload-optimizer: how and where the trained weights' AdamW states are
    stored."""
    func = click.option(
        "--offload-optimizer",
        is_flag=True,
        help="Keep AdamW's states in host memory: the CPU updates each parameter as soon as"
        " its gradient is ready, while the device runs the rest of the backward.",
    )(func)
    func = click.option(
        "--optimizer",
        type=click.Choice(OPTIMIZERS),
        default="adamw",
        show_default=True,
        help="adamw8bit: AdamW moments as int8 codes with an fp32 scale per 256 elements"
        " (about 1/4 of fp32's optimizer-state bytes).",
    )(func)
    func = click.option(
        "--quantize-base",
        type=click.Choice(["int8", "nf4"]),
        default=None,
        help="Store frozen (LoRA base) weights quantised, dequantised next to their matmul.",
    )(func)
    return click.option(
        "--lora",
        default=None,
        metavar="SPEC",
        help="Low-rank adapters on a frozen base, e.g. r=8,alpha=16,targets=q,k,v,o.",
    )(func)


def lowering_options(func: F) -> F:
    """--precision plus the adapter options: how the step's weights and math are lowered."""
    return click.option(
        "--precision",
        type=click.Choice(PRECISIONS),
        default="fp32",
        show_default=True,
        help="Compute precision; master weights and AdamW states stay fp32.",
    )(adapter_options(func))


def lowering_kwargs(
    precision: str,
    lora: str | None,
    quantize_base: str | None,
    optimizer: str = "adamw",
    offload_optimizer: bool = False,
) -> dict[str, Any]:
    """CompileOptions / TrainConfig fields for the lowering options (LoRA spec parsed, errors
    named)."""
    from compiler.lora import LoraConfig

    if quantize_base and not lora:
        raise click.BadParameter(
            "quantises the frozen base of LoRA: add --lora", param_hint="--quantize-base"
        )
    try:
        config = LoraConfig.parse(lora) if lora else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--lora") from None
    return {
        "precision": Precision(precision),
        "lora": config,
        "quantize_base": quantize_base,
        "optimizer": Optimizer(optimizer),
        "offload_optimizer": offload_optimizer,
    }


def planning_options(func: F) -> F:
    """--memory-budget, --recompute, --device-memory, --backend: how the step is planned and
    what runs it. `plan` plans with them and `train` runs the same plan."""
    func = click.option(
        "--backend",
        type=click.Choice(["auto", "eager", "arena", "triton"]),
        default="auto",
        show_default=True,
        help="What runs the step: eager (op by op), arena (one planned allocation), triton"
        " (arena plus generated kernels, CUDA); auto: triton on CUDA, arena on CPU.",
    )(func)
    func = click.option(
        "--device-memory",
        metavar="SIZE",
        default=None,
        help="Memory of one device, e.g. 80GB: train stops before allocating if the plan does"
        " not fit (default on CUDA: the free memory); plan with a mesh finds the largest"
        " batch per rank that fits.",
    )(func)
    func = click.option(
        "--recompute/--no-recompute",
        default=True,
        show_default=True,
        help="memfit's min-cut recompute, or keep every activation the backward reads.",
    )(func)
    return click.option(
        "--memory-budget",
        default=None,
        metavar="SIZE|FRACTION",
        help="Recompute until the step fits: a size (12GB, 800MiB: the whole step's peak) or a"
        " fraction of the no-recompute activation memory (0.5).",
    )(func)


def mesh_options(dp_default: int | None = 1) -> Callable[[F], F]:
    """--dp, --tp, --zero: a mesh of ranks. `dp_default=None` (train): every launched rank
    that --tp leaves."""

    def declare(func: F) -> F:
        func = click.option(
            "--zero",
            type=click.IntRange(0, 2),
            default=0,
            show_default=True,
            help="ZeRO stage over the dp ranks: 1 shards AdamW states, 2 gradients too.",
        )(func)
        func = click.option(
            "--tp",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Tensor-parallel ranks.",
        )(func)
        every = " (default: every launched rank that --tp leaves)" if dp_default is None else ""
        return click.option(
            "--dp",
            type=click.IntRange(min=1),
            default=dp_default,
            show_default=dp_default is not None,
            help=f"Data-parallel ranks{every}.",
        )(func)

    return declare
