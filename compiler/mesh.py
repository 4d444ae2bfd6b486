"""The device mesh `--dp N --tp K --zero Z`: how many ranks, how they are grouped, and checks.

World = dp × tp ranks. Tensor-parallel groups are contiguous ranks (rank = dp_rank · tp +
tp_rank, Megatron's order: the chattiest group stays within a node); data-parallel groups are
the ranks with the same tp_rank. ZeRO stage 1 shards the AdamW moments over the dp group,
stage 2 the gradients too. Every size the mesh splits must divide evenly, and a mesh that does
not fit the model, the batch or the launched world is refused before anything is traced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from compiler.errors import MemfitError

ZERO_STAGES = (0, 1, 2)

DEFAULT_BUCKET_BYTES = 25 * 2**20  # gradients reduced together across dp ranks (DDP's default)


class MeshError(MemfitError):
    """The mesh does not fit the model, the batch or the processes launched."""


@dataclass(frozen=True)
class Mesh:
    dp: int = 1
    tp: int = 1
    zero: int = 0

    def __post_init__(self) -> None:
        bad = [
            f"--{k} must be an integer ≥ 1, got {getattr(self, k)!r}"
            for k in ("dp", "tp")
            if not _positive(getattr(self, k))
        ]
        if self.zero not in ZERO_STAGES:
            bad.append(f"--zero must be 0, 1 or 2, got {self.zero!r}")
        elif self.zero and self.dp == 1:
            bad.append(f"--zero {self.zero} shards over data-parallel ranks and needs --dp ≥ 2")
        if bad:
            raise MeshError("bad mesh: " + "; ".join(bad))

    @property
    def world(self) -> int:
        return self.dp * self.tp

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp_rank, tp_rank) of a global rank."""
        if not 0 <= rank < self.world:
            raise MeshError(f"rank {rank} is outside a mesh of {self.world} ranks")
        return divmod(rank, self.tp)

    def dp_group(self, rank: int) -> list[int]:
        """The global ranks that share `rank`'s tensor-parallel slice of the model."""
        return [d * self.tp + self.coords(rank)[1] for d in range(self.dp)]

    def tp_group(self, rank: int) -> list[int]:
        dp_rank = self.coords(rank)[0]
        return [dp_rank * self.tp + t for t in range(self.tp)]

    def check_world(self, world_size: int) -> None:
        if world_size != self.world:
            raise MeshError(
                f"the mesh --dp {self.dp} --tp {self.tp} needs {self.world} processes, but"
                f" {world_size} {'was' if world_size == 1 else 'were'} launched (torchrun"
                f" --nproc-per-node {self.world})"
            )

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.dp:
            raise MeshError(
                f"the batch of {batch_size} rows does not split over --dp {self.dp} ranks;"
                f" use a batch that is a multiple of {self.dp}"
            )

    def check_sizes(self, sizes: Mapping[str, int]) -> None:
        """Every size tensor parallelism splits (heads, hidden, ffn, vocab) must divide by tp."""
        bad = [f"{name} = {n}" for name, n in sizes.items() if n % self.tp]
        if bad:
            raise MeshError(
                f"--tp {self.tp} does not divide the model's {', '.join(bad)}: tensor"
                " parallelism splits each of them evenly across the ranks; choose a --tp that"
                " divides them"
            )

    def __str__(self) -> str:
        return f"dp={self.dp} tp={self.tp} zero={self.zero}"


def _positive(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1
