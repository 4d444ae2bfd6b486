"""The traced step equals eager PyTorch: loss, every gradient, and parameters after AdamW.

Tolerances (fp32): rtol 1e-5, atol 1e-6 for loss, gradients and parameters.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from compiler.errors import TraceError, UnsupportedOpError
from compiler.ir import Phase, Role, dump, parse
from compiler.trace import AdamW, trace
from examples import build_example
from examples.loss import lm_loss
from runtime.program import Program

CPU_EXAMPLES = ["gpt2-tiny", "llama-tiny", "gpt2-mini", "llama-mini"]
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _batch(vocab: int, batch: int = 2, seq: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    return x[:, :-1], x[:, 1:]


@pytest.mark.parametrize("name", CPU_EXAMPLES)
def test_loss_grads_and_adamw_match_eager(name: str) -> None:
    torch.manual_seed(0)
    example = build_example(name)
    model = example.module
    opt_cfg = AdamW(weight_decay=0.1)
    graph = trace(model, lm_loss, _batch(example.vocab_size), opt_cfg, return_grads=True)
    program = Program.from_module(graph, model)
    reference = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    names = [n for n, _ in model.named_parameters()]
    for step in range(3):
        x, y = _batch(example.vocab_size, seed=step)
        loss, *grads = program.step(x, y, lr=3e-3)
        eager_loss = lm_loss(model(x), y)
        eager_loss.backward()
        torch.testing.assert_close(loss, eager_loss.detach(), **TOL)
        for n, g, p in zip(names, grads, model.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, **TOL, msg=lambda m, n=n: f"grad {n}: {m}")
            # AdamW is compared on identical gradients: Adam divides by sqrt(v), so grads that
            # are zero up to rounding (e.g. GPT-2's key bias) would amplify 1e-9 noise to lr.
            p.grad = g.clone()
        reference.step()
        reference.zero_grad()
        for n, p in model.named_parameters():
            torch.testing.assert_close(
                program.state[n], p.detach(), **TOL, msg=lambda m, n=n: f"param {n}: {m}"
            )


def test_llama_params_after_three_steps_match_torch_adamw_end_to_end() -> None:
    """No gradient hand-off at all: both sides compute their own gradients for 3 steps."""
    torch.manual_seed(0)
    example = build_example("llama-tiny")
    model = example.module
    graph = trace(model, lm_loss, _batch(example.vocab_size))
    program = Program.from_module(graph, model)
    reference = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        x, y = _batch(example.vocab_size, seed=step)
        program.step(x, y, lr=1e-3)
        # Adam divides by sqrt(v): a gradient that is zero up to rounding turns rounding noise
        # into lr-sized steps, so the reference attention must sum in the order memfit's does
        # (one block of rows at this size), which SDPA's math backend does; its fused CPU
        # kernel blocks differently.
        with sdpa_kernel(SDPBackend.MATH):
            lm_loss(model(x), y).backward()
        reference.step()
        reference.zero_grad()
    for n, p in model.named_parameters():
        torch.testing.assert_close(program.state[n], p.detach(), rtol=1e-5, atol=1e-5)


def test_tied_parameter_appears_once_with_summed_gradient() -> None:
    example = build_example("gpt2-tiny")
    graph = trace(example.module, lm_loss, _batch(256), return_grads=True)
    params = [v.name for v in graph.inputs if v.role is Role.PARAM]
    assert params.count("tok_emb.weight") == 1 and "lm_head.weight" not in params
    writes = [n.args[0].name for n in graph.nodes if n.op == "copy_"]
    assert writes.count("tok_emb.weight") == 1
    assert len([v for v in graph.inputs if v.name.endswith("tok_emb.weight")]) == 3  # p, m, v


def test_phases_and_roles() -> None:
    graph = trace(build_example("llama-tiny").module, lm_loss, _batch(256))
    phases = [n.phase for n in graph.nodes]
    assert phases.index(Phase.BACKWARD) > phases.index(Phase.FORWARD)
    assert phases[-1] is Phase.OPTIMIZER
    roles = {v.role for v in graph.values()}
    assert {Role.PARAM, Role.OPTIMIZER_STATE, Role.INPUT, Role.ACTIVATION, Role.OUTPUT} <= roles
    assert graph.outputs[0].role is Role.OUTPUT and graph.outputs[0].shape == ()


def test_dump_parse_round_trip_on_a_real_step() -> None:
    graph = trace(build_example("gpt2-tiny").module, lm_loss, _batch(256))
    text = dump(graph)
    assert dump(parse(text)) == text
    assert "# forward @ examples/gpt2.py:" in text


class _Nonzero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        return (self.w * x[x > 0].float().sum()).unsqueeze(0).expand(*x.shape, 4)


class _Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4, 4))

    def forward(self, x: Tensor) -> Tensor:
        return x.float() @ self.w  # [B, T] @ [4, 4]: wrong shapes


class _Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float().unsqueeze(-1) * self.w
        return torch.fft.fft(h).real


def test_data_dependent_shape_is_a_clear_error() -> None:
    with pytest.raises(TraceError, match=r"test_trace.py:\d+.*static graphs"):
        trace(_Nonzero(), lm_loss, _batch(4, seq=3))


def test_failing_forward_names_the_users_line() -> None:
    with pytest.raises(TraceError, match=r"tracing the model failed at tests/test_trace.py:\d+"):
        trace(_Broken(), lm_loss, _batch(4, seq=3))


def test_unsupported_op_names_op_node_and_line() -> None:
    with pytest.raises(UnsupportedOpError, match=r"op aten\.\w+ \(node \w+\) at .*test_trace"):
        trace(_Unsupported(), lm_loss, _batch(4, seq=3))


class _MeanLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        return x.float().unsqueeze(-1) * self.w


def test_whole_tensor_sum_and_mean_trace() -> None:
    """`tensor.mean()` and `.sum()` are aten.mean.default / aten.sum.default: in the op set."""
    graph = trace(_MeanLoss(), lambda out, y: out.mean() + out.sum(), _batch(4, seq=3))
    assert "mean" in {n.op for n in graph.nodes}
