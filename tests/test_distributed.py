"""Data, ZeRO and tensor parallel training on CPU with gloo give one process's numbers.

Each test spawns its ranks (torch.multiprocessing, env:// rendezvous on a free local port);
every rank runs the ordinary Trainer, which writes metrics and full checkpoints from rank 0,
so a parallel run is compared to a one-process run on the same global batch file by file:
the loss at every step and every tensor of the final checkpoint (parameters and both AdamW
moments), all fp32.

Tolerances. Sums run in another order on more ranks, so gradients differ in their last bits;
AdamW divides each gradient by its own running magnitude, which turns the last-bit difference
of a gradient that nearly cancels (|g| ~ 1e-7) into a visible difference of that element's
step. Hence: losses to rtol 1e-5 / atol 1e-6 (observed ≤ 2e-7 relative); every tensor to
rtol 1e-4 / atol 1e-3, a third of the largest step lr = 3e-3 (observed ≤ 1.2e-4 for ~100 of
362k elements under tp=2, ≤ 5e-5 for 15 under dp=2, the rest within 1e-6; which elements
depends on the reference's thread count); and the whole difference relative to what
training moved, ‖p − p_ref‖ / ‖p_ref − p_init‖ < 1e-3 (observed 4e-5 dp, 9e-5 tp) — a wrong
scale, shard or sum would give O(1).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from compiler.compile import CompileOptions, compile_model
from compiler.mesh import Mesh, MeshError
from compiler.models import resolve_model
from examples.loss import lm_loss
from pipelines.prepare import prepare
from runtime.checkpoint import LATEST, latest_checkpoint
from runtime.distributed import Parallel, launched_world
from runtime.eager import run_graph
from runtime.program import Program
from runtime.train import TrainConfig, Trainer

LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}
TENSOR_TOL = {"rtol": 1e-4, "atol": 1e-3}
MOVED_TOL = 1e-3


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = Path(__file__).resolve().parents[1]
    files = sorted(p for p in (root / "compiler" / "passes").glob("*.py") if p.stat().st_size)
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(files, out, "byte", val_fraction=0.0, progress=False)  # no validation: faster
    return out


def _config(data: Path, out: Path, **kw: object) -> TrainConfig:
    base = TrainConfig(
        model="gpt2-tiny",
        data=data,
        out=out,
        steps=4,
        batch_size=4,
        seq_len=16,
        warmup=1,
        val_every=0,
        checkpoint_every=0,
        cache_dir=out / "cache",
    )
    return replace(base, **kw)


Job = TrainConfig | Callable[[], None]


def _rank(rank: int, world: int, port: int, jobs: list[Job]) -> None:
    os.environ |= {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
    }
    torch.set_num_threads(1)
    try:
        for job in jobs:
            _one_process(job) if isinstance(job, TrainConfig) else job()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(world: int, jobs: list[Job]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(world, port, jobs), nprocs=world)


def _one_process(cfg: TrainConfig) -> None:
    for _ in Trainer(cfg).run():
        pass


def _losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines)]


def _final(out: Path) -> dict[str, torch.Tensor]:
    path = latest_checkpoint(out / "checkpoints")
    assert path is not None
    return load_file(path / "tensors.safetensors")


def _assert_same_run(run: Path, reference: Path, model: str = "gpt2-tiny") -> None:
    torch.testing.assert_close(
        torch.tensor(_losses(run)), torch.tensor(_losses(reference)), **LOSS_TOL
    )
    got, want = _final(run), _final(reference)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TENSOR_TOL, msg=name)
    torch.manual_seed(0)  # the Trainer's initialisation
    init = dict(resolve_model(model).module.named_parameters())
    diff = sum(float((got[n] - want[n]).square().sum()) for n in init) ** 0.5
    moved = sum(float((want[n] - p.detach()).square().sum()) for n, p in init.items()) ** 0.5
    assert diff / moved < MOVED_TOL, (diff, moved)


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpt2-tiny, 4 steps of the global batch of 4 rows, one process; checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each spawned rank runs
    try:
        _one_process(_config(data, out, checkpoint_every=2))
    finally:
        torch.set_num_threads(threads)
    return out


MESHES: dict[str, dict[str, object]] = {
    "dp": {"dp": 2, "bucket_bytes": 64 * 1024},  # several buckets
    "zero1": {"dp": 2, "zero": 1},
    "zero2": {"dp": 2, "zero": 2, "bucket_bytes": 64 * 1024, "checkpoint_every": 2},
    "tp": {"dp": 1, "tp": 2},
}


def _bf16_zero2_steps(out: Path) -> None:
    """3 steps of gpt2-tiny in bf16 with ZeRO-2 over the launched ranks (bf16 parameters,
    sharded fp32 masters), or in one process; rank 0 saves the losses and the full state."""
    torch.manual_seed(0)
    model = resolve_model("gpt2-tiny")
    world = launched_world()
    mesh = Mesh(world, zero=2) if world > 1 else None
    parallel = Parallel.from_env(mesh, "cpu") if mesh else None
    options = CompileOptions(
        batch_size=4 // world,
        seq_len=16,
        precision="bf16",
        mesh=mesh,
        rank=parallel.rank if parallel else 0,
        bucket_bytes=64 * 1024,
    )
    compiled = compile_model(model, lm_loss, options)
    if parallel is None:
        program = Program.from_module(compiled.graph, model.module)
    else:
        assert compiled.context.shard is not None
        parallel.bind(compiled.context.shard, model.module)
        state = parallel.initial_state(compiled.graph, model.module, "cpu")
        program = Program(compiled.graph, state, "cpu", parallel.wrap(run_graph))
    losses = []
    for rows in torch.randint(0, 256, (3, 4, 17), generator=torch.Generator().manual_seed(1)):
        tokens, targets = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if parallel is not None:
            tokens, targets = parallel.rows(tokens), parallel.rows(targets)
        loss = program.step(tokens, targets, lr=1e-3)[0]
        losses.append(parallel.mean_loss(loss) if parallel else float(loss))
    state = parallel.to_full(program.state) if parallel else program.state
    if parallel is None or parallel.is_writer:
        torch.save({"losses": losses, "state": state}, out)


def _from_step_2(run: Path, out: Path) -> None:
    """`out` as `run` was after step 2: its step-2 checkpoint is the latest, 2 metric lines."""
    shutil.copytree(run / "checkpoints", out / "checkpoints")
    (out / "checkpoints" / LATEST).write_text("step-00000002\n")
    metrics = (run / "metrics.jsonl").read_text().splitlines()[:2]
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics))


@pytest.fixture(scope="module")
def two_ranks(data: Path, reference: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every mesh of MESHES trained by the same two spawned ranks (one start-up for all),
    the one-process run resumed at step 2 on tp=2, then the bf16 ZeRO-2 steps."""
    root = tmp_path_factory.mktemp("two")
    jobs: list[Job] = [_config(data, root / name, **kw) for name, kw in MESHES.items()]
    _from_step_2(reference, root / "resumed-tp")
    jobs.append(_config(data, root / "resumed-tp", dp=1, tp=2, resume=True))
    _spawn(2, [*jobs, partial(_bf16_zero2_steps, root / "bf16.pt")])
    return root


