"""A compiled artifact: a directory a person can read and a runtime can load.

manifest.json   what was compiled, with which options, and a summary (nodes, bytes by role)
graph.txt       the final IR, as `compiler.ir.dump` prints it (parse it back with `parse`)
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compiler.compile import CompiledStep
from compiler.ir import Graph, Role, dump, parse

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Summary:
    nodes: int
    nodes_by_phase: dict[str, int]
    parameters: int
    bytes_by_role: dict[str, int]


def summarize(graph: Graph) -> Summary:
    """Counts a user checks first: how big the step is and where its bytes are declared."""
    by_role: Counter[str] = Counter()
    for v in graph.values():
        by_role[str(v.role)] += v.nbytes
    params = sum(v.numel for v in graph.inputs if v.role is Role.PARAM)
    phases = Counter(str(n.phase) for n in graph.nodes)
    return Summary(len(graph.nodes), dict(phases), params, {str(r): by_role[str(r)] for r in Role})


def write_artifact(
    out_dir: Path, compiled: CompiledStep, model: str, extra: dict[str, Any] | None = None
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = dump(compiled.graph)
    (out_dir / "graph.txt").write_text(text)
    summary = summarize(compiled.graph)
    manifest = {
        "format_version": FORMAT_VERSION,
        "model": model,
        "batch_size": compiled.batch_size,
        "seq_len": compiled.seq_len,
        "graph_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "torch": torch.__version__,
        "pass_seconds": compiled.context.timings,
        "summary": summary.__dict__,
        **(extra or {}),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out_dir


def read_artifact(directory: Path) -> tuple[Graph, dict[str, Any]]:
    manifest = json.loads((directory / "manifest.json").read_text())
    return parse((directory / "graph.txt").read_text()), manifest
