"""The fused linear cross-entropy rewrite: results against the traced head, the ops against
autograd, and the loss head's peak memory at GPT-2 small's real head."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from compiler import custom_ops
from compiler.compile import CompileOptions, compile_model
from compiler.passes.linear_cross_entropy import (
    linear_cross_entropy,
    loss_head_peak,
    match_loss_heads,
)
from compiler.passes.manager import PassContext
from compiler.passes.verify import verify
from examples import ExampleModel
from examples.loss import lm_loss
from runtime.eager import run_graph
from tests.test_fusion import compiled


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_linear_cross_entropy_rewrite_matches_traced_head(name: str) -> None:
    model, plain = compiled(name, fused_cross_entropy=False, optimizer=None, recompute=None)
    fused = verify(linear_cross_entropy(plain, PassContext()))
    assert len(match_loss_heads(plain)) == 1
    assert {n.op for n in fused.nodes} >= {custom_ops.FORWARD, custom_ops.BACKWARD}
    assert not {"_log_softmax", "gather", "scatter.value"} & {n.op for n in fused.nodes}
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.vocab_size, (2, 8), generator=gen)
    feeds = {"tokens": tokens, "targets": tokens.roll(1, 1)}
    feeds |= {n: t.detach() for n, t in model.module.named_parameters()}
    feeds |= {n: t for n, t in model.module.named_buffers()}
    for got, want in zip(run_graph(fused, feeds), run_graph(plain, feeds), strict=True):
        assert_close(got, want, rtol=1e-5, atol=1e-6)


class LMHead(nn.Module):
    """Embedding → LayerNorm → tied output projection: a decoder's loss head, nothing else."""

    def __init__(self, vocab_size: int, n_embd: int) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.norm = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.tok_emb(idx)))


def compile_head(vocab: int, n_embd: int, batch: int, seq: int, **options: object):
    model = ExampleModel(LMHead(vocab, n_embd), vocab, seq, "head")
    return compile_model(model, options.pop("loss", lm_loss), CompileOptions(batch, seq, **options))


def test_rewrite_leaves_a_head_whose_logits_are_also_used_elsewhere() -> None:
    def penalised_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(logits, targets) + 1e-4 * logits.pow(2).mean(dim=(0, 1, 2))

    graph = compile_head(32, 8, 2, 4, loss=penalised_loss).graph
    assert not {custom_ops.FORWARD, custom_ops.BACKWARD} & {n.op for n in graph.nodes}
    assert {custom_ops.FORWARD} <= {n.op for n in compile_head(32, 8, 2, 4).graph.nodes}


@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_linear_cross_entropy_ops_match_autograd(chunk: int) -> None:
    gen = torch.Generator().manual_seed(0)
    rows, hidden_dim, vocab = 37, 16, 50
    hidden = torch.randn(rows, hidden_dim, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, hidden_dim, dtype=torch.float64, generator=gen, requires_grad=True)
    index = torch.randint(0, vocab, (rows, 1), generator=gen)
    grad = torch.randn(rows, 1, dtype=torch.float64, generator=gen)
    reference = torch.log_softmax(hidden @ weight.T, dim=1).gather(1, index)
    reference.backward(grad)
    picked = custom_ops.linear_cross_entropy(hidden.detach(), weight.detach(), index, chunk)
    assert_close(picked, reference.detach(), rtol=1e-12, atol=1e-12)
    d_hidden, d_weight = custom_ops.linear_cross_entropy_backward(
        hidden.detach(), weight.detach(), index, grad, chunk
    )
    assert_close(d_hidden, hidden.grad, rtol=1e-12, atol=1e-12)
    assert_close(d_weight, weight.grad, rtol=1e-12, atol=1e-12)


def test_fused_loss_head_cuts_peak_at_gpt2_small_head_by_4x() -> None:
    """Batch 8 × 1024 tokens × 50257 vocabulary × 768: GPT-2 small's head, on the meta device,
    against the traced head with its logits materialised (no recompute)."""
    with torch.device("meta"):
        plain = compile_head(50257, 768, 8, 1024, fused_cross_entropy=False, recompute=None)
        fused = compile_head(50257, 768, 8, 1024)
    logits = 8 * 1024 * 50257
    assert any(v.numel == logits for v in plain.graph.values())
    assert all(v.numel < logits for v in fused.graph.values())  # never materialised whole
    logits_bytes = logits * 4
    before, after = loss_head_peak(plain.graph), loss_head_peak(fused.graph)
    assert before >= 2 * logits_bytes
    assert before >= 4 * after, f"loss head peak {before / 2**30:.2f} GiB → {after / 2**30:.2f}"
