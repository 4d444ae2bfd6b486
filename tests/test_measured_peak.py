"""Measured, not just planned: with recomputation on, a step's real peak is the plan's.

The eager backend allocates every value fresh and frees it after its last read, so its peak
must be the planned schedule's most bytes live at once, counted without the arena's in-place
reuse (which only the arena runtime does). It is measured at the allocator (the profiler's
memory events) over a whole step: forward, recomputation, backward, AdamW.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compiler.compile import CompiledStep, CompileOptions, compile_model
from compiler.liveness import live_total, liveness, scratch
from compiler.passes.recompute import RecomputePolicy
from examples import build_example
from examples.loss import lm_loss
from runtime.arena import allocations
from runtime.eager import run_graph
from runtime.program import Program

BATCH, SEQ = 4, 32
SCALARS = 4096  # bytes: lr, step and AdamW's scalar arithmetic, allocated as 0-dim tensors


def eager_peak(step: CompiledStep) -> int:
    """The most bytes the planned schedule holds at once when nothing is written in place,
    with each kernel's own scratch (the fused loss head's chunk of logits) at its step."""
    sizes = [lt._replace(size=lt.value.nbytes) for lt in liveness(step.graph)]
    live = live_total(sizes, len(step.graph.nodes))
    return int((live + np.array(scratch(step.graph))).max())


@pytest.mark.parametrize(
    ("name", "policy"),
    [
        ("gpt2-tiny", RecomputePolicy(activation_fraction=0.5)),
        ("gpt2-tiny", RecomputePolicy(checkpoint_layers=2)),
        ("llama-tiny", RecomputePolicy(activation_fraction=0.25)),
        ("llama-tiny", RecomputePolicy()),  # the min-cut
    ],
)
def test_eager_step_peak_is_the_planned_peak(name: str, policy: RecomputePolicy) -> None:
    torch.manual_seed(0)
    example = build_example(name)
    options = CompileOptions(BATCH, SEQ, recompute=policy)
    step = compile_model(example, lm_loss, options)
    assert (
        step.context.recompute and step.context.recompute.extra_flops > 0
    )  # something really is recomputed
    program = Program.from_module(step.graph, example.module, backend=run_graph)
    tokens = torch.randint(0, example.vocab_size, (BATCH, SEQ))
    program.step(tokens, tokens.roll(1, 1))  # AdamW's moments exist from here on
    measured = allocations(lambda: program.step(tokens, tokens.roll(1, 1))).peak_bytes
    planned = eager_peak(step)
    assert planned <= measured <= planned + SCALARS, (measured, planned)
