"""The fusion pass: which groups form on the example models, and that grouping keeps the graph
valid and its numbers on random graphs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given
from torch.testing import assert_close

from compiler.codegen.fusibility import group_domain, group_members, stored_values
from compiler.compile import CompileOptions, compile_model
from compiler.ir import dump, parse
from compiler.passes.fusion import FusionOptions, fuse, internal_values
from compiler.passes.manager import PassContext
from compiler.passes.verify import verify
from examples import build_example
from examples.loss import lm_loss
from runtime.eager import run_graph
from tests.strategies import examples, graphs, random_inputs

TRITON = FusionOptions("triton")


def compiled(name: str, **options: object):
    torch.manual_seed(0)
    model = build_example(name)
    opts = CompileOptions(batch_size=2, seq_len=8, **options)
    return model, compile_model(model, lm_loss, opts).graph


def group_ops(graph) -> list[set[str]]:
    return [{n.op for n in members} for members in group_members(graph).values()]


@pytest.fixture(scope="module")
def gpt2_triton():
    return compiled("gpt2-tiny", backend="triton")[1]


@pytest.fixture(scope="module")
def llama_triton():
    return compiled("llama-tiny", backend="triton")[1]


def test_gpt2_groups_cover_norms_gelu_and_adamw(gpt2_triton) -> None:
    ops = group_ops(gpt2_triton)
    assert any("native_layer_norm" in g and "add.Tensor" in g for g in ops)  # residual + LN
    # attention is memfit's own op, in no group (the masked softmax group: test_triton_kernels)
    assert not any(op.startswith("memfit::attention") for g in ops for op in g)
    assert any(n.op == "memfit::attention" for n in gpt2_triton.nodes)
    assert any("gelu" in g for g in ops)
    assert any({"tanh", "sum.dim_IntList"} <= g for g in ops) is False  # bwd GELU: pointwise
    ln_backward = [g for g in ops if "sum.dim_IntList" in g and "sub.Tensor" in g]
    assert ln_backward, "layer norm backward (two row sums) is one group"
    adamw = [g for g in ops if {"sqrt", "div.Tensor", "where.self"} <= g]
    n_params = sum(v.role == "param" for v in gpt2_triton.inputs)
    assert len(adamw) == n_params  # one AdamW kernel per parameter


def test_llama_groups_cover_rmsnorm_swiglu_rotary(llama_triton) -> None:
    ops = group_ops(llama_triton)
    assert any({"pow.Tensor_Scalar", "mean.dim", "rsqrt", "mul.Tensor"} <= g for g in ops)
    assert any({"sigmoid", "mul.Tensor"} <= g for g in ops)  # SwiGLU
    rotary = [m for m in group_members(llama_triton).values() if len(m) == 6]
    assert any({n.op for n in m} == {"mul.Tensor", "sub.Tensor", "add.Tensor"} for m in rotary)


@pytest.mark.parametrize("fixture", ["gpt2_triton", "llama_triton"])
def test_groups_are_contiguous_legal_and_round_trip(fixture: str, request) -> None:
    graph = request.getfixturevalue(fixture)
    verify(graph)
    stored = stored_values(graph)
    for group, members in group_members(graph).items():
        positions = [graph.nodes.index(n) for n in members]
        assert positions == list(range(positions[0], positions[0] + len(members)))
        assert len({n.phase for n in members}) == 1
        assert group_domain(members, {id(v) for v in stored[group]}) is not None
    text = dump(graph)
    assert "group=" in text
    assert dump(parse(text)) == text


def test_internal_values_are_never_read_outside_their_group(gpt2_triton) -> None:
    internal = internal_values(gpt2_triton)
    group_of = {id(v): n.group for n in gpt2_triton.nodes for v in n.outputs}
    assert internal
    for node in gpt2_triton.nodes:
        for v in node.inputs:
            if id(v) in internal:
                assert node.group is not None and node.group == group_of[id(v)]
    assert not internal & {id(v) for v in gpt2_triton.outputs}


def test_eager_backend_gets_no_groups(gpt2_triton) -> None:
    plain = gpt2_triton.copy()
    for node in plain.nodes:
        node.group = None
    assert fuse(plain, PassContext(), FusionOptions("eager")) is plain
    assert not internal_values(plain)


@examples(40, suppress_health_check=[HealthCheck.too_slow])
@given(graphs(max_nodes=16))
def test_fusion_on_random_graphs_keeps_verifier_and_numbers(graph) -> None:
    fused = fuse(graph, PassContext(), TRITON)
    verify(fused)
    stored = stored_values(fused)
    for group, members in group_members(fused).items():
        positions = [fused.nodes.index(n) for n in members]
        assert positions == list(range(positions[0], positions[0] + len(members)))
        assert group_domain(members, {id(v) for v in stored[group]}) is not None
    inputs = random_inputs(graph)
    for got, want in zip(run_graph(fused, inputs), run_graph(graph, inputs), strict=True):
        assert_close(got, want, equal_nan=True)
