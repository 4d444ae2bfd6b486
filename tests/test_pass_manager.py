"""The pass manager verifies after each pass, times it, and dumps on request."""

from __future__ import annotations

import pytest
import torch

from compiler.builder import GraphBuilder
from compiler.errors import VerifyError
from compiler.ir import Graph, Role
from compiler.passes.manager import PassContext, PassManager
from compiler.passes.noop_views import eliminate_noop_views


def _graph() -> Graph:
    g = GraphBuilder()
    x = g.input("x", (2,), torch.float32, Role.INPUT)
    return g.graph([g.emit1("neg", (x,), name="y", role=Role.OUTPUT)])


def _breaks_shapes(graph: Graph, ctx: PassContext) -> Graph:
    graph.nodes[0].outputs[0].shape = (3,)
    return graph


def test_runs_times_and_dumps(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ctx = PassContext(dump_after={"trace", "noop_views"}, dump_dir=tmp_path)
    PassManager([("noop_views", eliminate_noop_views)]).run(_graph(), ctx)
    assert set(ctx.timings) == {"noop_views"}
    assert (tmp_path / "after-noop_views.txt").read_text() == ctx.dumps["noop_views"]
    assert "neg(%x)" in ctx.dumps["trace"]


def test_a_breaking_pass_is_named() -> None:
    manager = PassManager([("noop_views", eliminate_noop_views), ("bad", _breaks_shapes)])
    with pytest.raises(VerifyError, match=r"shape mismatch: %y .* after pass 'bad'"):
        manager.run(_graph())


def test_unknown_dump_after_is_refused() -> None:
    with pytest.raises(ValueError, match="--dump-after names no pass: nope"):
        PassManager([]).run(_graph(), PassContext(dump_after={"nope"}))
