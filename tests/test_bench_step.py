"""The GPU step benchmark's bookkeeping, checked on the CPU: kernel classes, the time split
and the FLOP count behind MFU (the benchmark itself needs a device; its --dry-run is slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from bench_step_gpu import CLASSES, classify, model_flops, time_split  # noqa: E402


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", "matmul"),
        ("aten::mm", "matmul"),
        ("flash_fwd_kernel", "attention"),
        ("pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel", "attention"),
        ("void at::native::(anonymous namespace)::fused_adamw_kernel", "optimizer"),
        ("multi_tensor_apply_kernel", "optimizer"),
        ("triton_per_fused_native_layer_norm_0", "pointwise/row"),
        ("row_softmax_mul_where", "pointwise/row"),
    ],
)
def test_kernel_classes(name: str, expected: str) -> None:
    assert classify(name) == expected


def test_memfit_optimizer_kernels_are_named_by_the_graph() -> None:
    assert classify("pointwise_mul_add_sqrt", frozenset({"pointwise_mul_add_sqrt"})) == "optimizer"
    assert classify("pointwise_mul_add_sqrt") == "pointwise/row"


def test_time_split_counts_overlap_once_and_the_rest_as_gaps() -> None:
    kernels = [("gemm", 0.0, 400.0), ("flash_fwd", 300.0, 600.0), ("adam", 800.0, 900.0)]
    split = time_split(kernels, step_us=1000.0, optimizer=frozenset())
    assert set(split) == set(CLASSES)
    assert split["matmul"] == pytest.approx(0.4)
    assert split["attention"] == pytest.approx(0.3)
    assert split["optimizer"] == pytest.approx(0.1)
    assert split["gaps"] == pytest.approx(0.3)  # 600-800 and 900-1000


def test_model_flops_are_at_least_six_per_parameter_and_token() -> None:
    """Forward + backward of a decoder: 6 FLOPs per matmul weight per token, plus attention."""
    batch, seq = 2, 16
    flops = model_flops("gpt2-tiny", batch, seq)
    d, layers, vocab = 64, 2, 256
    matmul_weights = layers * 12 * d * d + vocab * d
    assert 6 * matmul_weights * batch * seq <= flops <= 1.5 * 6 * matmul_weights * batch * seq


@pytest.mark.slow
def test_dry_run_prints_every_system(tmp_path: Path) -> None:
    script = Path(__file__).parents[1] / "benchmarks" / "bench_step_gpu.py"
    out = tmp_path / "step"
    cmd = [sys.executable, str(script), "--dry-run", "--systems", "eager,memfit", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=900)
    text = out.with_suffix(".txt").read_text()
    assert "failed" not in text
    assert text.count("eager") == 2 and text.count("memfit") == 2
