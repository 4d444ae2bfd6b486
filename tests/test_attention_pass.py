"""The attention pass: hand-written attention with a provable mask becomes memfit's ops, and
the compiled step still equals eager PyTorch; anything it cannot prove is left unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from compiler import attention as A
from compiler.compile import CompileOptions, pass_manager
from compiler.ir import Graph, Role, dump
from compiler.passes.attention import attention_pass
from compiler.passes.manager import PassContext
from compiler.passes.noop_views import eliminate_noop_views
from compiler.trace import trace
from examples.loss import lm_loss
from runtime.program import Program
from tests.strategies import examples
from tests.test_attention import _check_step

TOL = {"rtol": 1e-5, "atol": 1e-6}
VOCAB, T = 40, 9


def _mask(mode: str, t: int, device: torch.device) -> Tensor:
    """The [t, t] bool mask (True keeps) each mode builds in forward from arange / ones."""
    i = torch.arange(t, device=device)
    if mode == "window":  # causal within the last 3 keys
        return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 3)
    if mode == "not-causal":
        return torch.ones(t, t, dtype=torch.bool, device=device).triu()
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


class HandAttention(nn.Module):
    """Embedding → attention written out by hand (`mode` picks the mask and form) → logits."""

    def __init__(self, mode: str = "causal", heads: int = 4, kv_heads: int = 4) -> None:
        super().__init__()
        self.mode, self.heads, self.kv_heads = mode, heads, kv_heads
        self.emb = nn.Embedding(VOCAB, 16)
        self.qkv = nn.Linear(16, 16 + 2 * 16 * kv_heads // heads)
        self.out = nn.Linear(16, VOCAB)
        self.register_buffer("bias", torch.ones(T, T).tril().view(1, 1, T, T))

    def forward(self, x: Tensor) -> Tensor:
        t, d, rep = x.shape[1], 16 // self.heads, self.heads // self.kv_heads
        q, k, v = self.qkv(self.emb(x)).split([16, d * self.kv_heads, d * self.kv_heads], -1)
        q, k, v = (y.unflatten(-1, (-1, d)).transpose(1, 2) for y in (q, k, v))
        if rep > 1:  # grouped-query heads, repeated as many models do
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if self.mode == "divided":
            att = (q @ k.transpose(-2, -1)) / math.sqrt(d)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
        if self.mode == "buffer":  # values unknown to a pass: left alone
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        elif self.mode == "additive":  # a float mask added, as Hugging Face's eager attention
            lowest = torch.finfo(att.dtype).min
            att = att + torch.zeros(t, t, device=x.device).masked_fill(
                ~_mask("causal", t, x.device), lowest
            )
        elif self.mode == "returned":  # the probabilities are used elsewhere too
            att = att.masked_fill(~_mask("causal", t, x.device), float("-inf"))
            p = torch.softmax(att, dim=-1)
            return self.out((p @ v).transpose(1, 2).flatten(2)) + p.sum() * 1e-3
        else:
            att = att.masked_fill(~_mask(self.mode, t, x.device), float("-inf"))
        y = torch.softmax(att, dim=-1) @ v
        return self.out(y.transpose(1, 2).flatten(2))


def _batch(b: int = 2, t: int = T) -> tuple[Tensor, Tensor]:
    x = torch.randint(0, VOCAB, (b, t + 1), generator=torch.Generator().manual_seed(0))
    return x[:, :-1], x[:, 1:]


def _ops(graph: Graph) -> list[str]:
    return [n.op for n in graph.nodes]


def _rewrite(graph: Graph) -> Graph:
    """The pass where the pipeline runs it: after noop_views."""
    return attention_pass(eliminate_noop_views(graph, PassContext()), PassContext())


def _square(graph: Graph, b: int, h: int, t: int) -> list[str]:
    """Values the nodes compute shaped like scores, probabilities or their gradients."""
    shapes = {(b, h, t, t), (b * h, t, t)}
    return [v.name for n in graph.nodes for v in n.outputs if v.shape in shapes]


@pytest.mark.parametrize(
    ("mode", "kv_heads", "window"),
    [("causal", 4, 0), ("causal", 2, 0), ("window", 4, 3), ("additive", 4, 0), ("divided", 4, 0)],
)
def test_hand_written_attention_becomes_the_op_and_matches_eager(
    mode: str, kv_heads: int, window: int
) -> None:
    torch.manual_seed(0)
    model, batch = HandAttention(mode, kv_heads=kv_heads), _batch()
    graph = _rewrite(trace(model, lm_loss, batch, return_grads=True))
    ops = _ops(graph)
    assert ops.count(A.FORWARD) == 1 and ops.count(A.BACKWARD) == 1 and "_softmax" not in ops
    (node,) = [n for n in graph.nodes if n.op == A.FORWARD]
    assert node.args[4:7] == (True, 0.5, window)
    assert not _square(graph, 2, 4, T)  # no [T, T] scores, probabilities or their gradients
    _check_step(model, graph, batch)


def _plan(graph: Graph, skip: str = "") -> tuple[Graph, int]:
    """(the planned graph, its arena bytes) through the default pipeline, less `skip`."""
    manager = pass_manager(CompileOptions(recompute=None))
    manager.passes = [p for p in manager.passes if p[0] != skip]
    ctx = PassContext()
    planned = manager.run(graph, ctx)
    assert ctx.plan is not None
    return planned, ctx.plan.arena_bytes


def test_the_pipeline_drops_the_saved_scores_from_the_plan() -> None:
    t = 32
    model, batch = HandAttention(), _batch(2, t)
    traced = trace(model, lm_loss, batch, return_grads=True)
    before, arena_before = _plan(traced, skip="attention")
    after, arena_after = _plan(traced)
    saved = [v for v in before.values() if v.role is Role.ACTIVATION and v.shape[-2:] == (t, t)]
    assert saved and A.FORWARD in _ops(after)
    assert not [v for v in after.values() if v.role is Role.ACTIVATION and v.shape[-2:] == (t, t)]
    assert arena_after < arena_before
    _check_step(model, after, batch)


@pytest.mark.parametrize("mode", ["buffer", "not-causal", "returned"])
def test_what_cannot_be_proved_is_left_unchanged(mode: str) -> None:
    model, batch = HandAttention(mode), _batch()
    graph = eliminate_noop_views(trace(model, lm_loss, batch, return_grads=True), PassContext())
    assert dump(attention_pass(graph, PassContext())) == dump(graph)


def test_a_forward_only_graph_gets_the_forward_op() -> None:
    model, (x, y) = HandAttention(), _batch()
    graph = _rewrite(trace(model, lm_loss, (x, y), training=False))
    ops = _ops(graph)
    assert A.FORWARD in ops and A.BACKWARD not in ops and "_softmax" not in ops
    (loss,) = Program.from_module(graph, model).run(tokens=x, targets=y)
    torch.testing.assert_close(loss, lm_loss(model(x), y).detach(), **TOL)


class Core(nn.Module):
    """Attention alone on q, k, v [B, H, T, D] sliced from one parameter [3, B, T, H, D] (a
    leaf transposed as a whole would need its gradient copied into its strides): the output
    summed over heads read as logits [B, T, D]."""

    def __init__(self, shape: tuple[int, int, int, int], scale: float) -> None:
        super().__init__()
        b, h, t, d = shape
        self.qkv = nn.Parameter(torch.randn(3, b, t, h, d))
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (y.transpose(1, 2) for y in self.qkv.unbind(0))
        s = (q @ k.transpose(-2, -1)) * self.scale
        s = s.masked_fill(~_mask("causal", x.shape[1], x.device), float("-inf"))
        return (torch.softmax(s, dim=-1) @ v).sum(1)


@examples(6)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    t=st.integers(1, 12),
    d=st.integers(2, 6),
    scale=st.floats(0.05, 2.0),
    seed=st.integers(0, 2**16),
)
def test_rewritten_graph_runs_like_the_original(
    b: int, h: int, t: int, d: int, scale: float, seed: int
) -> None:
    """Within fp32 tolerance, not bit for bit: the op sums blockwise in its own order."""
    torch.manual_seed(seed)
    model = Core((b, h, t, d), scale)
    x = torch.randint(0, d, (b, t), generator=torch.Generator().manual_seed(seed))
    original = eliminate_noop_views(trace(model, lm_loss, (x, x), return_grads=True), PassContext())
    rewritten = attention_pass(original, PassContext())
    ops = _ops(rewritten)
    assert ops.count(A.FORWARD) == ops.count(A.BACKWARD) == 1 and "_softmax" not in ops
    expected = Program.from_module(original, model).step(x, x, lr=0.0)
    got = Program.from_module(rewritten, model).step(x, x, lr=0.0)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, **TOL)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_hugging_face_eager_attention_gets_the_op(family: str) -> None:
    """attn_implementation="eager" spells attention out with an additive causal (Mistral:
    sliding-window) mask built from arange; the pipeline turns it into the op."""
    pytest.importorskip("transformers")
    from tests.test_hf_models import batch, tiny_model

    example = tiny_model(family)
    example.module.set_attn_implementation("eager")
    model = example.module
    traced = trace(model, lm_loss, batch(example.vocab_size, 0), return_grads=True)
    graph, _ = _plan(traced)
    ops = _ops(graph)
    layers = model.config.num_hidden_layers
    assert ops.count(A.FORWARD) == layers and ops.count(A.BACKWARD) == layers
    assert "_softmax" not in ops
    window = getattr(model.config, "sliding_window", None) or 0
    assert {n.args[6] for n in graph.nodes if n.op == A.FORWARD} == {window}
    x, y = batch(example.vocab_size, 0)
    loss, *grads = Program.from_module(graph, model).step(x, y, lr=0.0)
    eager = lm_loss(model(x).logits, y)
    eager.backward()
    torch.testing.assert_close(loss, eager.detach(), **TOL)
    for (n, p), g in zip(model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(g, p.grad, **TOL, msg=lambda m, n=n: f"grad {n}: {m}")
