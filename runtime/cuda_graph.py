"""Replay a compiled step as one CUDA graph.

On the arena every tensor a step touches lives at a fixed address: parameters and moments in
the program's state, everything else at its planned offset. So the whole step — forward,
backward, AdamW and the parameter writes — can be captured once and replayed with a single
launch, which removes the per-node Python and launch overhead that dominates small kernels.
What changes between steps (the batch, the learning rate and AdamW's step count) is copied
into fixed input buffers before each replay.

Only for graphs without a dynamic loss scale (fp32, bf16): fp16's overflow check reads a
device value on the host every step, which a captured graph cannot do. Nor for an offloaded
optimizer (`--offload-optimizer`): its updates run on the host, outside any device graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from runtime.program import Program


class GraphedStep:
    """`program.step` captured as one CUDA graph; later steps are replays of it.

    The program must have run at least one eager step first: that compiles the Triton kernels
    and lets cuBLAS pick its algorithms, neither of which may happen during capture. Capture
    itself runs nothing, so the run goes on where the eager steps left it.
    """

    def __init__(self, program: Program, tokens: Tensor, targets: Tensor) -> None:
        if program.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if program.loss_scaler is not None:
            raise ValueError("an fp16 step reads its overflow flag on the host: not capturable")
        if any(role.on_host for role in program.io.state.values()):
            raise ValueError("an offloaded optimizer updates on the host: not capturable")
        if program.step_count < 1:
            raise ValueError("run one eager step before capturing (kernels compile on it)")
        self.program = program
        self.feeds = {
            "tokens": tokens.to(program.device).contiguous(),
            "targets": targets.to(program.device).contiguous(),
        } | program.hyper(0.0, 0)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the step; nothing runs yet
            self.outputs = program.run(**self.feeds)

    def step(self, tokens: Tensor, targets: Tensor, lr: float = 1e-3) -> list[Tensor]:
        """One training step: new batch and hyper-parameters copied in, the graph replayed."""
        self.feeds["tokens"].copy_(tokens, non_blocking=True)
        self.feeds["targets"].copy_(targets, non_blocking=True)
        self.program.step_count += 1
        for name, value in self.program.hyper(lr, self.program.step_count).items():
            self.feeds[name].copy_(value)
        self.graph.replay()
        return self.outputs
