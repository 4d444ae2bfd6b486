"""A compiled graph bound to its persistent state (parameters, buffers, AdamW moments)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from compiler.compile import StepIO
from compiler.ir import Graph, Role
from runtime.eager import run_graph
from runtime.loss_scale import LossScaler

Backend = Callable[[Graph, Mapping[str, Tensor], torch.device], list[Tensor]]


class Program:
    """Runs its graph on the shared `state` plus per-call feeds (batch, lr, step).

    Several programs (train step, validation, update) may share one state dict: they then see
    each other's parameter writes, as one model would.
    """

    def __init__(
        self,
        graph: Graph,
        state: dict[str, Tensor],
        device: torch.device | str = "cpu",
        backend: Backend = run_graph,
    ) -> None:
        self.graph = graph
        self.device = torch.device(device)
        self.state = state
        self.backend = backend
        self.step_count = 0
        self.io = StepIO.of(graph)
        # fp16 graphs scale their loss in the graph and report overflow (precision pass)
        self.loss_scaler = LossScaler() if self.io.found_inf is not None else None
        self.skipped = False  # the last run overflowed: the graph left every state unchanged
        if missing := self.io.state.keys() - state.keys():
            raise KeyError(f"state is missing {sorted(missing)}")

    @classmethod
    def from_module(
        cls, graph: Graph, module: nn.Module, device: torch.device | str = "cpu", **kw: object
    ) -> Program:
        """Copy the module's parameters and buffers in; AdamW moments start at zero."""
        return cls(graph, initial_state(graph, module, device), device, **kw)

    @property
    def parameters(self) -> dict[str, Tensor]:
        return {v.name: self.state[v.name] for v in self.graph.inputs if v.role is Role.PARAM}

    def run(self, **feeds: Tensor) -> list[Tensor]:
        """Run the graph once; persistent values come from `state`, the rest from `feeds`."""
        merged = {name: self.state[name] for name in self.io.state}
        # Graphs are traced on contiguous example inputs: their views assume that layout.
        merged |= {k: t.to(self.device).contiguous() for k, t in feeds.items()}
        scale = self.io.loss_scale
        if self.loss_scaler is not None and scale is not None and scale not in feeds:
            merged[scale] = torch.tensor(self.loss_scaler.scale, device=self.device)
        outputs = self.backend(self.graph, merged, self.device)
        if self.loss_scaler is not None and self.io.found_inf is not None:
            self.skipped = bool(outputs[self.io.found_inf])
            self.loss_scaler.update(self.skipped)
        return outputs

    def step(self, tokens: Tensor, targets: Tensor, lr: float = 1e-3) -> list[Tensor]:
        """One training step (counting steps for AdamW's bias correction); outputs, loss first."""
        self.step_count += 1
        outputs = self.run(tokens=tokens, targets=targets, **self.hyper(lr, self.step_count))
        self.step_count -= self.skipped  # a skipped step does not count for bias correction
        return outputs

    def hyper(self, lr: float, step: int) -> dict[str, Tensor]:
        """The optimizer's per-step scalar inputs, if the graph has them."""
        scalars = ((self.io.lr, lr), (self.io.step, float(step)))
        return {
            k: torch.tensor(x, dtype=torch.float64, device=self.device)
            for k, x in scalars
            if k is not None
        }


def initial_state(
    graph: Graph, module: nn.Module, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """Persistent tensors for `graph` from `module`: copies of weights, zeroed AdamW moments
    and gradient sums; offloaded moments in host memory (pinned, for asynchronous copies)."""
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    pinned = torch.device(device).type == "cuda"
    state: dict[str, Tensor] = {}
    for v in graph.inputs:
        if v.role in (Role.PARAM, Role.BUFFER):
            state[v.name] = tensors[v.name].detach().to(device, copy=True)
        elif v.role in (Role.OPTIMIZER_STATE, Role.GRAD_ACCUM):
            state[v.name] = torch.zeros(v.shape, dtype=v.dtype, device=device)
        elif v.role.on_host:
            state[v.name] = torch.zeros(v.shape, dtype=v.dtype, pin_memory=pinned)
    return state
