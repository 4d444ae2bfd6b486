"""The shard pass and its pieces, in one process: bucket layout, tensor-parallel splits,
collectives on a group of one, the rewritten graph's structure, and meshes that cannot work."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compiler import collectives
from compiler.compile import CompileOptions, compile_model
from compiler.ir import Phase, Role, dump, parse
from compiler.mesh import Mesh, MeshError
from compiler.models import resolve_model
from compiler.passes.shard import Bucket, ShardLayout, TPSpec, buckets
from compiler.passes.verify import verify
from examples.loss import lm_loss
from runtime.program import Program
from tests.strategies import examples

shapes = st.lists(st.tuples(st.integers(1, 5), st.integers(1, 4)), min_size=1, max_size=5)


@examples(25)
@given(shapes=shapes, world=st.integers(1, 4))
def test_bucket_flatten_split_round_trip_and_shards_cover_it(
    shapes: list[tuple[int, int]], world: int
) -> None:
    bucket = Bucket(tuple(f"p{i}" for i in range(len(shapes))), tuple(shapes), world)
    tensors = {n: torch.randn(s) for n, s in zip(bucket.names, bucket.shapes, strict=True)}
    flat = bucket.flatten(tensors)
    assert flat.numel() == world * bucket.shard >= bucket.numel > flat.numel() - world
    for name, t in bucket.split(flat).items():
        assert t.equal(tensors[name])
    pieces = [tensors[n] for n in bucket.names]  # what memfit::shard gives each rank
    assert flat.equal(torch.cat([_shard_of(pieces, world, r) for r in range(world)]))


def _shard_of(xs: list[torch.Tensor], world: int, rank: int) -> torch.Tensor:
    size = collectives.shard_size(sum(x.numel() for x in xs), world)
    flat = torch.nn.functional.pad(torch.cat([x.reshape(-1) for x in xs]), (0, world * size))
    return flat[rank * size : (rank + 1) * size]


def test_buckets_keep_gradient_order_and_close_at_the_cap() -> None:
    order = ["c", "a", "b", "d"]
    shapes = {"a": (10,), "b": (30,), "c": (5,), "d": (1,)}
    got = buckets(order, shapes, itemsize=4, cap=100, world=2)
    assert [b.names for b in got] == [("c", "a", "b"), ("d",)]


@examples(25)
@given(
    rows=st.integers(1, 3), cols=st.integers(1, 3), tp=st.integers(1, 4), parts=st.integers(1, 3)
)
def test_tp_pieces_join_back(rows: int, cols: int, tp: int, parts: int) -> None:
    full = torch.randn(parts * tp * rows, tp * cols)
    for dim in (0, 1):
        spec = TPSpec(dim, parts if dim == 0 else 1)
        pieces = [spec.take(full, tp, r) for r in range(tp)]
        assert spec.join(pieces).equal(full)


def test_tp_piece_of_a_fused_projection_takes_each_block() -> None:
    """q, k, v stacked in one weight: a rank keeps its heads of each."""
    full = torch.arange(12.0).view(12, 1)  # q rows 0-3, k rows 4-7, v rows 8-11
    assert TPSpec(0, 3).take(full, 2, 1).flatten().tolist() == [2, 3, 6, 7, 10, 11]


def test_collectives_on_a_group_of_one_are_local() -> None:
    a, b = torch.randn(2, 3), torch.randn(5)
    wait = torch.ops.memfit.wait
    reduced = wait(torch.ops.memfit.all_reduce([a, b], "dp", 1), [])
    assert reduced.equal(torch.cat([a.flatten(), b]))
    assert wait(torch.ops.memfit.reduce_scatter([a, b], "dp", 1), []).equal(reduced)
    assert wait(torch.ops.memfit.all_gather(a, "dp", 1), []).equal(a.flatten())
    assert torch.ops.memfit.shard([a, b], "dp", 1).equal(reduced)
    meta = [torch.empty(7, device="meta"), torch.empty(2, 2, device="meta")]
    assert torch.ops.memfit.reduce_scatter(meta, "dp", 4).shape == (3,)
    assert torch.ops.memfit.all_gather(meta[1], "dp", 4).shape == (16,)


def test_unbound_group_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="no process group is bound"):
        torch.ops.memfit.all_reduce([torch.ones(2)], "dp", 2)


@pytest.fixture(scope="module")
def zero2() -> tuple[object, ShardLayout]:
    """gpt2-tiny's step for rank 0 of --dp 2 --zero 2, small buckets."""
    torch.manual_seed(0)
    options = CompileOptions(batch_size=2, seq_len=16, mesh=Mesh(2, 1, 2), bucket_bytes=64 * 1024)
    compiled = compile_model(resolve_model("gpt2-tiny"), lm_loss, options)
    return compiled.graph, compiled.context.shard


