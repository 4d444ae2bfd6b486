"""One rank of a data/tensor-parallel run: process groups, the rank's batch, its state shards.

Launched by torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment); gloo on
CPU, NCCL on CUDA. The compiled step already holds every collective (compiler/passes/shard.py);
this module binds the step's logical groups ("dp", "tp") to process groups, cuts the global
batch into the rank's rows, and converts between the rank's state (tensor-parallel pieces,
ZeRO bucket shards) and the full, per-parameter state a one-process run holds. Checkpoints are
always that full state, written by rank 0: a run resumes on any mesh, and on one process.

Every rank reads the same global batch and keeps its dp slice of rows, so the batches, the
loader position and therefore the losses do not depend on the number of ranks.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from compiler import collectives
from compiler.ir import Graph
from compiler.mesh import Mesh, MeshError
from compiler.passes.shard import MASTER, ShardLayout, TPSpec, tp_plan
from compiler.trace import STATE_PREFIXES
from runtime.program import Backend, initial_state

Groups = dict[str, Any]


def launched_world() -> int:
    """WORLD_SIZE as torchrun set it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_here(nproc: int, args: list[str]) -> int:
    """Run `python -m memfit ARGS` as `nproc` ranks on this machine, as `torchrun --standalone
    --nproc-per-node NPROC` does, and return the exit status of the first rank that failed (0
    when every rank finished). A failing rank prints its own one-paragraph error; torch's
    launcher would add its report and traceback after it, which a user cannot act on, so its
    logs are silenced and its ChildFailedError becomes this status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "memfit", *args)
    except ChildFailedError as failed:
        _, first = failed.get_first_failure()
        return first.exitcode if first.exitcode > 0 else 1
    return 0


def init_process_group(device: str) -> None:
    """Join the job torchrun started (no-op if this process already has); on CUDA, each rank
    takes the GPU of its LOCAL_RANK."""
    if dist.is_initialized():
        return
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def make_groups(mesh: Mesh, rank: int) -> Groups:
    """The dp and tp groups holding `rank`. Every rank creates every group, in one order."""
    mine: Groups = {}
    for name, members in (("dp", mesh.dp_group), ("tp", mesh.tp_group)):
        seen: set[tuple[int, ...]] = set()
        for r in range(mesh.world):
            ranks = tuple(members(r))
            if ranks not in seen:
                seen.add(ranks)
                group = dist.new_group(list(ranks))
                if rank in ranks:
                    mine[name] = group
    return mine


@dataclass
class Parallel:
    """This process's place in the mesh, and the state conversions that need collectives."""

    mesh: Mesh
    rank: int
    groups: Groups
    layout: ShardLayout | None = None  # set once the step is compiled
    specs: dict[str, TPSpec] = field(default_factory=dict)  # tensor-parallel parameters

    @classmethod
    def from_env(cls, mesh: Mesh, device: str) -> Parallel:
        mesh.check_world(launched_world())
        init_process_group(device)
        rank = dist.get_rank()
        return cls(mesh, rank, make_groups(mesh, rank))

    @property
    def dp_rank(self) -> int:
        return self.mesh.coords(self.rank)[0]

    @property
    def tp_rank(self) -> int:
        return self.mesh.coords(self.rank)[1]

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes checkpoints and metrics."""
        return self.rank == 0

    def bind(self, compiled_layout: ShardLayout, module: nn.Module) -> None:
        """Remember the compiled step's bucket layout and the module's tensor-parallel split."""
        self.layout = compiled_layout
        self.specs = tp_plan(module)[0] if self.mesh.tp > 1 else {}

    def wrap(self, backend: Backend) -> Backend:
        """`backend` with this rank's process groups bound to the graph's group names."""

        def bound(graph: Graph, inputs: Mapping[str, Tensor], device: torch.device) -> list[Tensor]:
            with collectives.bind_groups(self.groups):
                return backend(graph, inputs, device)

        return bound

    def rows(self, batch: Tensor) -> Tensor:
        """This rank's rows of a global batch (contiguous, as the step was compiled for)."""
        return batch.chunk(self.mesh.dp)[self.dp_rank].contiguous()

    def mean_loss(self, loss: Tensor) -> float:
        """The global batch's mean loss from each dp rank's mean (equal rows per rank)."""
        if self.mesh.dp == 1:
            return float(loss)
        total = loss.detach().clone()
        dist.all_reduce(total, group=self.groups["dp"])
        return float(total) / self.mesh.dp

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (a collective: every rank must call it)."""
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors
        total = torch.tensor([int(flag)], device=device)
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
        return bool(total.item())

    def close(self) -> None:
        """Leave the job (the end of `memfit train`)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    # --- state: full (one process) ↔ this rank's pieces ---------------------------------------

    def initial_state(self, graph: Graph, module: nn.Module, device: str) -> dict[str, Tensor]:
        """The rank's persistent tensors from its (already tensor-parallel) module."""
        state = initial_state(graph, module, device)
        if self.layout is not None and self.layout.master:
            params = dict(module.named_parameters())
            for k, bucket in enumerate(self.layout.buckets):
                flat = bucket.flatten({n: params[n].detach() for n in bucket.names})
                state[ShardLayout.state_name(MASTER, k)] = self._mine(flat).to(device)
        for v in graph.inputs:  # mixed-precision ZeRO holds low-precision parameters
            if v.role.persistent:
                state[v.name] = state[v.name].to(v.dtype)
        return state

    def to_local(
        self, full: Mapping[str, Tensor], names: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """From a full checkpoint, the tensors of this rank's state `names` (same keys)."""
        local = {n: self._piece(n, t) for n, t in full.items()}
        out: dict[str, Tensor] = {}
        for k, bucket in enumerate(self.layout.buckets if self._sharded else ()):
            for prefix in (*STATE_PREFIXES, *((MASTER,) if self.layout.master else ())):
                source = "" if prefix == MASTER else prefix
                missing = [source + n for n in bucket.names if source + n not in local]
                if missing:
                    raise MeshError(f"the checkpoint lacks {missing[:3]}")
                flat = bucket.flatten({n: local[source + n] for n in bucket.names})
                out[ShardLayout.state_name(prefix, k)] = self._mine(flat)
        for name, like in names.items():
            if name not in out and name in local:
                out[name] = local[name].to(like.dtype)
        return out

    def to_full(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The one-process state (full, per parameter, fp32 masters) gathered from every rank.

        A collective: every rank calls it, in the same order.
        """
        local = {n: t for n, t in state.items() if not _is_bucket(n)}
        for k, bucket in enumerate(self.layout.buckets if self._sharded else ()):
            for prefix in (*STATE_PREFIXES, *((MASTER,) if self.layout.master else ())):
                flat = self._gather(state[ShardLayout.state_name(prefix, k)], "dp")
                target = "" if prefix == MASTER else prefix
                local |= {target + n: t.clone() for n, t in bucket.split(flat).items()}
        return {n: self._join(n, t) for n, t in local.items()}

    @property
    def _sharded(self) -> bool:
        return self.layout is not None and self.layout.sharded_states

    def _spec(self, name: str) -> TPSpec | None:
        for prefix in STATE_PREFIXES:
            name = name.removeprefix(prefix)
        return self.specs.get(name)

    def _piece(self, name: str, full: Tensor) -> Tensor:
        spec = self._spec(name)
        return full if spec is None else spec.take(full, self.mesh.tp, self.tp_rank).clone()

    def _join(self, name: str, piece: Tensor) -> Tensor:
        spec = self._spec(name)
        if spec is None:
            return piece
        pieces = [torch.empty_like(piece) for _ in range(self.mesh.tp)]
        dist.all_gather(pieces, piece.contiguous(), group=self.groups["tp"])
        return spec.join(pieces)

    def _mine(self, flat: Tensor) -> Tensor:
        return flat.chunk(self.mesh.dp)[self.dp_rank].clone()

    def _gather(self, shard: Tensor, group: str) -> Tensor:
        out = shard.new_empty(shard.numel() * self.mesh.dp)
        collectives.all_gather_single(out, shard.contiguous(), group=self.groups[group])
        return out


def _is_bucket(name: str) -> bool:
    return re.fullmatch(r"bucket\d+", name.rpartition(".")[2]) is not None
