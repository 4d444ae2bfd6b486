"""Pictures of a MemoryPlan, for people: where the step's bytes are over its schedule.

Top: the phase of each step (forward, backward, optimizer). Middle: the memory timeline, arena
bytes live at each step stacked by role, against the arena size and the lower bound, and how
much of it is recomputed values. Bottom: the arena map, each buffer a rectangle spanning its
steps and its bytes, recomputed ones hatched. A PNG (matplotlib, Agg) or one self-contained
HTML page: the same picture inline, the summary and the largest buffers.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from compiler.ir import Phase, Role
from compiler.liveness import live_total
from compiler.plan import MemoryPlan, PlannedValue, fmt_bytes

ROLE_COLORS = {
    Role.ACTIVATION: "#4C72B0",
    Role.GRAD: "#DD8452",
    Role.TEMPORARY: "#8C8C8C",
    Role.OUTPUT: "#C44E52",
}
PHASE_COLORS = {Phase.FORWARD: "#55A868", Phase.BACKWARD: "#8172B3", Phase.OPTIMIZER: "#CCB974"}
MIB = 2**20
# every legend sits to the right of its axes
BESIDE: dict = {"loc": "center left", "bbox_to_anchor": (1.0, 0.5), "fontsize": 8, "frameon": False}


def recomputed(plan: MemoryPlan) -> list[PlannedValue]:
    """The arena buffers of values the recompute pass recomputes in the backward."""
    names = set(plan.recompute.get("values", ()))
    return [v for v in plan.values if v.name in names]


def recompute_summary(plan: MemoryPlan) -> str:
    count = len(plan.recompute["values"])
    return f"{count} values recomputed for +{plan.extra_flops_percent:.2f}% of the step's FLOPs"


def offload_summary(plan: MemoryPlan) -> str:
    o = plan.offload
    share = o["during_backward_bytes"] / max(o["update_bytes"], 1)
    return (
        f"optimizer offloaded: {fmt_bytes(plan.host_bytes)} in host memory; {o['during_backward']}"
        f" of {o['updates']} updates ({100 * share:.0f}% of state bytes) queued during the backward"
    )


def figure(plan: MemoryPlan) -> Figure:
    fig = Figure(figsize=(13, 8.5), dpi=110, layout="constrained")
    phase_ax, time_ax, map_ax = fig.subplots(
        3, 1, sharex=True, gridspec_kw={"height_ratios": [0.35, 4, 4]}
    )
    what = ", ".join(f"{k} {v}" for k, v in plan.config.items())
    fig.suptitle(
        f"{what}\nstep peak {fmt_bytes(plan.peak_bytes)} = arena {fmt_bytes(plan.arena_bytes)}"
        f" ({plan.ratio:.3f} × lower bound {fmt_bytes(plan.lower_bound)})"
        f" + {fmt_bytes(plan.peak_bytes - plan.arena_bytes - plan.workspace)} parameters,"
        + (" batch (optimizer states on the host)" if plan.offload else " optimizer states, batch")
        + (f" + {fmt_bytes(plan.workspace)} kernel scratch" if plan.workspace else "")
        + (f"\n{recompute_summary(plan)}" if plan.recompute else "")
        + (f"\n{offload_summary(plan)}" if plan.offload else ""),
        fontsize=11,
    )
    for phase, first, last in plan.phases:
        phase_ax.axvspan(first, last + 1, color=PHASE_COLORS[Phase(phase)], lw=0)
    phase_ax.set_yticks([])
    handles = [Patch(color=c, label=str(p)) for p, c in PHASE_COLORS.items()]
    if plan.offload:
        for step in plan.offload["update_steps"]:
            phase_ax.axvline(step + 0.5, color="black", lw=0.7)
        phase_ax.axvline(plan.offload["wait_step"] + 0.5, color="#C44E52", lw=2)
        handles += [
            Line2D([], [], color="black", lw=0.7, label="host update queued"),
            Line2D([], [], color="#C44E52", lw=2, label="host updates joined"),
        ]
    phase_ax.legend(handles=handles, **BESIDE)

    series = plan.timeline()
    roles = [r for r in ROLE_COLORS if r in series]
    steps = range(plan.steps)
    time_ax.stackplot(
        steps,
        [[b / MIB for b in series[r]] for r in roles],
        labels=[str(r) for r in roles],
        colors=[ROLE_COLORS[r] for r in roles],
        step="post",
        lw=0,
    )
    again = recomputed(plan)
    if again:
        live = live_total(again, plan.steps) / MIB
        time_ax.step(steps, live, where="post", color="black", lw=0.8, label="of which recomputed")
    time_ax.axhline(plan.arena_bytes / MIB, color="black", ls="--", lw=1, label="arena")
    time_ax.axhline(plan.lower_bound / MIB, color="black", ls=":", lw=1, label="lower bound")
    time_ax.axvline(plan.peak_step, color="black", lw=0.6, alpha=0.5)
    time_ax.set_ylabel("live in the arena (MiB)")
    time_ax.set_title("memory timeline", fontsize=10, loc="left")
    time_ax.legend(**BESIDE)
    time_ax.set_ylim(0, plan.arena_bytes / MIB * 1.05 or 1)

    boxes, colors = [], []
    for v in plan.values:
        boxes.append(_box(v))
        colors.append(ROLE_COLORS.get(v.role, "#8C8C8C"))
    map_ax.add_collection(PolyCollection(boxes, facecolors=colors, edgecolors="white", lw=0.2))
    if again:
        hatched = PolyCollection(
            [_box(v) for v in again], facecolors="none", edgecolors="black", hatch="////", lw=0.3
        )
        map_ax.add_collection(hatched)
        map_ax.legend(handles=[Patch(facecolor="none", hatch="////", label="recomputed")], **BESIDE)
    map_ax.set_ylim(0, plan.arena_bytes / MIB or 1)
    map_ax.set_xlim(0, max(plan.steps, 1))
    map_ax.set_ylabel("arena offset (MiB)")
    map_ax.set_xlabel(f"step (node of the schedule; {plan.steps} in all)")
    map_ax.set_title(f"arena map ({plan.strategy})", fontsize=10, loc="left")
    return fig


def _box(v: PlannedValue) -> list[tuple[float, float]]:
    x0, x1 = v.start, v.last + 1
    y0, y1 = v.offset / MIB, (v.offset + v.size) / MIB
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def png_bytes(plan: MemoryPlan) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(figure(plan)).print_png(buf)
    return buf.getvalue()


def write_png(plan: MemoryPlan, path: Path) -> Path:
    path.write_bytes(png_bytes(plan))
    return path


def write_html(plan: MemoryPlan, path: Path, largest: int = 25) -> Path:
    """One page with no external assets: picture, summary, the largest buffers."""
    image = base64.b64encode(png_bytes(plan)).decode()
    what = html.escape(", ".join(f"{k} {v}" for k, v in plan.config.items()))
    summary = [(str(r), fmt_bytes(b)) for r, b in plan.breakdown().items()]
    summary += [
        ("step peak", fmt_bytes(plan.peak_bytes)),
        ("arena", fmt_bytes(plan.arena_bytes)),
        ("lower bound", fmt_bytes(plan.lower_bound)),
        ("arena / lower bound", f"{plan.ratio:.4f}"),
    ]
    if plan.recompute:
        summary.append(("recomputation", recompute_summary(plan)))
    if plan.offload:
        summary.append(("optimizer offload", offload_summary(plan)))
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in summary)
    biggest = sorted(plan.values, key=lambda v: -v.size)[:largest]
    cells = "".join(
        f"<tr><td>%{html.escape(v.name)}</td><td>{v.role}</td><td>{fmt_bytes(v.bytes)}</td>"
        f"<td>{v.offset:,}</td><td>{v.start}–{v.end}</td>"
        f"<td>{html.escape(v.reuses or '')}</td></tr>"
        for v in biggest
    )
    path.write_text(
        f"""<!doctype html>
<html><head><meta charset="utf-8"><title>memfit plan: {what}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ padding: 2px 10px; border-bottom: 1px solid #ddd; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>memory plan: {what}</h1>
<img alt="memory timeline and arena map" src="data:image/png;base64,{image}">
<h2>at the peak (step {plan.peak_step} of {plan.steps})</h2>
<table>{rows}</table>
<h2>the {len(biggest)} largest buffers</h2>
<table><tr><th>value</th><th>role</th><th>bytes</th><th>offset</th><th>steps</th>
<th>overwrites</th></tr>{cells}</table>
</body></html>
"""
    )
    return path