@pytest.mark.parametrize("mesh", list(MESHES))
def test_two_ranks_match_one_process(mesh: str, two_ranks: Path, reference: Path) -> None:
    _assert_same_run(two_ranks / mesh, reference)


def test_two_rank_checkpoint_resumes_on_one_process(
    data: Path, two_ranks: Path, tmp_path: Path
) -> None:
    """ZeRO-2's checkpoint at step 2 holds the full state: one process goes on identically."""
    run = two_ranks / "zero2"
    _from_step_2(run, tmp_path)
    _one_process(_config(data, tmp_path, resume=True))
    _assert_same_run(tmp_path, run)


def test_one_process_checkpoint_resumes_on_tensor_parallel_ranks(
    two_ranks: Path, reference: Path
) -> None:
    """The other way: the one-process step-2 checkpoint, split over tp=2, goes on as before."""
    _assert_same_run(two_ranks / "resumed-tp", reference)


def test_bf16_zero2_with_sharded_masters_matches_one_process(
    two_ranks: Path, tmp_path: Path
) -> None:
    """Mixed-precision ZeRO-2 (bf16 parameters on every rank, fp32 masters sharded) against
    one bf16 process: losses to bf16 resolution, the gathered fp32 state to 1e-2."""
    _bf16_zero2_steps(tmp_path / "one.pt")
    two, one = torch.load(two_ranks / "bf16.pt"), torch.load(tmp_path / "one.pt")
    torch.testing.assert_close(
        torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=2e-3, atol=0
    )
    assert two["state"].keys() == one["state"].keys()
    for name, t in one["state"].items():
        torch.testing.assert_close(two["state"][name], t, rtol=1e-2, atol=1e-2, msg=name)


@pytest.mark.slow
def test_dp2_tp2_on_four_processes(data: Path, reference: Path, tmp_path: Path) -> None:
    cfg = _config(data, tmp_path / "mesh", dp=2, tp=2, zero=1)
    _spawn(4, [cfg])
    _assert_same_run(tmp_path / "mesh", reference)


def test_mesh_that_does_not_fit_is_refused(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(MeshError, match="needs 3 processes, but 1 was launched"):
        _config(data, tmp_path, dp=3).mesh()  # the missing torchrun first, not the batch
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(MeshError, match="does not split over --dp 3"):
        _config(data, tmp_path, dp=3).mesh()
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(MeshError, match="needs --dp ≥ 2"):
        _config(data, tmp_path, dp=1, zero=2).mesh()


def test_a_mesh_without_its_processes_is_refused(data: Path, tmp_path: Path) -> None:
    """--dp 2 in a process torchrun did not start: a clear error, no rendezvous hang."""
    with pytest.raises(MeshError, match="needs 2 processes, but 1 was launched"):
        Trainer(_config(data, tmp_path, dp=2))
