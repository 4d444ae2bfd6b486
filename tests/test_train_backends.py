"""`memfit train` runs the plan: the arena gives the eager backend's losses at every step
(budgets, gradient accumulation, LoRA on an int8 base, bf16), its measured peak is the
planned one, and what cannot run or fit stops before anything is written."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from compiler.ir import Role
from memfit.cli import main
from runtime.train import TrainConfig, Trainer

STEPS = 3
# Same graph, two runtimes: equal to fp32 rounding. bf16 is held to the same bound (the
# arena runs the very ops eager runs, in the same order and dtypes).
RTOL = 1e-6


@pytest.fixture(scope="module")
def data(compiler_data: Path) -> Path:
    return compiler_data


def _arena_then_eager(data: Path, out: Path, model: str, **options: object) -> list[Trainer]:
    """The same compiled steps trained on the arena, then from the same weights on eager."""
    cfg = TrainConfig(
        model=model,
        data=data,
        out=out / "arena",
        steps=STEPS,
        batch_size=2,
        seq_len=16,
        warmup=1,
        val_every=STEPS,
        val_batches=1,
        checkpoint_every=0,
        backend="arena",
        **options,  # type: ignore[arg-type]
    )
    arena = Trainer(cfg)
    eager = arena.with_backend("eager", out / "eager")
    for trainer in (arena, eager):
        trainer.records = list(trainer.run())  # type: ignore[attr-defined]
    return [arena, eager]


CASES = {
    "plain": {},
    "budget-0.5": {"memory_budget": "0.5"},
    "grad-accum-4": {"grad_accum": 4},
    "lora-int8": {"lora": "r=8", "quantize_base": "int8"},
    "bf16": {"precision": "bf16"},
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("case", list(CASES))
def test_arena_trains_like_eager_within_its_plan(
    data: Path, tmp_path: Path, model: str, case: str
) -> None:
    options = dict(CASES[case])
    if "lora" in options:
        from compiler.lora import LoraConfig

        options["lora"] = LoraConfig.parse(str(options["lora"]))
    arena, eager = _arena_then_eager(data, tmp_path, model, **options)
    got = [(r.loss, r.val_loss) for r in arena.records]  # type: ignore[attr-defined]
    want = [(r.loss, r.val_loss) for r in eager.records]  # type: ignore[attr-defined]
    assert len(got) == STEPS
    for (loss, val), (loss_ref, val_ref) in zip(got, want, strict=True):
        assert math.isclose(loss, loss_ref, rel_tol=RTOL), (got, want)
        assert (val is None) == (val_ref is None)
        assert val is None or math.isclose(val, val_ref, rel_tol=RTOL), (got, want)
    assert got[-1][1] is not None  # validation ran, on the arena too
    # the step ran out of one arena, within what was planned
    assert arena.arena is not None and eager.arena is None
    assert arena.measured_peak is not None
    assert all(r.tokens_per_s > 0 and r.peak_bytes for r in arena.records)  # type: ignore[attr-defined]
    assert arena.measured_peak <= 1.02 * arena.planned_peak, (
        arena.measured_peak,
        arena.planned_peak,
    )
    if case == "grad-accum-4":  # the sums are planned state, zero between steps
        plan = arena.compiled.plan
        assert plan is not None and plan.outside[Role.GRAD_ACCUM] > 0
        sums = [t for k, t in arena.state.items() if k.startswith("grad_accum.")]
        assert sums and all(not t.any() for t in sums)


def _cli(data: Path, out: Path, *args: str) -> tuple[int, str]:
    base = ["train", "gpt2-tiny", "--batch", "8", "--seq", "32", "--steps", "1"]
    result = CliRunner().invoke(main, [*base, "--data", str(data), "--out", str(out), *args])
    return result.exit_code, " ".join(result.output.split())


def test_what_cannot_run_or_fit_stops_before_writing(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    code, text = _cli(data, out, "--memory-budget", "10KB")
    assert code == 2 and "no recomputation fits a" in text, text
    code, text = _cli(data, out, "--device-memory", "100KB")
    assert code == 2 and "smaller than the model's state alone" in text, text
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, text = _cli(data, out, "--backend", "triton")
    assert code == 2 and "--backend triton" in text and "CUDA" in text, text
    code, text = _cli(data, out, "--memory-budget", "lots")
    assert code == 2 and "is not a size" in text, text
    assert not out.exists()


def test_a_plan_too_big_names_what_fits_and_that_fits(data: Path, tmp_path: Path) -> None:
    """The advice is planned: the same tokens per step in micro-batches it names pass the
    same check and train, with the accumulation buffers in the printed plan."""
    code, text = _cli(data, tmp_path / "a", "--device-memory", "3.5MiB")
    assert code == 2, text
    assert "more than --device-memory 3.50 MiB" in text and "nothing was allocated" in text
    assert not (tmp_path / "a").exists()
    assert re.search(r"--batch [124] \(peak", text), text  # a smaller batch alone fits too
    found = re.search(r"--batch (\d+) --grad-accum (\d+)", text)
    assert found, text
    batch, accum = found.groups()
    assert int(batch) < 8 and int(batch) * int(accum) == 8
    fix = ["--batch", batch, "--grad-accum", accum]
    code, text = _cli(data, tmp_path / "b", "--device-memory", "3.5MiB", *fix)
    assert code == 0, (fix, text)
    assert "backend arena (one arena)" in text and "measured peak" in text  # plan, then run
    assert "grad_accum" in text  # the sums are in the plan
