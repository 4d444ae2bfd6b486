"""The arena runtime equals the eager backend bit for bit, and a step allocates nothing but the
few things ATen allocates inside its own kernels, each named here with its reason.

Allocations are counted at the allocator (the profiler's memory events), which sees what a
TorchDispatchMode cannot: scratch that kernels allocate inside an op.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compiler import attention, custom_ops
from compiler.ir import Graph
from compiler.liveness import scratch
from compiler.passes.buffers import plan_buffers
from compiler.passes.linear_cross_entropy import linear_cross_entropy
from compiler.passes.manager import PassContext
from compiler.passes.noop_views import eliminate_noop_views
from compiler.passes.precision import Precision, precision_pass
from compiler.passes.schedule import schedule
from runtime.arena import Arena, allocations
from runtime.eager import run_graph
from runtime.program import Program
from tests.strategies import examples, random_inputs
from tests.test_schedule import feeds, shuffled, steps, traced_step

SCALAR = 8  # bytes: a 0-dim f64 scalar (lr, step arithmetic) cast inside an f32 kernel


def planned(graph: Graph) -> Arena:
    ctx = PassContext()
    graph = plan_buffers(schedule(graph, ctx), ctx)
    assert ctx.plan is not None
    return Arena(graph, ctx.plan)


@given(steps(), st.data())
@examples(30)
def test_random_graphs_run_bit_for_bit_like_eager(graph: Graph, data: st.DataObject) -> None:
    arena = planned(shuffled(graph, data))
    expected_in, got_in = random_inputs(graph), random_inputs(graph)
    expected = run_graph(graph, expected_in)
    got = arena(arena.graph, got_in)
    for a, b in zip([*expected, *expected_in.values()], [*got, *got_in.values()], strict=True):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all()
    assert not arena.fallbacks


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_training_steps_match_eager_and_allocate_only_inside_named_kernels(name: str) -> None:
    graph, model = traced_step(name)
    arena = planned(graph)
    assert not arena.fallbacks
    program = Program.from_module(arena.graph, model, backend=arena)
    reference = feeds(graph, model)  # the eager backend's own state, updated in place
    layer_norms = sum(n.op == "native_layer_norm" for n in graph.nodes)
    for step in range(2):
        batch = feeds(graph, model, seed=step)
        inputs = {k: batch[k] for k in ("tokens", "targets", "lr")}
        inputs["step"] = torch.tensor(step + 1.0, dtype=torch.float64)
        expected = run_graph(graph, reference | inputs)[0]
        outputs: list[torch.Tensor] = []
        seen = allocations(lambda i=inputs, o=outputs: o.extend(program.run(**i)))
        assert torch.equal(outputs[0], expected)  # a view into the arena, read before next step
        assert all(torch.equal(program.state[k], reference[k]) for k in program.state)
        # memfit's attention allocates its block scratch, each piece within the planned
        # workspace (compiler/attention.py workspace_bytes)
        own = {op: seen.sizes.pop(op, []) for op in attention.OPS}
        assert own[attention.FORWARD] and own[attention.BACKWARD]
        assert max(max(sizes) for sizes in own.values()) <= max(scratch(graph))
        tensor_sized = {op: sum(b > SCALAR for b in sizes) for op, sizes in seen.sizes.items()}
        # native_layer_norm: ATen's CPU kernel has no out= form; its out= overload computes
        # output, mean and rstd into fresh tensors, then copies them. sum: the loss counts its
        # target mask (bool) into an int64, and the reduction casts the mask first.
        expected_counts = {"aten::sum": 1, "aten::native_layer_norm": 3 * layer_norms}
        assert {op: n for op, n in tensor_sized.items() if n} == {
            op: n for op, n in expected_counts.items() if n
        }


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_steps_match_eager_bit_for_bit(precision: str) -> None:
    """Scalars meeting bf16/fp16 tensors are wrapped the way ATen wraps them (float64)."""
    graph, model = traced_step("llama-tiny" if precision == "fp16" else "gpt2-tiny")
    graph = precision_pass(graph, PassContext(), Precision(precision))
    arena = planned(graph)
    reference, inputs = feeds(graph, model), feeds(graph, model)
    for scale in (v for v in graph.inputs if v.name == "loss_scale"):
        reference[scale.name] = inputs[scale.name] = torch.tensor(1024.0, dtype=scale.dtype)
    expected = run_graph(graph, reference)
    got = arena(arena.graph, inputs)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert all(torch.equal(reference[k], inputs[k]) for k in reference)


def test_fused_loss_head_writes_into_the_arena() -> None:
    """The fused linear cross-entropy ops compute straight into their planned views: no
    allocation in the step is as large as the weight's gradient they write."""
    graph, model = traced_step("gpt2-tiny")
    graph = linear_cross_entropy(eliminate_noop_views(graph, PassContext()), PassContext())
    heads = [n for n in graph.nodes if n.op in custom_ops.OPS]
    assert len(heads) == 2
    arena = planned(graph)
    assert not arena.fallbacks
    expected_in, got_in = feeds(graph, model), feeds(graph, model)
    expected = run_graph(graph, expected_in)
    got: list[torch.Tensor] = []
    seen = allocations(lambda: got.extend(arena(arena.graph, got_in)))
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert all(torch.equal(expected_in[k], got_in[k]) for k in expected_in)
    grad_weight = heads[1].outputs[1]  # the largest thing the head makes
    assert max(b for sizes in seen.sizes.values() for b in sizes) < grad_weight.nbytes
