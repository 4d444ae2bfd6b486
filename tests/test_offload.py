"""Optimizer-state offload (`--offload-optimizer`): AdamW's states in host memory, each update
run by a host thread from its gradient on. The offloaded step equals the on-device step bit for
bit (eager and arena, on the CPU); the plan leaves the states out of the device peak, shows
them as host memory and says which updates overlap the backward; checkpoints are the same
tensors either way, so a run resumes exactly; what cannot be offloaded is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from compiler import offload_op, update_op
from compiler.compile import CompileOptions, compile_model
from compiler.ir import Graph, Phase, Role, dump, parse
from compiler.mesh import Mesh, MeshError
from compiler.offload_op import HOST_UPDATE, HOST_WAIT
from compiler.ops import written
from compiler.passes.buffers import plan_buffers
from compiler.passes.fused_update import fuse_updates
from compiler.passes.manager import PassContext
from compiler.passes.offload import offload_optimizer
from compiler.passes.verify import verify
from examples import build_example
from examples.loss import lm_loss
from memfit.cli import main
from runtime.arena import Arena
from runtime.backend import backend_for
from runtime.eager import run_graph
from runtime.fit import FitError, check_host_fit, held_state, host_available
from runtime.program import Program
from tests.strategies import examples
from tests.test_fused_update import feeds, same, updates
from tests.test_hf_models import tiny_model
from tests.test_train import _final_tensors, run_and_resume_from_step_5

pytestmark = pytest.mark.usefixtures("one_thread")


@given(updates(), st.integers(1, 12), st.booleans(), st.data())
@examples(40)
def test_random_updates_offloaded_bit_for_bit(
    graph: Graph, elements: int, flag: bool, data: st.DataObject
) -> None:
    """Any update, its targets any mix of parameters and optimizer states in any order, run
    in chunks on the host: the same new values as on the device, in eager and in the arena."""
    for target in {id(v): v for n in graph.nodes for v in written(n)}.values():
        target.role = data.draw(st.sampled_from([Role.PARAM, Role.OPTIMIZER_STATE]))
    original, update_op.CHUNK_ELEMENTS = update_op.CHUNK_ELEMENTS, elements
    try:
        fused = verify(fuse_updates(graph, PassContext()), after="fused_update")
    finally:
        update_op.CHUNK_ELEMENTS = original
    offloaded = parse(dump(verify(offload_optimizer(fused, PassContext()), after="offload")))
    outlined = [n for n in fused.nodes if n.op == update_op.UPDATE]
    states = [t for n in outlined for t in n.args[0] if t.role is Role.HOST_STATE]
    assert sum(n.op == HOST_UPDATE for n in offloaded.nodes) == sum(
        any(t.role is Role.HOST_STATE for t in n.args[0]) for n in outlined
    )
    ctx = PassContext()
    planned = plan_buffers(offloaded, ctx)
    assert ctx.plan is not None
    assert ctx.plan.offload.get("host_state_bytes", 0) == sum(t.nbytes for t in states)
    expected_in, eager_in, arena_in = (feeds(graph, flag) for _ in range(3))
    expected = run_graph(fused, expected_in)
    got = run_graph(offloaded, eager_in)
    in_arena = Arena(planned, ctx.plan)(planned, arena_in)
    for outputs, state in ((got, eager_in), (in_arena, arena_in)):
        assert all(same(expected_in[k], state[k]) for k in expected_in)
        assert all(same(a, b) for a, b in zip(expected, outputs, strict=True))


def run_three_steps(name: str, options: CompileOptions, backend: str) -> tuple[Program, list]:
    torch.manual_seed(0)
    family = name.removeprefix("hf:")  # a tiny Hugging Face model of that family
    example = tiny_model(family) if family != name else build_example(name)
    step = compile_model(example, lm_loss, options)
    assert step.plan is not None
    run = run_graph if backend == "eager" else Arena(step.graph, step.plan)
    program = Program.from_module(step.graph, example.module, backend=run)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(3):
        ids = torch.randint(0, example.vocab_size, (2, 17), generator=gen)
        losses.append(program.step(ids[:, :-1], ids[:, 1:])[0].item())
    return program, losses


@pytest.mark.parametrize(
    ("name", "precision", "backend"),
    [
        ("gpt2-tiny", "fp32", "arena"),
        ("llama-tiny", "bf16", "arena"),
        ("gpt2-tiny", "fp16", "eager"),
        ("hf:qwen2", "fp32", "arena"),
    ],
)
def test_offloaded_steps_equal_on_device_steps(name: str, precision: str, backend: str) -> None:
    """Three AdamW steps: the same losses, parameters and moments bit for bit."""
    options = CompileOptions(2, 16, precision=precision)
    on_device, want = run_three_steps(name, options, backend)
    offloaded, got = run_three_steps(
        name, CompileOptions(2, 16, precision=precision, offload_optimizer=True), backend
    )
    assert got == want
    assert any(role.on_host for role in offloaded.io.state.values())  # it did offload
    assert on_device.state.keys() == offloaded.state.keys()  # checkpoints are the same tensors
    for k, t in on_device.state.items():
        assert torch.equal(t, offloaded.state[k]), k


def test_plan_moves_every_state_to_the_host_and_overlaps_the_backward() -> None:
    """gpt2-tiny: the device peak drops by at least the states' bytes, which the plan shows as
    host memory; every update but the last parameter's (the first layer's, whose gradient is
    the backward's last) is queued before the backward ends; the wait follows every read of
    every parameter and every update."""
    plans = {}
    for offload in (False, True):
        step = compile_model(
            build_example("gpt2-tiny"), lm_loss, CompileOptions(2, 16, offload_optimizer=offload)
        )
        plans[offload] = step.plan
    assert plans[False] is not None and plans[True] is not None
    states = plans[False].outside[Role.OPTIMIZER_STATE]
    report = plans[True].offload
    assert report["host_state_bytes"] == states == report["update_bytes"]
    assert report["states_on_device"] == 0
    assert Role.OPTIMIZER_STATE not in plans[True].outside
    assert plans[True].peak_bytes <= plans[False].peak_bytes - states
    assert plans[True].host_bytes >= states
    assert report["during_backward"] >= report["updates"] - 1
    assert report["during_backward_bytes"] > 0.9 * report["update_bytes"]
    nodes = step.graph.nodes
    wait = report["wait_step"]
    assert nodes[wait].op == HOST_WAIT
    params = {id(v) for v in step.graph.inputs if v.role is Role.PARAM}
    assert all(
        i < wait
        for i, n in enumerate(nodes)
        if n.op == HOST_UPDATE or {id(v) for v in n.inputs} & params and n.op != HOST_WAIT
    )
    assert wait > max(i for i, n in enumerate(nodes) if n.phase is Phase.BACKWARD)
    again = plans[True].from_dict(json.loads(plans[True].to_json()))
    assert again.offload == report and again.peak_bytes == plans[True].peak_bytes


def test_what_cannot_be_offloaded_is_refused_by_name() -> None:
    example = build_example("gpt2-tiny")
    for options, error, text in [
        (
            CompileOptions(2, 16, optimizer="adamw8bit", offload_optimizer=True),
            ValueError,
            "adamw8bit",
        ),
        (CompileOptions(2, 16, mesh=Mesh(2, 1, 0), offload_optimizer=True), MeshError, "--dp/--tp"),
        (
            CompileOptions(2, 16, optimizer=None, return_grads=True, offload_optimizer=True),
            ValueError,
            "optimizer",
        ),
    ]:
        with pytest.raises(error, match=text):
            compile_model(example, lm_loss, options)
    result = CliRunner().invoke(main, ["plan", "gpt2-tiny", "--dp", "2", "--offload-optimizer"])
    assert result.exit_code == 2 and "--offload-optimizer" in result.output


def test_plan_command_shows_host_memory() -> None:
    args = ["plan", "gpt2-tiny", "--batch", "2", "--seq", "16", "--offload-optimizer"]
    table = CliRunner().invoke(main, args)
    assert table.exit_code == 0, table.output
    assert "host memory" in table.output and "host updates" in table.output
    doc = json.loads(CliRunner().invoke(main, [*args, "--format", "json"]).output)
    assert doc["config"]["offload_optimizer"] is True
    assert doc["offload"]["host_state_bytes"] > 0
    held = sum(b for r, b in doc["outside_arena"].items() if r != "host_state")
    assert doc["peak_bytes"] == doc["arena_bytes"] + held + doc["workspace_bytes"]


def test_offloaded_training_resumes_exactly_and_equals_on_device_training(
    compiler_data: Path, tmp_path: Path
) -> None:
    """`memfit train --offload-optimizer`, killed after step 5 and resumed, ends with the
    tensors and losses of a run that did not stop, and of a run without offload."""
    args = ["train", "gpt2-tiny", "--batch", "2", "--seq", "16", "--steps", "10"]
    args += ["--warmup", "2", "--checkpoint-every", "5", "--val-every", "0"]
    args += ["--data", str(compiler_data)]
    straight, crashed = run_and_resume_from_step_5([*args, "--offload-optimizer"], tmp_path)
    on_device = tmp_path / "on-device"
    result = CliRunner().invoke(main, [*args, "--out", str(on_device)])
    assert result.exit_code == 0, result.output
    want = _final_tensors(on_device)
    for run in (straight, crashed):
        got = _final_tensors(run)
        assert got.keys() == want.keys()
        assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_offload_on_cuda_frees_the_states_device_bytes(backend: str) -> None:
    """On CUDA the states are pinned host memory: the allocator's peak drops by about their
    bytes, and three steps end where the on-device step ends (the CPU's rounding of the same
    update ops: no fused multiply-add)."""
    device = torch.device("cuda")
    peaks, states = {}, {}
    for offload in (False, True):
        torch.manual_seed(0)
        example = build_example("gpt2-tiny")
        options = CompileOptions(4, 32, backend=backend, offload_optimizer=offload)
        step = compile_model(example, lm_loss, options)
        assert step.plan is not None
        program = Program.from_module(
            step.graph,
            example.module,
            device,
            backend=backend_for(step, "arena" if backend == "eager" else backend, device),
        )
        gen = torch.Generator().manual_seed(1)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(3):
            ids = torch.randint(0, example.vocab_size, (4, 33), generator=gen)
            program.step(ids[:, :-1], ids[:, 1:])
        torch.cuda.synchronize(device)
        peaks[offload] = torch.cuda.max_memory_allocated(device)
        states[offload] = {k: t.cpu() for k, t in program.state.items()}
        moments = sum(t.nbytes for k, t in program.state.items() if k.startswith("exp_avg"))
    assert peaks[True] <= peaks[False] - 0.9 * moments
    for k, t in states[False].items():
        torch.testing.assert_close(states[True][k], t, rtol=1e-5, atol=1e-6)


def test_the_fit_check_counts_only_device_state() -> None:
    """`--device-memory` is checked against what the device holds: offloaded moments are not
    part of the state that must fit before any activation."""
    step = compile_model(
        build_example("gpt2-tiny"), lm_loss, CompileOptions(2, 16, offload_optimizer=True)
    )
    assert step.plan is not None
    assert Role.HOST_STATE in step.plan.outside
    assert set(held_state(step)) == {Role.PARAM, Role.BUFFER} & set(step.plan.outside)


def test_a_failed_host_update_is_raised_at_the_wait_and_writes_nothing() -> None:
    """An error on the host thread surfaces at the step's wait, after every queued update has
    finished, with no parameter written; so does a wait for other parameters than were queued."""
    add = [("add.Tensor", (f"${k}", "$2"), {}, torch.float32) for k in (0, 1)]
    body = update_op.encode(3, add, [3, 4])  # param + input, state + input
    param, state = torch.zeros(4), torch.zeros(4)
    offload_op.host_update([param], [state], [torch.ones(3)], body, 4)  # 3 ≠ 4 elements
    with pytest.raises(RuntimeError, match="size"):
        offload_op.host_update_wait([param], [])
    assert not param.any()
    offload_op.host_update([param], [state], [torch.ones(4)], body, 4)
    with pytest.raises(RuntimeError, match="other tensors"):
        offload_op.host_update_wait([torch.zeros(4)], [])
    offload_op.host_update([param], [state], [torch.ones(4)], body, 4)
    offload_op.host_update_wait([param], [])
    assert torch.equal(param, torch.ones(4))


def test_pinned_host_memory_must_fit_the_host(tmp_path: Path) -> None:
    """A CUDA run's offloaded states are pinned host memory: a plan needing more than the
    host's MemAvailable stops, naming both, before anything is allocated."""
    step = compile_model(
        build_example("gpt2-tiny"), lm_loss, CompileOptions(2, 16, offload_optimizer=True)
    )
    assert step.plan is not None
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       2048 kB\nMemAvailable:    1024 kB\n")
    assert host_available(meminfo) == 1024 * 1024
    assert host_available(tmp_path / "absent") is None
    check_host_fit(step, None)  # unknown: no check
    check_host_fit(step, step.plan.host_bytes)
    with pytest.raises(FitError, match="pinned host memory"):
        check_host_fit(step, host_available(meminfo))
