"""memfit's flash-attention Triton kernels against the torch reference of the same ops
(compiler/attention.py), which tests/test_attention.py checks against the definition.

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET must be set before triton
is imported, hence the top lines), on small shapes whose lengths are not block multiples.
Bounds, absolute, per unit of the tensor's largest entry (gradients are sums with
cancellation): fp32 1e-6 with rtol 1e-5; fp16 1e-3 and bf16 2e-2, a few units in the last
place of the largest entry (the kernels round probabilities and dS to the input dtype before
their products, as FlashAttention does; the reference keeps them fp32).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from torch import Tensor  # noqa: E402

from compiler import attention as A  # noqa: E402
from compiler.codegen import flash_attention as FA  # noqa: E402
from compiler.compile import CompileOptions, compile_model  # noqa: E402
from examples import build_example  # noqa: E402
from examples.loss import lm_loss  # noqa: E402
from runtime.program import Program  # noqa: E402
from runtime.triton_backend import TritonArena  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOUND = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 2e-2}

CASES = {  # (H, Hkv, T, D, causal, window, softcap, segments)
    "causal-gqa": (4, 2, 37, 8, True, 0, 0.0, False),
    "full-segments": (2, 1, 20, 16, False, 0, 0.0, True),
    "window-softcap-segments": (2, 2, 33, 8, True, 5, 2.0, True),
    "mqa-window": (3, 1, 18, 32, True, 3, 0.0, False),
}


def _problem(case: tuple, dtype: torch.dtype) -> tuple[list[Tensor], Tensor | None]:
    h, hkv, t, d = case[:4]
    gen = torch.Generator().manual_seed(t)
    # q as split_heads leaves it: a transposed view with strided rows
    q = torch.randn(2, t, h, d, generator=gen).transpose(1, 2)
    k, v = (torch.randn(2, hkv, t, d, generator=gen) for _ in range(2))
    g = torch.randn(2, h, t, d, generator=gen)
    seg = (torch.arange(t) // 7).expand(2, t).contiguous() if case[7] else None
    return [x.to(DEVICE, dtype) for x in (q, k, v, g)], seg


def _close(got: Tensor, want: Tensor, dtype: torch.dtype, what: str) -> None:
    bound = BOUND[dtype] * max(1.0, want.abs().max().item())
    rtol = 1e-5 if dtype == torch.float32 else 0.0
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=bound, msg=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_kernels_equal_the_reference(name: str, dtype: torch.dtype) -> None:
    case = CASES[name]
    (q, k, v, g), seg = _problem(case, dtype)
    opts = (seg, case[4], 0.3, case[5], case[6], 8)
    out, lse = FA.attention(q, k, v, *opts)
    grads = FA.attention_backward(g, q, k, v, out, lse, *opts)
    f32 = [x.float() for x in (q, k, v, g)]
    ref_out, ref_lse = A.attention(*f32[:3], *opts)
    ref_grads = A.attention_backward(f32[3], *f32[:3], ref_out, ref_lse, *opts)
    assert out.dtype == dtype and lse.dtype == torch.float32
    _close(out, ref_out, dtype, "out")
    _close(lse, ref_lse, torch.float32, "lse")
    for what, a, b in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert a.dtype == dtype and a.shape == b.shape
        _close(a, b, dtype, what)


def test_kernels_write_into_given_outputs() -> None:
    (q, k, v, g), _ = _problem(CASES["causal-gqa"], torch.float32)
    out, lse = torch.empty_like(g), torch.empty(g.shape[:3], device=DEVICE)
    assert FA.attention(q, k, v, None, True, 0.5, 0, 0.0, 8, out, lse)[0] is out
    dq, dk, dv = (torch.empty(x.shape, device=DEVICE) for x in (q, k, v))
    got = FA.attention_backward(g, q, k, v, out, lse, None, True, 0.5, 0, 0.0, 8, dq, dk, dv)
    assert got[0] is dq and got[1] is dk and got[2] is dv


def test_llama_step_on_the_triton_arena_equals_eager() -> None:
    """The compiled llama-tiny step with attention as the flash kernels, from the arena."""
    torch.manual_seed(0)
    example = build_example("llama-tiny")
    compiled = compile_model(
        example, lm_loss, CompileOptions(2, 12, return_grads=True, backend="triton")
    )
    assert any(n.op == A.FORWARD for n in compiled.graph.nodes)
    model = example.module
    arena = TritonArena(compiled.graph, compiled.plan)
    x = torch.randint(0, example.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    loss, *grads = Program.from_module(compiled.graph, model, backend=arena).step(
        x[:, :-1], x[:, 1:], lr=0.0
    )
    eager = lm_loss(model(x[:, :-1]), x[:, 1:])
    eager.backward()
    torch.testing.assert_close(loss, eager.detach(), rtol=1e-5, atol=1e-6)
    for (n, p), got in zip(model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6, msg=n)
