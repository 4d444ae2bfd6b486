"""Short training runs on the embedded corpus, and the validation loss they reach.

What `memfit prune` and benchmarks/bench_precision.py compare: each trains a model for a few
hundred steps with some CompileOptions and reads the validation loss of the weights it got.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import torch
from torch import Tensor, nn

from compiler.compile import CompileOptions, compile_model
from compiler.trace import trace
from examples import ExampleModel
from examples.loss import lm_loss
from pipelines.corpus import default_dataset
from pipelines.loader import TokenDataset, WindowLoader
from runtime.program import Program, initial_state

Batch = tuple[Tensor, Tensor]
DEFAULT_CACHE = Path.home() / ".cache" / "memfit"


def corpus_batches(
    split: str, batch_size: int, seq_len: int, seed: int = 0, cache_dir: Path = DEFAULT_CACHE
) -> Iterator[Batch]:
    """Endless [B, T] (tokens, targets) batches of the embedded corpus (byte tokens)."""
    data = default_dataset(cache_dir, progress=False)
    return WindowLoader(TokenDataset.open(data, split), batch_size, seq_len, seed=seed, prefetch=0)


def train_steps(
    model: ExampleModel,
    batches: Iterator[Batch],
    steps: int,
    lr: float,
    options: CompileOptions,
) -> tuple[Program, list[float]]:
    """Compile `model`'s step with `options`, run `steps` steps; the program and the losses."""
    program = Program.from_module(compile_model(model, lm_loss, options).graph, model.module)
    losses = [float(program.step(x, y, lr)[0]) for x, y in islice(batches, steps)]
    return program, losses


def validation_loss(module: nn.Module, batches: list[Batch]) -> float:
    """Mean loss of a forward-only graph of `module` over `batches`."""
    graph = trace(module, lm_loss, batches[0], training=False)
    program = Program(graph, initial_state(graph, module))
    return sum(float(program.run(tokens=x, targets=y)[0]) for x, y in batches) / len(batches)


@torch.no_grad()
def load_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy a program's parameters and buffers back into the module they came from."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if name in state:
            tensor.copy_(state[name])
