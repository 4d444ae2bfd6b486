"""Per-rank plans without hardware: layer scaling is exact, Llama-7B under ZeRO-2 on 8 ranks
agrees with the hand-derived formula of docs/parallel-memory.md, the largest batch is the
largest that fits, and a mesh that does not divide the model is refused."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from compiler.mesh import Mesh, MeshError
from compiler.parallel_plan import example_config, largest_batch, llama_formula, rank_plan
from compiler.passes.precision import Precision
from memfit.parallel_cmd import parallel_plan_command


@pytest.mark.parametrize(
    ("model", "mesh", "precision"),
    [
        ("llama-mini", Mesh(dp=2, tp=2, zero=2), Precision.BF16),  # mixed-precision ZeRO + TP
        (
            "gpt2-mini",
            Mesh(dp=2, zero=1),
            Precision.FP32,
        ),  # peak in the backward, full-size buckets
    ],
)
def test_layer_scaling_equals_the_full_trace(model: str, mesh: Mesh, precision: Precision) -> None:
    """4 layers extrapolated from traces of 2 and 3 equal a trace of all 4, byte for byte."""
    scaled = rank_plan(model, mesh, precision, batch=1, seq=32)
    full = rank_plan(model, mesh, precision, batch=1, seq=32, scale_layers=False)
    assert scaled.traced == (2, 3) and full.traced == (4,)
    assert scaled.by_role == full.by_role


def test_llama_7b_zero2_on_8_ranks_matches_the_formula() -> None:
    """bf16, ZeRO-2 over dp=8, one 4096-token row per rank, no recompute (as the formula):
    within 5% (observed < 0.1%)."""
    mesh = Mesh(dp=8, zero=2)
    plan = rank_plan("llama-7b", mesh, Precision.BF16, batch=1, seq=4096, recompute=False)
    formula = llama_formula(example_config("llama-7b"), mesh, Precision.BF16, 1, 4096)
    assert plan.peak == pytest.approx(formula["total"], rel=0.05)
    by_role = {str(r): b for r, b in plan.by_role.items()}
    assert by_role["param"] == formula["parameters (bf16, every rank)"]
    states = formula["AdamW m, v and fp32 master (1/dp)"]
    assert by_role["optimizer_state"] == pytest.approx(states, rel=1e-4)  # bucket padding


def test_largest_batch_is_the_largest_that_fits() -> None:
    mesh = Mesh(dp=2, zero=1)
    three = rank_plan("llama-tiny", mesh, Precision.FP32, batch=3, seq=64)
    rows, plan = largest_batch("llama-tiny", mesh, Precision.FP32, three.peak, seq=64)
    assert rows == 3 and plan.peak == three.peak
    rows, plan = largest_batch("llama-tiny", mesh, Precision.FP32, 1000, seq=64)
    assert rows == 0 and plan.batch == 1 and plan.peak > 1000


def test_a_mesh_that_does_not_divide_the_heads_is_refused() -> None:
    with pytest.raises(MeshError, match="--tp 3 does not divide the model's n_head = 32"):
        rank_plan("llama-7b", Mesh(dp=1, tp=3), Precision.BF16, batch=1, seq=128)


def test_plan_command_prints_the_rank_and_refuses_a_bad_mesh() -> None:
    runner = CliRunner()
    args = ["llama-tiny", "--dp", "2", "--zero", "2", "--batch", "1", "--seq", "16"]
    result = runner.invoke(parallel_plan_command, [*args, "--no-recompute", "--format", "json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["mesh"] == {"dp": 2, "tp": 1, "zero": 2} and out["peak_bytes"] > 0
    assert out["formula"]["total"] > 0
    result = runner.invoke(parallel_plan_command, ["llama-tiny", "--tp", "3"])
    assert isinstance(result.exception, MeshError)
    assert "--tp 3 does not divide the model's n_head = 4" in str(result.exception)