def test_zero2_states_are_shards_of_the_buckets(zero2: tuple) -> None:
    graph, layout = zero2
    assert len(layout.buckets) > 1
    states = {v.name: v for v in graph.inputs if v.role is Role.OPTIMIZER_STATE}
    for k, bucket in enumerate(layout.buckets):
        for prefix in ("exp_avg.", "exp_avg_sq."):
            assert states.pop(ShardLayout.state_name(prefix, k)).shape == (bucket.shard,)
    assert not states  # nothing else: no full-size moment anywhere
    params = [v for v in graph.inputs if v.role is Role.PARAM]
    assert sum(b.numel for b in layout.buckets) == sum(v.numel for v in params)


def test_each_bucket_reduction_overlaps_the_backward_that_follows(zero2: tuple) -> None:
    """After the whole pipeline (schedule included): every bucket but the last has backward
    work between its reduce-scatter's start and its wait; only waits read a start's buffer."""
    graph, layout = zero2
    nodes = graph.nodes
    starts = [i for i, n in enumerate(nodes) if n.op == collectives.REDUCE_SCATTER]
    assert len(starts) == len(layout.buckets) > 1
    waits = {id(n.args[0]): i for i, n in enumerate(nodes) if n.op == collectives.WAIT}
    users = graph.users()
    overlapped = []
    for i, bucket in zip(starts, layout.buckets, strict=True):
        (out,) = nodes[i].outputs
        assert out.shape == (bucket.shard,)
        assert all(u.op == collectives.WAIT for u in users[id(out)])
        overlapped.append(any(n.phase is Phase.BACKWARD for n in nodes[i + 1 : waits[id(out)]]))
    assert all(overlapped[:-1])
    gathers = [n for n in nodes if n.op == collectives.ALL_GATHER]
    assert len(gathers) == len(layout.buckets)


def test_sharded_graph_dumps_and_parses_back(zero2: tuple) -> None:
    graph, _ = zero2
    text = dump(graph)
    assert "memfit::reduce_scatter([" in text
    assert dump(verify(parse(text))) == text


def test_one_rank_mesh_is_the_unsharded_step_bit_for_bit() -> None:
    """The rebuilt update (AdamW stamped per parameter) is the traced one."""
    torch.manual_seed(0)
    model = resolve_model("gpt2-tiny")
    twin = copy.deepcopy(model)
    plain = compile_model(model, lm_loss, CompileOptions(batch_size=2, seq_len=8)).graph
    options = CompileOptions(batch_size=2, seq_len=8, mesh=Mesh())
    sharded = compile_model(twin, lm_loss, options).graph
    assert not any(n.op in collectives.OPS for n in sharded.nodes)
    a, b = Program.from_module(plain, model.module), Program.from_module(sharded, twin.module)
    tokens = torch.randint(0, 256, (2, 9))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    for _ in range(2):
        assert a.step(x, y)[0].equal(b.step(x, y)[0])
    assert a.state.keys() == b.state.keys()
    for name, t in a.state.items():
        assert t.equal(b.state[name]), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dp": 0}, "--dp must be an integer ≥ 1"),
        ({"tp": 2.5}, "--tp must be an integer ≥ 1"),
        ({"dp": 2, "zero": 3}, "--zero must be 0, 1 or 2"),
        ({"zero": 1}, "needs --dp ≥ 2"),
    ],
)
def test_bad_mesh_values(kwargs: dict, message: str) -> None:
    with pytest.raises(MeshError, match=message):
        Mesh(**kwargs)


def test_mesh_that_does_not_divide_the_model_or_the_world() -> None:
    example = resolve_model("llama-tiny", device="meta")  # 4 heads, ffn 192, vocab 256
    options = CompileOptions(batch_size=1, seq_len=8, mesh=Mesh(1, 3))
    with pytest.raises(MeshError, match=r"--tp 3 does not divide the model's n_head = 4"):
        compile_model(example, lm_loss, options)
    with pytest.raises(MeshError, match="needs 4 processes, but 2 were launched"):
        Mesh(2, 2).check_world(2)
    with pytest.raises(MeshError, match="does not split over --dp 4"):
        Mesh(4).check_batch(6)
    mesh = Mesh(2, 4)  # tp groups are contiguous ranks, dp groups stride by tp
    assert (mesh.world, mesh.coords(5), mesh.dp_group(5), mesh.tp_group(5)) == (
        8,
        (1, 1),
        [1, 5],
        [4, 5, 6, 7],
    )


def test_tensor_parallel_refuses_what_it_cannot_split() -> None:
    example = resolve_model("gpt2-tiny", device="meta")
    options = CompileOptions(batch_size=1, seq_len=8, mesh=Mesh(1, 2))
    with pytest.raises(MeshError, match="custom loss function cannot be split"):
        compile_model(example, lambda logits, y: logits.sum(), options)
