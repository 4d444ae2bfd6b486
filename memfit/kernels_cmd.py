"""`memfit inspect kernels ARTIFACT`, and `emit_kernels` behind `memfit compile --emit-dir`.

A reader sees each fused group as the Triton source that runs (with which IR value each name
stands for) and, per group, its ops, the bytes it moves and its FLOPs — next to what the same
nodes would move unfused, the one number that says what fusion bought.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:  # the compiler (and torch) load when a command runs, not for --help
    from compiler.codegen.triton import Kernel
    from compiler.ir import Graph

console = Console()


def emit_kernels(graph: Graph, out_dir: Path) -> list[Path]:
    """Write one readable `.py` per fused group and an `index.json`; returns the kernel files."""
    from compiler.codegen.triton import group_kernels

    out_dir.mkdir(parents=True, exist_ok=True)
    paths, index = [], []
    for k in group_kernels(graph):
        path = out_dir / f"group{k.group:04d}_{k.name}.py"
        path.write_text(k.readable_source())
        paths.append(path)
        index.append(
            {
                "group": k.group,
                "file": path.name,
                "kernel": k.name,
                "sha256": k.key,
                "kind": "row" if k.rowwise else "pointwise",
                "domain": list(k.domain),
                "grid": k.grid,
                "block": k.block,
                "ops": list(k.ops),
                "inputs": [v.name for v in k.inputs],
                "outputs": [v.name for v in k.outputs],
                "bytes_moved": k.bytes_moved,
                "flops": k.flops,
            }
        )
    (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return paths


def unfused_bytes(graph: Graph) -> dict[int, int]:
    """group id → bytes its nodes would read and write if each ran as its own kernel."""
    from compiler.codegen.fusibility import group_members

    return {
        group: sum(v.nbytes for n in members for v in [*n.inputs, *n.outputs])
        for group, members in group_members(graph).items()
    }


def kernel_table(graph: Graph, kernels: list[Kernel]) -> Table:
    unfused = unfused_bytes(graph)
    table = Table(title=f"{len(kernels)} fused groups")
    for column in ("group", "kernel", "kind", "domain", "ops"):
        table.add_column(column)
    for column in ("bytes moved", "unfused", "FLOPs"):
        table.add_column(column, justify="right")
    for k in kernels:
        ops = ", ".join(dict.fromkeys(k.ops))
        table.add_row(
            str(k.group),
            k.name,
            "row" if k.rowwise else "pointwise",
            "×".join(map(str, k.domain)) or "scalar",
            f"{len(k.ops)}: {ops}",
            _mib(k.bytes_moved),
            _mib(unfused[k.group]),
            f"{k.flops:,}",
        )
    moved = sum(k.bytes_moved for k in kernels)
    before = sum(unfused.values())
    unique = len({k.key for k in kernels})
    table.caption = (
        f"{len(graph.nodes)} nodes; {sum(len(k.ops) for k in kernels)} fused into"
        f" {len(kernels)} kernels ({unique} distinct sources); memory traffic of fused nodes"
        f" {_mib(before)} → {_mib(moved)}"
    )
    return table


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


@click.command("kernels")
@click.argument(
    "artifact", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="ARTIFACT"
)
def inspect_kernels_command(artifact: Path) -> None:
    """List the fused groups of a compiled ARTIFACT: ops, bytes moved, FLOPs."""
    from compiler.codegen.triton import group_kernels
    from compiler.ir import parse

    graph = parse((artifact / "graph.txt").read_text())
    kernels = group_kernels(graph)
    if not kernels:
        console.print(f"{artifact}: no fused groups (compile with --backend triton)")
        return
    console.print(kernel_table(graph, kernels))
