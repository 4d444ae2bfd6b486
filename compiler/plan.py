"""MemoryPlan: where every byte of a training step lives, and when.

Built by passes/buffers.py from the scheduled graph: per arena buffer {bytes, start, end, offset,
role}, the arena size, the lower bound (most bytes live at one step), the bytes the caller owns
outside the arena (parameters, buffers, optimizer states, the batch), and the largest scratch a
kernel holds for itself while it runs (the fused loss head's chunk of logits). It prints as a rich
table, serialises to JSON (schema in docs/plan-schema.md) and draws (compiler/plan_render.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from compiler.ir import Graph, Phase, Role
from compiler.liveness import ALIGN, Lifetime, live_bytes
from compiler.offload_op import HOST_UPDATE, HOST_WAIT

SCHEMA = "memfit.plan/1"


@dataclass(frozen=True)
class PlannedValue:
    name: str
    bytes: int  # exact bytes of the value
    size: int  # bytes it occupies in the arena (padded to ALIGN)
    offset: int
    start: int  # step (node index) that defines it
    end: int  # last step that reads it or a view of it
    role: Role
    reuses: str | None = None  # the dying input it overwrites in place
    handed_over: bool = False  # a later value overwrites it in place at step `end`

    @property
    def last(self) -> int:
        return self.end - 1 if self.handed_over else self.end


@dataclass
class MemoryPlan:
    values: list[PlannedValue]
    steps: int
    arena_bytes: int
    lower_bound: int
    peak_step: int
    strategy: str
    outside: dict[Role, int]  # bytes the caller owns (params, buffers, optimizer states, batch)
    phases: list[tuple[str, int, int]]  # (phase, first step, last step) runs over the schedule
    workspace: int = 0  # most scratch one kernel holds outside the arena while it runs
    config: dict[str, Any] = field(default_factory=dict)  # what was planned (model, batch, ...)
    # what the recompute pass chose: extra_flops, step_flops, values (names recomputed)
    recompute: dict[str, Any] = field(default_factory=dict)
    # optimizer-state offload (passes/offload.py): host bytes and how much overlaps the backward
    offload: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        graph: Graph,
        lifetimes: list[Lifetime],
        offsets: dict[int, int],
        arena_bytes: int,
        lower_bound: int,
        peak_step: int,
        strategy: str,
        workspace: int = 0,
    ) -> MemoryPlan:
        values = [
            PlannedValue(
                lt.value.name,
                lt.value.nbytes,
                lt.size,
                offsets[id(lt.value)],
                lt.start,
                lt.end,
                lt.role,
                lt.reuses.name if lt.reuses is not None else None,
                lt.handed_over,
            )
            for lt in lifetimes
        ]
        outside: dict[Role, int] = {}
        for v in graph.inputs:
            outside[v.role] = outside.get(v.role, 0) + v.nbytes
        phases: list[tuple[str, int, int]] = []
        for i, node in enumerate(graph.nodes):
            if phases and phases[-1][0] == node.phase:
                phases[-1] = (phases[-1][0], phases[-1][1], i)
            else:
                phases.append((str(node.phase), i, i))
        return cls(
            values,
            len(graph.nodes),
            arena_bytes,
            lower_bound,
            peak_step,
            strategy,
            outside,
            phases,
            workspace,
            offload=offload_report(graph),
        )

    @property
    def ratio(self) -> float:
        return self.arena_bytes / self.lower_bound if self.lower_bound else 1.0

    @property
    def peak_bytes(self) -> int:
        """The whole step's device footprint: the arena, everything the caller holds on the
        device, kernel scratch (offloaded optimizer states are in host memory)."""
        held = sum(b for r, b in self.outside.items() if not r.on_host)
        return self.arena_bytes + held + self.workspace

    @property
    def host_bytes(self) -> int:
        """Host memory the step holds: offloaded states and the copies their updates work on."""
        return self.offload.get("host_state_bytes", 0) + self.offload.get("staging_bytes", 0)

    @property
    def extra_flops_percent(self) -> float:
        """What recomputation adds, in % of the step's FLOPs (0 without the recompute pass)."""
        if not self.recompute:
            return 0.0
        return 100 * self.recompute["extra_flops"] / max(self.recompute["step_flops"], 1)

    def timeline(self) -> dict[Role, list[int]]:
        """Arena bytes live at each step, per role."""
        return live_bytes(self.values, self.steps)

    def breakdown(self) -> dict[Role, int]:
        """Bytes by role at the peak step: what the arena holds then, plus the caller's."""
        at_peak = {r: series[self.peak_step] for r, series in self.timeline().items()}
        merged = {r: at_peak.get(r, 0) + self.outside.get(r, 0) for r in Role}
        return {r: b for r, b in merged.items() if b}

    # --- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "config": self.config,
            "align": ALIGN,
            "steps": self.steps,
            "arena_bytes": self.arena_bytes,
            "lower_bound_bytes": self.lower_bound,
            "ratio": round(self.ratio, 6),
            "peak_step": self.peak_step,
            "peak_bytes": self.peak_bytes,
            "strategy": self.strategy,
            "outside_arena": {str(r): b for r, b in self.outside.items()},
            "workspace_bytes": self.workspace,
            "breakdown_at_peak": {str(r): b for r, b in self.breakdown().items()},
            "phases": [list(p) for p in self.phases],
            "recompute": self.recompute,
            "offload": self.offload,
            "values": [
                {
                    "name": v.name,
                    "bytes": v.bytes,
                    "size": v.size,
                    "offset": v.offset,
                    "start": v.start,
                    "end": v.end,
                    "role": str(v.role),
                    "reuses": v.reuses,
                }
                for v in self.values
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryPlan:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} document (schema: {d.get('schema')!r})")
        reused = {v["reuses"] for v in d["values"] if v["reuses"]}
        values = [
            PlannedValue(
                v["name"],
                v["bytes"],
                v["size"],
                v["offset"],
                v["start"],
                v["end"],
                Role(v["role"]),
                v["reuses"],
                v["name"] in reused,
            )
            for v in d["values"]
        ]
        return cls(
            values,
            d["steps"],
            d["arena_bytes"],
            d["lower_bound_bytes"],
            d["peak_step"],
            d["strategy"],
            {Role(r): b for r, b in d["outside_arena"].items()},
            [(p, a, b) for p, a, b in d["phases"]],
            d.get("workspace_bytes", 0),
            d["config"],
            d.get("recompute", {}),
            d.get("offload", {}),
        )

    # --- terminal -----------------------------------------------------------------------------

    def table(self) -> Table:
        """Bytes by role at the peak, then the arena against its lower bound."""
        what = ", ".join(f"{k} {v}" for k, v in self.config.items())
        table = Table(title=f"memory plan{': ' + what if what else ''}")
        table.add_column(f"at the peak (step {self.peak_step} of {self.steps})")
        table.add_column("where")
        table.add_column("bytes", justify="right")
        for role, nbytes in self.breakdown().items():
            where = "host" if role.on_host else "caller" if role in self.outside else "arena"
            table.add_row(str(role), where, fmt_bytes(nbytes))
        if self.workspace:
            table.add_row("kernel scratch", "its kernel", fmt_bytes(self.workspace))
        table.add_section()
        table.add_row("step peak", "", fmt_bytes(self.peak_bytes), style="bold")
        table.add_row("arena", self.strategy, fmt_bytes(self.arena_bytes), style="bold")
        table.add_row("lower bound", "most bytes live at once", fmt_bytes(self.lower_bound))
        table.add_row("arena / lower bound", "", f"{self.ratio:.4f}", style="bold")
        if self.recompute:
            table.add_section()
            table.add_row(
                "recomputed",
                f"{len(self.recompute['values'])} values",
                f"+{self.extra_flops_percent:.2f}% FLOPs",
            )
        if self.offload:
            o = self.offload
            table.add_section()
            table.add_row("host memory", "states + update copies", fmt_bytes(self.host_bytes))
            table.add_row(
                "host updates",
                f"{o['during_backward']} of {o['updates']} start during the backward",
                f"{100 * o['during_backward_bytes'] / max(o['update_bytes'], 1):.0f}% of bytes",
            )
            if o["states_on_device"]:
                table.add_row("states left on device", "", fmt_bytes(o["states_on_device"]))
        return table


