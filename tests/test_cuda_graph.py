"""A step replayed as one CUDA graph trains exactly like the same step launched node by node.

Both programs run the bf16 Triton step of gpt2-tiny out of their own arena from one init and
one batch order; the replayed one must give the same losses and parameters bit for bit (same
kernels, same addresses, same order: a graph only takes the launches off the host).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("CUDA graphs need a CUDA device", allow_module_level=True)

from compiler.compile import CompileOptions, compile_model  # noqa: E402
from examples import build_example  # noqa: E402
from examples.loss import lm_loss  # noqa: E402
from runtime.cuda_graph import GraphedStep  # noqa: E402
from runtime.program import Program  # noqa: E402
from runtime.triton_backend import TritonArena  # noqa: E402


def test_replayed_steps_equal_launched_steps() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_example("gpt2-tiny")
    compiled = compile_model(
        model, lm_loss, CompileOptions(4, 32, precision="bf16", backend="triton")
    )
    launched, replayed = (
        Program.from_module(
            compiled.graph,
            model.module,
            device,
            backend=TritonArena(compiled.graph, compiled.plan, device),
        )
        for _ in range(2)
    )
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.vocab_size, (2, 4, 32), generator=gen) for _ in range(5)]
    want = [launched.step(*b)[0].item() for b in batches]
    got = [replayed.step(*batches[0])[0].item()]
    graphed = GraphedStep(replayed, *batches[0])
    got += [graphed.step(*b)[0].item() for b in batches[1:]]
    assert got == want
    assert replayed.step_count == launched.step_count == len(batches)
    for name, param in launched.parameters.items():
        assert torch.equal(replayed.parameters[name], param), name
