"""The pass manager: run passes in order, verify after each, time each, dump on request."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from compiler.ir import Graph, dump
from compiler.passes.verify import verify

if TYPE_CHECKING:
    from compiler.passes.recompute import RecomputeReport
    from compiler.passes.schedule import ScheduleReport
    from compiler.passes.shard import ShardLayout
    from compiler.plan import MemoryPlan


@dataclass(slots=True)
class PassContext:
    """What the manager records while running the passes, and the typed report each pass that
    has one leaves (None until it runs). A pass's options are its own dataclass, bound in the
    pipeline (compiler/compile.py), so a misspelt option or report fails where it is written
    (slots: no attribute can be added by mistake)."""

    dump_after: set[str] = field(default_factory=set)
    dump_dir: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    dumps: dict[str, str] = field(default_factory=dict)
    shard: ShardLayout | None = None  # a mesh's buckets and state shards
    recompute: RecomputeReport | None = None  # what was kept and what recomputing costs
    schedule: ScheduleReport | None = None  # the peak before and after reordering
    plan: MemoryPlan | None = None  # set by the buffers pass


Pass = Callable[[Graph, PassContext], Graph]


class PassManager:
    """An ordered list of named passes: `run` applies them, each followed by `verify`."""

    def __init__(self, passes: list[tuple[str, Pass]], *, check_shapes: bool = True) -> None:
        self.passes = passes
        self.check_shapes = check_shapes
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"pass names must be unique: {self.names}")

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.passes]

    def run(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        ctx = ctx or PassContext()
        unknown = ctx.dump_after - set(self.names) - {"trace"}
        if unknown:
            raise ValueError(
                f"--dump-after names no pass: {', '.join(sorted(unknown))}"
                f" (passes: trace, {', '.join(self.names)})"
            )
        self._emit("trace", graph, ctx)
        verify(graph, after="trace", check_shapes=self.check_shapes)
        for name, run_pass in self.passes:
            start = time.perf_counter()
            graph = run_pass(graph, ctx)
            ctx.timings[name] = time.perf_counter() - start
            verify(graph, after=name, check_shapes=self.check_shapes)
            self._emit(name, graph, ctx)
        return graph

    @staticmethod
    def _emit(name: str, graph: Graph, ctx: PassContext) -> None:
        if name not in ctx.dump_after:
            return
        text = dump(graph)
        ctx.dumps[name] = text
        if ctx.dump_dir is not None:
            ctx.dump_dir.mkdir(parents=True, exist_ok=True)
            (ctx.dump_dir / f"after-{name}.txt").write_text(text)
