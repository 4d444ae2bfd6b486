"""MemoryPlan: JSON round trip and documented schema, breakdown, pictures; `memfit plan` output
and its clear errors for flags that make no sense (what a valid budget does is tested with the
budget search)."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from compiler.compile import CompileOptions, compile_model
from compiler.errors import MemfitError
from compiler.ir import Role
from compiler.passes.buffers import plan_buffers
from compiler.passes.manager import PassContext
from compiler.passes.recompute import RecomputePolicy
from compiler.passes.schedule import schedule
from compiler.plan import MemoryPlan
from compiler.plan_render import figure, recomputed, write_html, write_png
from examples import build_example
from examples.loss import lm_loss
from memfit.plan_cmd import plan_command
from tests.test_schedule import traced_step

SCHEMA_DOC = Path(__file__).parents[1] / "docs" / "plan-schema.md"


@cache
def tiny_plan() -> MemoryPlan:
    graph, _ = traced_step("gpt2-tiny")
    ctx = PassContext()
    plan_buffers(schedule(graph, ctx), ctx)
    assert ctx.plan is not None
    ctx.plan.config = {"model": "gpt2-tiny", "batch": 2, "seq": 16}
    return ctx.plan


def test_json_round_trips_and_every_field_is_documented() -> None:
    plan = tiny_plan()
    doc = json.loads(plan.to_json())
    again = MemoryPlan.from_dict(doc)
    assert again.to_dict() == doc and again.values == plan.values
    documented = SCHEMA_DOC.read_text()
    for key in [*doc, *doc["values"][0]]:
        assert f"`{key}`" in documented, key
    with pytest.raises(ValueError, match="memfit.plan/1"):
        MemoryPlan.from_dict({"schema": "something else"})


def test_breakdown_adds_up_to_the_peak() -> None:
    plan = tiny_plan()
    breakdown = plan.breakdown()
    in_arena = sum(b for r, b in breakdown.items() if not r.persistent and r is not Role.INPUT)
    assert in_arena == plan.lower_bound
    assert sum(breakdown.values()) == plan.lower_bound + sum(plan.outside.values())
    assert plan.peak_bytes == plan.arena_bytes + sum(plan.outside.values()) + plan.workspace


def test_table_and_pictures(tmp_path: Path) -> None:
    plan = tiny_plan()
    console = Console(record=True, width=100)
    console.print(plan.table())
    text = console.export_text()
    assert "arena / lower bound" in text and "activation" in text
    png = write_png(plan, tmp_path / "plan.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    page = write_html(plan, tmp_path / "plan.html").read_text()
    assert "data:image/png;base64," in page and "arena / lower bound" in page
    assert "http" not in page.replace("data:image", "")  # self-contained: no external assets


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--precision", "fp8"],
            "--precision 'fp8' is not one .*; valid choices: fp32, bf16, fp16",
        ),
        (["--memory-budget", "lots"], "not a size.*16GiB"),
        (["--memory-budget", "0GB"], "more than 0 bytes"),
        (["--memory-budget", "-3GB"], "not a size"),
        (["--seq", "65"], "--seq 65 is longer than gpt2-tiny's block size \\(64 tokens\\)"),
    ],
)
def test_flags_that_make_no_sense_get_a_clear_error(args: list[str], message: str) -> None:
    result = CliRunner().invoke(plan_command, ["gpt2-tiny", *args])
    assert isinstance(result.exception, MemfitError)  # the CLI prints it as one paragraph
    assert re.search(message, str(result.exception))


def test_shape_flags_out_of_range_are_usage_errors() -> None:
    result = CliRunner().invoke(plan_command, ["gpt2-tiny", "--batch", "0"])
    assert result.exit_code == 2 and "--batch" in result.output


def test_json_output_is_the_plan() -> None:
    result = CliRunner().invoke(
        plan_command, ["gpt2-tiny", "--batch", "2", "--seq", "16", "--format", "json"]
    )
    doc = json.loads(result.output)
    assert doc["config"] == {"model": "gpt2-tiny", "batch": 2, "seq": 16, "precision": "fp32"}
    assert doc["arena_bytes"] <= 1.05 * doc["lower_bound_bytes"]
    assert MemoryPlan.from_dict(doc).to_dict() == doc


def test_sweep_prints_every_policy_and_draws_them(tmp_path: Path) -> None:
    args = ["gpt2-tiny", "--batch", "2", "--seq", "16", "--sweep", "--format", "png"]
    result = CliRunner().invoke(plan_command, [*args, "--out", str(tmp_path / "sweep.png")])
    assert result.exit_code == 0, result.output
    for label in (
        "no recompute",
        "budget 0.5",
        "per-layer checkpointing",
        "checkpoint all but last",
    ):
        assert label in result.output
    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")


def test_a_byte_budget_plan_shows_what_was_recomputed() -> None:
    base = ["gpt2-tiny", "--batch", "2", "--seq", "64"]
    peak = json.loads(CliRunner().invoke(plan_command, [*base, "--format", "json"]).output)
    budget = str(int(0.95 * peak["peak_bytes"]))
    result = CliRunner().invoke(
        plan_command, [*base, "--memory-budget", budget, "--format", "json"]
    )
    doc = json.loads(result.output)
    assert doc["peak_bytes"] <= int(budget)
    assert doc["recompute"]["extra_flops"] > 0 and doc["recompute"]["values"]


def test_pictures_mark_what_was_recomputed(tmp_path: Path) -> None:
    policy = RecomputePolicy(activation_fraction=0.5)
    step = compile_model(
        build_example("gpt2-tiny"), lm_loss, CompileOptions(2, 16, recompute=policy)
    )
    plan = step.plan
    assert plan is not None and recomputed(plan)
    fig = figure(plan)
    labels = {t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().texts}
    assert {"of which recomputed", "recomputed"} <= labels
    assert "values recomputed for +" in fig.get_suptitle()
    page = write_html(plan, tmp_path / "plan.html").read_text()
    assert f"+{plan.extra_flops_percent:.2f}% of the step" in page
