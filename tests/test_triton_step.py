"""The whole training step of the tiny example models on the triton backend vs eager.

Forward, backward and AdamW in one graph: every fused group is a generated kernel, the head is
the fused linear cross-entropy, matmuls and views run in ATen. Tolerances (fp32):
- every step: loss and every gradient rtol 1e-4 / atol 1e-5 (observed at batch 2 × 8: loss
  within 5e-7, gradients within 1.5e-7 at step 1 and 2.6e-6 at step 3);
- after 3 steps: parameters atol 1e-4 at lr 1e-3 (observed 1e-5). Adam divides each gradient
  by its own magnitude, so an element whose true gradient is 0 — the attention key bias:
  softmax ignores a per-row constant — is moved by its rounding noise (|g| ~ 1e-11 vs eps
  1e-8) differently by any two correct implementations, by up to a few 1e-5 per step.
"""

from __future__ import annotations

import os
from functools import cache

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from torch.testing import assert_close  # noqa: E402

from compiler.compile import CompiledStep, CompileOptions, compile_model  # noqa: E402
from examples import ExampleModel, build_example  # noqa: E402
from examples.loss import lm_loss  # noqa: E402
from runtime import triton_backend  # noqa: E402
from runtime.program import Program  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@cache
def compiled_step(name: str, batch: int, seq: int) -> tuple[ExampleModel, CompiledStep]:
    """One compile per shape, shared by both runtimes (the model's weights are only read)."""
    torch.manual_seed(0)
    model = build_example(name)
    options = CompileOptions(batch, seq, return_grads=True, backend="triton")
    return model, compile_model(model, lm_loss, options)


def run_steps(name: str, batch: int, seq: int, steps: int, arena: bool = False) -> None:
    """`arena`: kernels write into the planned arena (TritonArena) instead of fresh tensors."""
    model, compiled = compiled_step(name, batch, seq)
    graph = compiled.graph
    assert any(n.group is not None for n in graph.nodes)
    eager = Program.from_module(graph, model.module, DEVICE)  # the eager backend ignores groups
    if arena:
        backend = triton_backend.TritonArena(graph, compiled.plan, DEVICE)
        # the plan is made node by node: a group it overlaps unsafely runs as its nodes
        assert len(backend.launched) > 10 * len(backend.unfused)
    else:
        backend = triton_backend.run_graph
    fused = Program.from_module(graph, model.module, DEVICE, backend=backend)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, model.vocab_size, (batch, seq), generator=gen)
        targets = torch.randint(0, model.vocab_size, (batch, seq), generator=gen)
        want, got = eager.step(tokens, targets), fused.step(tokens, targets)
        for g, w in zip(got, want, strict=True):
            assert_close(g, w, rtol=1e-4, atol=1e-5)
    for name_, param in eager.parameters.items():
        assert_close(fused.parameters[name_], param, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arena", [False, True], ids=["fresh-tensors", "arena"])
def test_one_gpt2_tiny_step_matches_eager(arena: bool) -> None:
    run_steps("gpt2-tiny", batch=1, seq=4, steps=1, arena=arena)


@pytest.mark.slow
@pytest.mark.parametrize("arena", [False, True], ids=["fresh-tensors", "arena"])
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_three_steps_match_eager(name: str, arena: bool) -> None:
    run_steps(name, batch=2, seq=8, steps=3, arena=arena)
