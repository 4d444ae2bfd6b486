"""The whole pass pipeline on the example models: the compiled step equals eager PyTorch."""

from __future__ import annotations

import pytest
import torch

from compiler.compile import CompileOptions, compile_model
from examples import build_example
from examples.loss import lm_loss
from runtime.program import Program

TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_pipeline_matches_eager(name: str) -> None:
    torch.manual_seed(0)
    example = build_example(name)
    options = CompileOptions(batch_size=2, seq_len=16, return_grads=True)
    compiled = compile_model(example, lm_loss, options)
    program = Program.from_module(compiled.graph, example.module)
    x = torch.randint(0, example.vocab_size, (2, 17))
    loss, *grads = program.step(x[:, :-1], x[:, 1:])
    reference = lm_loss(example.module(x[:, :-1]), x[:, 1:])
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), **TOL)
    for (n, p), g in zip(example.module.named_parameters(), grads, strict=True):
        torch.testing.assert_close(g, p.grad, **TOL, msg=lambda m, n=n: f"grad {n}: {m}")