def offload_report(graph: Graph) -> dict[str, Any]:
    """Host bytes of an offloaded step, and how many host updates the schedule issues before
    the backward's last node (their CPU work overlaps the device's); {} without offload."""
    updates = [(i, n) for i, n in enumerate(graph.nodes) if n.op == HOST_UPDATE]
    if not updates:
        return {}
    end = max((i for i, n in enumerate(graph.nodes) if n.phase is Phase.BACKWARD), default=-1)
    size = [sum(t.nbytes for t in n.args[1]) for _, n in updates]  # the states each updates
    early = [k for k, (i, _) in enumerate(updates) if i < end]
    return {
        "host_state_bytes": sum(v.nbytes for v in graph.inputs if v.role.on_host),
        "staging_bytes": sum(t.nbytes for _, n in updates for t in (*n.args[0], *n.args[2])),
        "updates": len(updates),
        "update_bytes": sum(size),
        "during_backward": len(early),
        "during_backward_bytes": sum(size[k] for k in early),
        "states_on_device": sum(v.nbytes for v in graph.inputs if v.role is Role.OPTIMIZER_STATE),
        "update_steps": [i for i, _ in updates],
        "wait_step": next(i for i, n in enumerate(graph.nodes) if n.op == HOST_WAIT),
    }


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError
