"""What a training run is asked to do: `memfit train`'s options as one value, checked.

Kept free of torch at import, like the command line that declares its defaults from it:
`memfit train --help` answers without loading the libraries a run needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from compiler.errors import MemfitError
from compiler.mesh import DEFAULT_BUCKET_BYTES, Mesh, MeshError
from compiler.optimizers import Optimizer
from compiler.precisions import Precision

if TYPE_CHECKING:
    from compiler.lora import LoraConfig


class TrainingError(MemfitError):
    """Training cannot go on (diverged, or a resume that does not fit the run)."""


@dataclass
class TrainConfig:
    model: str = "gpt2-tiny"
    data: Path | None = None  # a `memfit prepare` directory; None: the embedded corpus
    out: Path = Path("runs/default")
    steps: int = 300
    batch_size: int = 16
    seq_len: int | None = None  # default: the model's block size
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    val_every: int = 100
    val_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    seed: int = 0
    resume: bool = False
    deterministic: bool = False  # bit-identical runs whatever the thread count (one thread)
    device: str = "cpu"
    dp: int | None = None  # data-parallel ranks; None: every launched rank not used by tp
    tp: int = 1  # tensor-parallel ranks
    zero: int = 0  # ZeRO stage over the data-parallel ranks
    bucket_bytes: int = DEFAULT_BUCKET_BYTES  # gradients reduced together across dp ranks
    precision: Precision = Precision.FP32  # master weights and AdamW states stay fp32
    lora: LoraConfig | None = None  # adapters on a frozen base
    quantize_base: str | None = None  # int8 | nf4 frozen base (with lora)
    optimizer: Optimizer = Optimizer.ADAMW  # adamw8bit: int8 block-wise moments
    offload_optimizer: bool = False  # AdamW states in host memory, updated by the CPU
    document_mask: bool = False  # attention within each packed document (the data's EOS)
    memory_budget: str | None = None  # SIZE or FRACTION, as `memfit plan --memory-budget`
    recompute: bool = True  # False: keep every activation the backward reads
    device_memory: str | None = None  # SIZE; default on CUDA: the device's free memory
    backend: str = "auto"  # auto | eager | arena | triton (runtime/backend.py)
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "memfit")

    def check(self) -> None:
        bad = [
            f"--{name.removesuffix('_size').removesuffix('_len').replace('_', '-')} must be"
            f" ≥ {low}, got {getattr(self, name)}"
            for name, low in [
                ("steps", 1),
                ("batch_size", 1),
                ("seq_len", 1),
                ("grad_accum", 1),
                ("warmup", 0),
                ("val_every", 0),
                ("checkpoint_every", 0),
                ("keep_checkpoints", 1),
            ]
            if getattr(self, name) is not None and getattr(self, name) < low
        ]
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad.append(f"--lr must be a positive number, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            bad.append(f"--weight-decay must be a number ≥ 0, got {self.weight_decay}")
        if bad:
            raise TrainingError("bad training options: " + "; ".join(bad))

    def mesh(self) -> Mesh | None:
        """The mesh to run on; None for one process. Checked against the batch."""
        from runtime.distributed import launched_world  # torch: only when a run starts

        world = launched_world()
        if self.dp is None and world % max(self.tp, 1):
            raise MeshError(
                f"--tp {self.tp} does not divide the {world} process(es) launched; launch a"
                f" multiple of {self.tp} with torchrun --nproc-per-node"
            )
        dp = max(world // max(self.tp, 1), 1) if self.dp is None else self.dp
        mesh = Mesh(dp, self.tp, self.zero)
        if mesh.world == 1 and world == 1:
            return None
        mesh.check_world(world)  # before the batch: a missing torchrun is the first problem
        mesh.check_batch(self.batch_size)
        if self.grad_accum > 1:
            raise TrainingError("--grad-accum with --dp/--tp is not supported yet")
        return mesh
