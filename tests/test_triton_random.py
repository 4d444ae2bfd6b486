"""hypothesis: on random valid graphs, fusion + the triton backend compute what eager computes.

The graphs mix pointwise ops, broadcasting, reductions over any dim, softmax, matmuls and
views of views (tests/strategies.py), so groups meet every boundary: reductions that are not
row-wise, non-contiguous view inputs, values used inside and outside a group.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from hypothesis import HealthCheck, given  # noqa: E402
from torch.testing import assert_close  # noqa: E402

from compiler.codegen.fusibility import group_members  # noqa: E402
from compiler.ir import Graph  # noqa: E402
from compiler.passes.fusion import FusionOptions, fuse  # noqa: E402
from compiler.passes.manager import PassContext  # noqa: E402
from compiler.passes.verify import verify  # noqa: E402
from runtime import eager, triton_backend  # noqa: E402
from tests.strategies import examples, graphs, random_inputs  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@examples(60, suppress_health_check=[HealthCheck.too_slow])
@given(graphs(max_nodes=14))
def test_triton_backend_matches_eager_on_random_graphs(graph: Graph) -> None:
    fused = verify(fuse(graph, PassContext(), FusionOptions("triton")))
    inputs = {k: t.to(DEVICE) for k, t in random_inputs(graph).items()}
    want = eager.run_graph(graph, inputs, DEVICE)
    got = triton_backend.run_graph(fused, inputs, DEVICE)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_random_graphs_do_form_groups() -> None:
    """Guard against the property above passing vacuously (every node left eager)."""
    seen: list[int] = []

    @examples(10, database=None)
    @given(graphs(min_nodes=6, max_nodes=12))
    def count(graph: Graph) -> None:
        seen.append(len(group_members(fuse(graph, PassContext(), FusionOptions("triton")))))

    count()
    assert sum(seen) > 0
