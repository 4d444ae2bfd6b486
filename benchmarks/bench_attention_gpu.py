"""Attention forward+backward throughput: memfit's flash-attention Triton kernels against
F.scaled_dot_product_attention's flash backend (bf16, causal), head dim 64 and 128, T from
1024 to 8192 at a fixed 16k tokens per batch.

TFLOP/s count the causal half of the work: forward 2 matmuls, backward 5 (2.5×), i.e.
3.5 · 4 · B · H · T² · D / 2 per iteration, the convention of the FlashAttention papers.
Each config is checked against SDPA before it is timed. On a machine without a GPU,
`--dry-run` runs the same loop on tiny CPU shapes in the Triton interpreter (correctness of the
script, no timing worth reading).

    python3 benchmarks/bench_attention_gpu.py            # on a GPU
    python3 benchmarks/bench_attention_gpu.py --dry-run  # anywhere
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from compiler.codegen import flash_attention  # noqa: E402


def _time(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of `fn` after a warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench(batch: int, heads: int, seq: int, dim: int, device: str, repeats: int) -> dict:
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, g = (
        torch.randn(batch, heads, seq, dim, device=device, dtype=dtype, generator=gen)
        for _ in range(4)
    )
    scale = dim**-0.5

    def memfit() -> tuple:
        out, lse = flash_attention.attention(q, k, v, None, True, scale, 0, 0.0, seq)
        return (out, *flash_attention.attention_backward(
            g, q, k, v, out, lse, None, True, scale, 0, 0.0, seq
        ))  # fmt: skip

    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]

    def sdpa() -> tuple:
        backend = SDPBackend.FLASH_ATTENTION if device == "cuda" else SDPBackend.MATH
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(*leaves, is_causal=True)
            return (out, *torch.autograd.grad(out, leaves, g))

    for name, a, b in zip(("out", "dq", "dk", "dv"), memfit(), sdpa(), strict=True):
        err = (a.float() - b.float()).abs().max().item() / max(1.0, b.float().abs().max().item())
        if err > 2e-2:
            raise SystemExit(f"{name} differs from SDPA by {err:.3g} (relative to its max)")
    flops = 3.5 * 4 * batch * heads * seq * seq * dim / 2
    return {
        name: flops / _time(fn, device, repeats) / 1e12
        for name, fn in (("memfit", memfit), ("sdpa", sdpa))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU shapes, interpreter")
    parser.add_argument("--tokens", type=int, default=16384, help="batch · seq per config")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.dry_run:
        device, configs, repeats = "cpu", [(1, 2, 48, 64), (1, 2, 32, 128)], 1
    elif torch.cuda.is_available():
        device, repeats = "cuda", args.repeats
        configs = [
            (max(1, args.tokens // seq), 2048 // dim, seq, dim)
            for dim in (64, 128)
            for seq in (1024, 2048, 4096, 8192)
        ]
    else:
        raise SystemExit("no CUDA device: run with --dry-run to check the script on CPU")
    print(f"{'B':>3} {'H':>3} {'T':>6} {'D':>4} {'memfit TF/s':>12} {'sdpa TF/s':>10} {'ratio':>6}")
    for b, h, t, d in configs:
        r = bench(b, h, t, d, device, repeats)
        ratio = r["memfit"] / r["sdpa"]
        print(f"{b:3d} {h:3d} {t:6d} {d:4d} {r['memfit']:12.2f} {r['sdpa']:10.2f} {ratio:6.2f}")


if __name__ == "__main__":
    main()
