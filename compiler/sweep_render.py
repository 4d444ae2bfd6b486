"""The Pareto picture of a recompute sweep: step peak memory against extra FLOPs."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from compiler.budget import SweepPoint

REFERENCES = {"no recompute": "#C44E52", "per-layer checkpointing": "#8172B3"}


def write_sweep_png(points: list[SweepPoint], config: dict, path: Path) -> Path:
    top = max(p.peak_bytes for p in points)
    unit, scale = ("GiB", 2**30) if top >= 2**30 else ("MiB", 2**20)
    fig = Figure(figsize=(8, 5.5), dpi=110, layout="constrained")
    ax = fig.subplots()
    budgets = [p for p in points if p.label not in REFERENCES]
    budgets.sort(key=lambda p: p.extra_percent)
    ax.plot(
        [p.extra_percent for p in budgets],
        [p.peak_bytes / scale for p in budgets],
        "o-",
        color="#4C72B0",
        label="memfit recompute (min-cut, budgets)",
    )
    for p in budgets:
        ax.annotate(
            p.label,
            (p.extra_percent, p.peak_bytes / scale),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    for p in points:
        if p.label in REFERENCES:
            ax.scatter(
                p.extra_percent,
                p.peak_bytes / scale,
                s=80,
                marker="s",
                color=REFERENCES[p.label],
                label=p.label,
                zorder=3,
            )
    ax.set_xlabel("extra FLOPs (% of the training step)")
    ax.set_ylabel(f"planned step peak ({unit})")
    ax.set_title(
        "peak memory vs recomputation: " + ", ".join(f"{k} {v}" for k, v in config.items()),
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    FigureCanvasAgg(fig).print_png(str(path))
    return path
