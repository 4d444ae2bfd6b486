"""memfit's attention op: the chunked reference equals the O(T²) definition (forward and
gradients, every mask option, grouped-query heads), SDPA traces into it on any device, and
compiled steps through it equal eager PyTorch (examples and a Hugging Face Llama using SDPA).

Tolerances: fp32 rtol 1e-5 / atol 1e-6 like every compiled step; bf16 within 2e-2 absolute of
the fp32 definition (8 bits of mantissa on inputs of magnitude ~1, fp32 sums).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from compiler import attention as A
from compiler.compile import CompileOptions, compile_model
from compiler.errors import TraceError
from compiler.ir import Graph
from compiler.trace import trace
from examples import build_example
from examples.loss import lm_loss
from runtime.arena import Arena
from runtime.program import Program
from tests.strategies import examples

TOL = {"rtol": 1e-5, "atol": 1e-6}


@st.composite
def problems(draw: st.DrawFn) -> dict:
    hkv = draw(st.sampled_from([1, 2]))
    t = draw(st.integers(1, 13))
    seg = None
    if draw(st.booleans()):
        cuts = sorted(draw(st.lists(st.integers(1, max(t - 1, 1)), max_size=3)))
        seg = torch.tensor([sum(c <= i for c in cuts) for i in range(t)]).expand(2, t)
    return {
        "shape": (2, hkv * draw(st.sampled_from([1, 2, 3])), hkv, t, draw(st.sampled_from([4, 8]))),
        "segment_ids": seg,
        "causal": draw(st.booleans()),
        "scale": draw(st.sampled_from([0.3, 1.0])),
        "window": draw(st.sampled_from([0, 1, 3])),
        "softcap": draw(st.sampled_from([0.0, 2.5])),
        "chunk": draw(st.integers(1, 8)),
        "seed": draw(st.integers(0, 2**16)),
    }


def _inputs(shape: tuple, dtype: torch.dtype, seed: int) -> list[Tensor]:
    b, h, hkv, t, d = shape
    gen = torch.Generator().manual_seed(seed)
    sizes = [(b, h, t, d), (b, hkv, t, d), (b, hkv, t, d), (b, h, t, d)]
    return [torch.randn(s, generator=gen, dtype=dtype) for s in sizes]


def _both(
    p: dict, dtype: torch.dtype, reference: torch.dtype | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """Output and (dq, dk, dv) of the op in `dtype` and of the definition in `reference`
    (default: the same), same inputs and upstream grad."""
    inputs = _inputs(p["shape"], dtype, p["seed"])
    opts = (p["segment_ids"], p["causal"], p["scale"], p["window"], p["softcap"])
    results = []
    for fn, to in (
        (lambda *x: A.attention(*x, *opts, p["chunk"])[0], dtype),
        (lambda *x: A.math_reference(*x, *opts), reference or dtype),
    ):
        q, k, v, g = (x.to(to) for x in inputs)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        results.append([out.detach(), *torch.autograd.grad(out, leaves, g)])
    return results[0], results[1]


@examples(60)
@given(problems())
def test_op_is_exact_in_fp64(p: dict) -> None:
    """The blockwise algorithm is the definition: in fp64 they agree to rounding."""
    got, want = _both(p, torch.float64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@examples(30)
@given(problems())
def test_op_in_fp32_is_close_to_the_exact_definition(p: dict) -> None:
    """Against the exact (fp64) definition: rtol 1e-5 and atol 1e-5 per unit of the largest
    entry. The backward recomputes p = exp(s − lse) from the fp32 lse, whose rounding is
    |lse|·2⁻²⁴ relative (FlashAttention's trade): a little looser than the compiled-step atol,
    which the examples and the Hugging Face model meet (tests below)."""
    got, exact = _both(p, torch.float32, torch.float64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, exact, strict=True):
        atol = 1e-5 * max(1.0, b.abs().max().item())
        torch.testing.assert_close(
            a, b.float(), rtol=TOL["rtol"], atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_lse_is_the_row_log_sum_exp_and_masked_rows_are_empty() -> None:
    q, k, v, _ = _inputs((1, 2, 2, 6, 4), torch.float64, 0)
    out, lse = A.attention(q, k, v, None, True, 0.5, 0, 0.0, 4)
    s = (q @ k.transpose(-1, -2) * 0.5).masked_fill(torch.ones(6, 6).triu(1).bool(), -torch.inf)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    assert lse.dtype == torch.float64 and out.shape == (1, 2, 6, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_bounds_of_fp32(dtype: torch.dtype) -> None:
    p = {"shape": (2, 4, 2, 24, 16), "segment_ids": None, "causal": True, "scale": 0.25}
    p |= {"window": 0, "softcap": 0.0, "chunk": 8, "seed": 3}
    got, want = _both(p, dtype, torch.float32)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=0, atol=2e-2)


def test_bad_shapes_are_named() -> None:
    q, k, v, _ = _inputs((1, 3, 2, 4, 4), torch.float32, 0)
    with pytest.raises(ValueError, match="H a multiple of Hkv"):
        A.attention(q, k, v, None, True, 1.0, 0, 0.0, 4)


def test_mask_options_recognise_causal_windows_and_reject_the_rest() -> None:
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    assert A.mask_options(causal, 5, 5) == (True, 0)
    assert A.mask_options(causal & ~torch.ones(5, 5, dtype=torch.bool).tril(-2), 5, 5) == (True, 2)
    additive = torch.zeros(1, 1, 5, 5).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert A.mask_options(additive, 5, 5) == (True, 0)
    assert A.mask_options(torch.ones(5, 5, dtype=torch.bool), 5, 5) == (False, 0)
    assert A.mask_options(causal.T, 5, 5) is None
    assert A.mask_options(torch.full((5, 5), 0.5), 5, 5) is None


def test_flops_count_visible_pairs() -> None:
    assert A.visible_pairs(4, 4, True, 0) == 10
    assert A.visible_pairs(4, 4, False, 0) == 16
    assert A.visible_pairs(4, 4, True, 2) == 7


# --- tracing -------------------------------------------------------------------------------


class TinyAttention(nn.Module):
    """Embedding → grouped-query attention (with `mode`'s mask) → logits."""

    def __init__(self, mode: str = "causal") -> None:
        super().__init__()
        self.mode = mode
        self.emb = nn.Embedding(40, 16)
        self.qkv = nn.Linear(16, 32)
        self.out = nn.Linear(16, 40)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(self.emb(x)).split([16, 8, 8], -1)
        q, k, v = (y.unflatten(-1, (-1, 4)).transpose(1, 2) for y in (q, k, v))
        t = x.shape[1]
        kw: dict = {"enable_gqa": True}
        if self.mode == "causal":
            kw["is_causal"] = True
        elif self.mode == "mask":  # a causal mask built in forward: recognised
            kw["attn_mask"] = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        elif self.mode == "other":  # not causal: spelled out
            kw["attn_mask"] = torch.ones(t, t, dtype=torch.bool, device=x.device).triu()
        elif self.mode in ("documents", "two-tensors"):  # segment equality and causal
            a = x % 3
            b = a if self.mode == "documents" else x % 3  # equal, not one tensor: spelled out
            same = a[:, None, :, None] == b[:, None, None, :]
            kw["attn_mask"] = same & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        elif self.mode == "dropout":
            kw["dropout_p"] = 0.1
        y = F.scaled_dot_product_attention(q, k, v, **kw)
        return self.out(y.transpose(1, 2).flatten(2))


def _ops(graph: Graph) -> list[str]:
    return [n.op for n in graph.nodes]


def _check_step(model: nn.Module, graph: Graph, batch: tuple[Tensor, Tensor]) -> None:
    loss, *grads = Program.from_module(graph, model).step(*batch, lr=0.0)
    model.zero_grad()
    eager = lm_loss(model(batch[0]), batch[1])
    eager.backward()
    torch.testing.assert_close(loss, eager.detach(), **TOL)
    for (n, p), g in zip(model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(g, p.grad, **TOL, msg=lambda m, n=n: f"grad {n}: {m}")


def _batch(vocab: int, b: int = 2, t: int = 9) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (b, t + 1), generator=gen)
    return x[:, :-1], x[:, 1:]


@pytest.mark.parametrize("mode", ["causal", "mask", "other", "documents", "two-tensors"])
def test_sdpa_traces_into_the_op_and_matches_eager(mode: str) -> None:
    torch.manual_seed(0)
    model, batch = TinyAttention(mode), _batch(40)
    graph = trace(model, lm_loss, batch, return_grads=True)
    ops = _ops(graph)
    forward = [n for n in graph.nodes if n.op == A.FORWARD]
    assert (mode == "documents") == bool(forward and forward[0].args[3] is not None)
    if mode in ("other", "two-tensors"):
        assert A.FORWARD not in ops and "_softmax" in ops
    else:
        assert ops.count(A.FORWARD) == 1 and ops.count(A.BACKWARD) == 1 and "_softmax" not in ops
    _check_step(model, graph, batch)


def test_sdpa_traces_on_the_meta_device() -> None:
    model = TinyAttention().to("meta")
    x = torch.zeros(1, 8, dtype=torch.int64, device="meta")
    ops = _ops(trace(model, lm_loss, (x, x)))
    assert ops.count(A.FORWARD) == 1 and ops.count(A.BACKWARD) == 1


def test_dropout_is_a_trace_error_naming_the_line() -> None:
    with pytest.raises(TraceError, match=r"at tests/test_attention.py:\d+ has dropout_p=0.1"):
        trace(TinyAttention("dropout"), lm_loss, _batch(40))


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_examples_hold_no_scores_and_run_from_the_arena(name: str) -> None:
    """The compiled, planned step through memfit's op equals eager PyTorch's SDPA."""
    torch.manual_seed(0)
    example = build_example(name)
    t = 11
    compiled = compile_model(
        example, lm_loss, CompileOptions(batch_size=2, seq_len=t, return_grads=True)
    )
    graph = compiled.graph
    assert A.FORWARD in _ops(graph) and "_softmax" not in _ops(graph)
    assert not [v for v in graph.values() if v.shape[-2:] == (t, t)]  # no [T, T] anywhere
    model = example.module
    batch = _batch(example.vocab_size, 2, t)
    arena = Arena(graph, compiled.plan)
    loss, *grads = Program.from_module(graph, model, backend=arena).step(*batch, lr=0.0)
    eager = lm_loss(model(batch[0]), batch[1])
    eager.backward()
    torch.testing.assert_close(loss, eager.detach(), **TOL)
    for (n, p), g in zip(model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(g, p.grad, **TOL, msg=lambda m, n=n: f"grad {n}: {m}")


def test_hugging_face_llama_with_sdpa_matches_eager() -> None:
    transformers = pytest.importorskip("transformers")
    from tests.test_hf_models import tiny_config

    config = tiny_config("llama", vocab_size=64, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = transformers.LlamaForCausalLM(config)

        def forward(self, x: Tensor) -> Tensor:
            return self.m(input_ids=x, use_cache=False).logits

    model, batch = Logits(), _batch(64, 2, 12)
    graph = trace(model, lm_loss, batch, return_grads=True)
    ops = _ops(graph)
    assert ops.count(A.FORWARD) == 2 and ops.count(A.BACKWARD) == 2 and "_softmax" not in ops
    _check_step(model, graph, batch)
