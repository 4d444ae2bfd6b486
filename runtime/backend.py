"""Which runtime runs a compiled step: one choice, made here, for train, benchmarks and tests.

- eager: op by op with ATen, every value allocated and freed by the caching allocator;
- arena: one allocation for the step's plan, every op writing its planned view (runtime/arena);
- triton: the arena with fused groups launched as generated Triton kernels (CUDA);
- auto: triton on CUDA, the arena elsewhere.
"""

from __future__ import annotations

import os
from typing import Literal, get_args

import torch

from compiler.compile import CompiledStep
from compiler.errors import MemfitError
from runtime.arena import Arena
from runtime.eager import run_graph
from runtime.program import Backend

BackendName = Literal["auto", "eager", "arena", "triton"]
BACKENDS: tuple[str, ...] = get_args(BackendName)


class BackendError(MemfitError):
    """The backend asked for cannot run here."""


def planned_backend(name: str, device: torch.device | str) -> str:
    """`auto` made concrete for `device` (a plan may be made for a backend not runnable here)."""
    if name not in BACKENDS:
        raise BackendError(f"--backend {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" else "arena"
    return name


def fusion_of(backend: str) -> str:
    """The compile option for a concrete backend: triton groups nodes into kernels."""
    return "triton" if backend == "triton" else "eager"


def resolve_backend(name: str, device: torch.device | str) -> str:
    """`auto` made concrete for `device`; a backend this machine cannot run is an error."""
    device = torch.device(device)
    name = planned_backend(name, device)
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendError(
            f"--backend triton generates GPU kernels, and this run is on {device.type} (no"
            " CUDA device): use --backend arena or eager here (the kernels run on CPU only"
            " in the Triton interpreter, for tests, with TRITON_INTERPRET=1)"
        )
    return name


def backend_for(
    step: CompiledStep,
    name: str,
    device: torch.device | str = "cpu",
    buffer: torch.Tensor | None = None,
) -> Backend:
    """The runtime for `step` on `device`: `name` is eager, arena or triton (resolved), the
    arena ones over `buffer` if given (programs that never run at once share one)."""
    if name == "eager":
        return run_graph
    if step.plan is None:
        raise BackendError(f"the {name} backend runs a planned step; this one has no plan")
    if name == "arena":
        return Arena(step.graph, step.plan, device, buffer)
    from runtime.triton_backend import TritonArena  # imports triton

    return TritonArena(step.graph, step.plan, device, buffer)
