"""Frozen base quantisation: blockwise int8/NF4 round trips within half a step, the quantised
linear matches its dequantised weight forward and backward, and in the traced graph the
weight is stored quantised and dequantised only next to its matmul, never saved for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from compiler.compile import CompileOptions, compile_model
from compiler.ir import Graph, Phase, Role, Value
from compiler.lora import LoraConfig, LoraLinear
from compiler.models import resolve_model
from compiler.ops import Kind, kind
from compiler.passes.precision import state_bytes
from compiler.quantize import (
    BLOCK,
    NF4_LEVELS,
    QuantizedLinear,
    dequantize_blockwise,
    quantize_blockwise,
    quantize_frozen_linears,
)
from examples.loss import lm_loss
from runtime.eager import run_graph
from runtime.program import initial_state
from tests.strategies import examples

NF4_HALF_GAP = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:], strict=False)) / 2


pytestmark = pytest.mark.usefixtures("one_thread")


@given(
    rows=st.integers(1, 6),
    blocks_per_row=st.integers(1, 3),
    scale=st.floats(1e-4, 1e3),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["int8", "nf4"]),
)
@examples(40)
def test_round_trip_is_within_half_a_step_of_each_block(
    rows: int, blocks_per_row: int, scale: float, seed: int, mode: str
) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, blocks_per_row * BLOCK, generator=gen) * scale
    codes, absmax = quantize_blockwise(w, mode)
    levels = torch.tensor(NF4_LEVELS) if mode == "nf4" else None
    back = dequantize_blockwise(codes, absmax, levels, w.shape)
    assert codes.dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert codes.numel() == w.numel() // (1 if mode == "int8" else 2)
    half_step = (0.5 / 127 if mode == "int8" else NF4_HALF_GAP) * absmax
    error = (back - w).abs().reshape(-1, BLOCK).amax(dim=1)
    assert (error <= half_step * (1 + 1e-5) + 1e-12).all()
    assert torch.equal(back.abs().reshape(-1, BLOCK).amax(dim=1), absmax)  # extremes exact


def test_rejects_unknown_modes_and_partial_blocks() -> None:
    with pytest.raises(ValueError, match="unknown quantisation 'fp8'"):
        quantize_blockwise(torch.ones(BLOCK), "fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="whole number of 64-blocks"):
        quantize_blockwise(torch.ones(BLOCK + 1), "int8")


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_linear_matches_its_dequantized_weight_forward_and_backward(mode: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    frozen = QuantizedLinear(linear, mode)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = frozen(x)
    expected = F.linear(x, frozen.dequantized_weight(), linear.bias)
    torch.testing.assert_close(y, expected)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (ex,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(gx, ex)
    relative = (frozen.dequantized_weight() - linear.weight).norm() / linear.weight.norm()
    assert relative < (0.01 if mode == "int8" else 0.12)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_only_frozen_unshared_linears_are_quantized() -> None:
    torch.manual_seed(0)
    model = resolve_model("gpt2-tiny")
    with pytest.raises(ValueError, match="has none: freeze the base first"):
        quantize_frozen_linears(model.module, "int8")
    for p in model.module.parameters():
        p.requires_grad_(False)
    names = quantize_frozen_linears(model.module, "nf4")
    assert len(names) == 8 and "lm_head" not in names  # the tied head stays with the embedding
    assert type(model.module.lm_head) is nn.Linear
    assert quantize_frozen_linears(model.module, "nf4") == []  # done already


def compiled_lora(mode: str, **kw: object) -> tuple:
    torch.manual_seed(0)
    model = resolve_model("gpt2-tiny")
    options = CompileOptions(
        batch_size=2, seq_len=16, lora=LoraConfig(r=4, alpha=8), quantize_base=mode, **kw
    )
    step = compile_model(model, lm_loss, options)
    return model, step.graph


@pytest.fixture(scope="module")
def int8_graph() -> tuple:
    return compiled_lora("int8", return_grads=True)


def test_graph_stores_codes_and_dequantizes_next_to_the_matmul(int8_graph: tuple) -> None:
    _, graph = int8_graph
    codes = [v for v in graph.inputs if v.name.endswith("weight_codes")]
    assert len(codes) == 8 and all(v.role is Role.BUFFER and v.dtype == torch.int8 for v in codes)
    assert not any(v.name.endswith(".weight") and "base" in v.name for v in graph.inputs)
    for code in codes:
        for phase, values in _dequantized(graph, code).items():
            assert values, (code.name, phase)
            assert all(v.role is Role.TEMPORARY for v in values), (code.name, phase)
    assert {p for c in codes for p in _dequantized(graph, c)} == {Phase.FORWARD, Phase.BACKWARD}


def _dequantized(graph: Graph, codes: Value) -> dict[Phase, list[Value]]:
    """Values computed from `codes` up to (not past) the matmuls that read them, by phase."""
    users = graph.users()
    found: dict[Phase, list[Value]] = {}
    stack = [codes]
    while stack:
        for node in users.get(id(stack.pop()), []):
            if kind(node.op) is not Kind.MATMUL:
                found.setdefault(node.phase, []).extend(node.outputs)
                stack += node.outputs
    return found


def test_adapter_gradients_on_a_quantized_base_equal_eager(int8_graph: tuple) -> None:
    model, graph = int8_graph
    with torch.no_grad():
        for m in model.module.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.normal_(std=0.05)
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
    tokens, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    feeds = {"tokens": tokens, "targets": targets}
    feeds |= {
        "lr": torch.tensor(0.0, dtype=torch.float64),
        "step": torch.tensor(1.0, dtype=torch.float64),
    }
    loss, *grads = run_graph(graph, initial_state(graph, model.module) | feeds)
    adapters = [p for p in model.module.parameters() if p.requires_grad]
    eager = lm_loss(model.module(tokens), targets)
    torch.testing.assert_close(loss, eager.detach())
    for got, want in zip(grads, torch.autograd.grad(eager, adapters), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_lora_on_an_nf4_base_keeps_under_a_third_of_full_fine_tuning_state() -> None:
    model, nf4 = compiled_lora("nf4", precision="bf16")
    dense = resolve_model("gpt2-tiny").module
    # full fp32 fine-tuning: each parameter, its gradient and two AdamW moments
    full = 16 * sum(p.numel() for p in dense.parameters())
    assert sum(state_bytes(nf4).values()) < 0.3 * full
