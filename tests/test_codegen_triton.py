"""The Triton source generator as text (no triton needed): what a group becomes, which groups
are refused, broadcast indexing, identical layers sharing one source, and the kernels CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from compiler.codegen.fusibility import fusible, group_domain, group_members
from compiler.codegen.triton import _linear_offset, emit, group_kernels
from compiler.ir import Graph, dump, parse
from compiler.passes.fusion import FusionOptions, fuse, internal_values
from compiler.passes.manager import PassContext
from memfit.kernels_cmd import emit_kernels, inspect_kernels_command, kernel_table

TRITON = FusionOptions("triton")

LAYER_NORM_RELU = """\
input %x: f32[4,33] input
input %w: f32[33] input
input %b: f32[33] input
%ln.0: f32[4,33] temporary, %ln.1: f32[4,1] activation, %ln.2: f32[4,1] activation = \
native_layer_norm(%x, [33], %w, %b, 1e-05)  # forward
%r: f32[4,33] output = relu(%ln.0)  # forward
output %r, %ln.1, %ln.2
"""


def fused(text: str) -> Graph:
    return fuse(parse(text), PassContext(), TRITON)


def test_layer_norm_and_its_consumer_become_one_row_kernel() -> None:
    graph = fused(LAYER_NORM_RELU)
    (kernel,) = group_kernels(graph)
    assert kernel.rowwise and kernel.domain == (4, 33)
    assert (kernel.grid, kernel.block) == (4, 64)
    assert [v.name for v in kernel.inputs] == ["x", "w", "b"]
    assert [v.name for v in kernel.outputs] == ["ln.1", "ln.2", "r"]  # ln.0 stays in registers
    assert {id(graph.value("ln.0"))} == internal_values(graph)
    src = kernel.source
    assert "mask = cols < 33" in src
    assert "x1 = tl.load(in1 + cols, mask, other=0)" in src  # the weight, broadcast over rows
    assert "tl.store(out0 + row, " in src  # one mean per row
    assert "ln" not in src and "%" not in src  # canonical names: equal groups, equal text
    assert "%ln.0" in kernel.header and "in0  = %x" in kernel.header
    compile(src, "<kernel>", "exec")


def test_identical_layers_share_one_source() -> None:
    second = "\n".join(
        line.replace("%x", "%x2").replace("%ln", "%ln2").replace("%r", "%r2")
        for line in LAYER_NORM_RELU.splitlines()
        if not line.startswith(("input %w", "input %b", "output"))
    )
    text = LAYER_NORM_RELU.replace("output %r, %ln.1, %ln.2", second + "\noutput %r, %r2")
    kernels = group_kernels(fused(text))
    assert len(kernels) == 2 and kernels[0].key == kernels[1].key
    assert kernels[0].header != kernels[1].header


@pytest.mark.parametrize(
    ("shape", "domain", "expected"),
    [
        ((4, 33), (4, 33), "offs"),
        ((1, 33), (4, 33), "offs % 33"),
        ((4, 1), (4, 33), "offs // 33"),
        ((1, 1), (4, 33), "0"),
        ((1, 1, 16, 16), (2, 4, 16, 16), "offs % 256"),
        ((2, 1, 16, 1), (2, 4, 16, 16), "offs // 1024 * 16 + offs // 16 % 16"),
    ],
)
def test_broadcast_offsets(shape: tuple, domain: tuple, expected: str) -> None:
    assert _linear_offset(shape, domain, "offs", 1) == expected


def test_unsupported_op_stays_eager() -> None:
    graph = fused(
        """\
input %x: f32[8] input
%a: f32[8] temporary = log1p(%x)  # forward
%b: f32[8] temporary = exp(%a)  # forward
%c: f32[8] output = neg(%b)  # forward
output %c
"""
    )
    assert graph.nodes[0].group is None and fusible(graph.nodes[0]) is None
    assert [n.op for n in next(iter(group_members(graph).values()))] == ["exp", "neg"]


def test_reduced_row_read_with_another_alignment_is_not_fused() -> None:
    """sum(x, -1) without keepdim is [i, j]; broadcast against x [i, j, k] it is read as
    [j, k]: the consumer must not join the row group that stores it by row."""
    graph = parse(
        """\
input %x: f32[3,3,3] input
%s: f32[3,3] temporary = sum.dim_IntList(%x, [-1])  # forward
%y: f32[3,3,3] output = add.Tensor(%x, %s)  # forward
output %y
"""
    )
    assert group_domain(graph.nodes, set()) is None
    assert len(group_members(fuse(graph, PassContext(), TRITON))) == 2


def test_phases_are_never_fused_together() -> None:
    graph = fused(
        """\
input %x: f32[8] input
%a: f32[8] activation = exp(%x)  # forward
%b: f32[8] temporary = neg(%a)  # backward
output %b
"""
    )
    assert graph.nodes[0].group != graph.nodes[1].group


def test_emit_refuses_an_illegal_group() -> None:
    graph = parse(LAYER_NORM_RELU.replace("relu(%ln.0)", "log1p(%ln.0)"))
    with pytest.raises(ValueError, match="cannot be one kernel"):
        emit(0, graph.nodes, [])


def test_emit_kernels_and_inspect_cli(tmp_path: Path) -> None:
    graph = fused(LAYER_NORM_RELU)
    files = emit_kernels(graph, tmp_path / "kernels")
    assert [p.name for p in files] == ["group0000_row_native_layer_norm_relu.py"]
    assert files[0].read_text().startswith("# group 0: row-wise over [4, 33]")
    (entry,) = json.loads((tmp_path / "kernels" / "index.json").read_text())
    assert entry["kind"] == "row" and entry["outputs"] == ["ln.1", "ln.2", "r"]
    assert entry["bytes_moved"] == (4 * 33 + 33 + 33 + 4 + 4 + 4 * 33) * 4
    (tmp_path / "graph.txt").write_text(dump(graph))
    (tmp_path / "manifest.json").write_text("{}")
    result = CliRunner().invoke(inspect_kernels_command, [str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "1 fused groups" in result.output
    console = Console(width=250, record=True)
    console.print(kernel_table(graph, group_kernels(graph)))
    text = console.export_text()
    assert "row_native_layer_norm_relu" in text and "2 fused into 1 kernels" in text
    (tmp_path / "graph.txt").write_text(LAYER_NORM_RELU)
    result = CliRunner().invoke(inspect_kernels_command, [str(tmp_path)])
    assert "no fused groups" in result.output
