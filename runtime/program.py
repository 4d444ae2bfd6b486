"""A compiled training step bound to its persistent state (parameters, buffers, AdamW moments)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from compiler.ir import Graph, Role
from compiler.trace import STATE_PREFIXES
from runtime.eager import run_graph

Backend = Callable[[Graph, Mapping[str, Tensor], torch.device], list[Tensor]]


class Program:
    """Owns the state tensors and runs one step per call; `step_count` feeds AdamW's bias terms."""

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
        persistent = {v.name for v in graph.inputs if v.role.persistent}
        if missing := persistent - state.keys():
            raise KeyError(f"state is missing {sorted(missing)}")

    @classmethod
    def from_module(
        cls, graph: Graph, module: nn.Module, device: torch.device | str = "cpu", **kw: object
    ) -> Program:
        """Copy the module's parameters and buffers in; AdamW moments start at zero."""
        device = torch.device(device)
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        state: dict[str, Tensor] = {}
        for v in graph.inputs:
            if v.role in (Role.PARAM, Role.BUFFER):
                state[v.name] = tensors[v.name].detach().to(device, copy=True)
            elif v.role is Role.OPTIMIZER_STATE:
                state[v.name] = torch.zeros(v.shape, dtype=v.dtype, device=device)
        return cls(graph, state, device, **kw)

    @property
    def parameters(self) -> dict[str, Tensor]:
        return {v.name: self.state[v.name] for v in self.graph.inputs if v.role is Role.PARAM}

    @property
    def has_optimizer(self) -> bool:
        return any(v.name == "step" for v in self.graph.inputs)

    def step(self, tokens: Tensor, targets: Tensor, lr: float = 1e-3) -> list[Tensor]:
        """Run one step; returns the graph's outputs (the loss first)."""
        feeds = dict(self.state)
        feeds["tokens"] = tokens.to(self.device)
        feeds["targets"] = targets.to(self.device)
        if self.has_optimizer:
            self.step_count += 1
            feeds["lr"] = torch.tensor(lr, dtype=torch.float64, device=self.device)
            feeds["step"] = torch.tensor(
                float(self.step_count), dtype=torch.float64, device=self.device
            )
        return self.backend(self.graph, feeds, self.device)

    def optimizer_state(self) -> dict[str, Tensor]:
        return {k: t for k, t in self.state.items() if k.startswith(STATE_PREFIXES)}
