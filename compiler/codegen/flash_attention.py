"""Flash attention on the triton backend: memfit's attention ops as FlashAttention-2 kernels.

Same contract as `memfit::attention` / `memfit::attention_backward` (compiler/attention.py):
causal, sliding window, logit soft-capping, grouped-query heads (a query head reads key/value
head h // (H // Hkv) through its pointer: k and v are never repeated) and segment ids. Scores
are computed in fp32 (`tl.dot` with fp32 accumulation; IEEE fp32 products for fp32 inputs),
probabilities are cast to the input dtype for the p·v and gradient products as FlashAttention
does for bf16/fp16.

- forward: one program per (block of query rows, batch·head); an online softmax over key
  blocks, skipping blocks the causal/window masks hide; writes the output and the row lse.
- backward: rowsum(dO∘O) in ATen (O(T)), then two kernels with no atomics: one program per
  (key block, batch·kv head) accumulates dk and dv over every query head of its group, one per
  (query block, batch·head) accumulates dq. Each recomputes p = exp(s − lse) blockwise.

Block sizes are 64 on a GPU; 16 in the interpreter (tests run tiny shapes under
TRITON_INTERPRET=1). The torch reference in compiler/attention.py is what tests compare to.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from compiler.attention import accumulation_dtype


@triton.jit
def _tanh(x):
    """tanh from exp (saturates to ±1 where exp overflows or underflows)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _tile(base, rows, row_stride, n_rows, cols, n_cols):
    """A [rows, cols] tile of a row-strided matrix, zero outside n_rows × n_cols."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(base + rows[:, None] * row_stride + cols[None, :], mask, other=0.0)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a·b with fp32 accumulation; UPCAST multiplies the (already rounded) operands in fp32:
    the interpreter's bf16 dot is wrong, and fp32 products of bf16 values are exact."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _scores(
    q, k, offs_m, offs_n, T, S, seg_q, seg_base, scale, softcap,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr,
    SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Masked fp32 scores of a (query block, key block) and the soft-cap tanh."""
    s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale
    capped = s
    if SOFTCAP:
        capped = _tanh(s / softcap)
        s = capped * softcap
    keep = (offs_n[None, :] < S) & (offs_m[:, None] < T)
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    if WINDOW > 0:
        keep = keep & (offs_m[:, None] - offs_n[None, :] < WINDOW)
    if HAS_SEG:
        seg_k = tl.load(seg_base + offs_n, offs_n < S, other=-1)
        keep = keep & (seg_q[:, None] == seg_k[None, :])
    return tl.where(keep, s, float("-inf")), capped


@triton.jit
def _key_range(start_m, T, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr):  # fmt: skip
    """Key blocks a query block may see (whole blocks, so the start is a block multiple)."""
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (start_m + 1) * BLOCK_M)
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(0, start_m * BLOCK_M - WINDOW + 1) // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def _attention_forward(
    Q, K, V, SEG, OUT, LSE,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t,
    H, T, S, D, DV, REP, scale, softcap,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // REP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _tile(Q + b * sq_b + h * sq_h, offs_m, sq_t, T, offs_d, D)
    seg_q = offs_m
    if HAS_SEG:
        seg_q = tl.load(SEG + b * T + offs_m, offs_m < T, other=-2)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo, hi = _key_range(start_m, T, S, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _tile(K + b * sk_b + hk * sk_h, offs_n, sk_t, S, offs_d, D)
        s, _ = _scores(q, k, offs_m, offs_n, T, S, seg_q, SEG + b * T, scale, softcap,
                       CAUSAL, WINDOW, HAS_SEG, SOFTCAP, PRECISION, UPCAST)  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(V + b * sv_b + hk * sv_h, offs_n, sv_t, S, offs_dv, DV)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), tl.where(empty, 0.0, m_i) + tl.log(l_i))
    o_ptr = OUT + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_dv[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), (offs_m[:, None] < T) & (offs_dv[None, :] < DV))
    tl.store(LSE + bh * T + offs_m, lse, offs_m < T)


@triton.jit
def _rows(LSE, DELTA, SEG, bh, b, T, offs_m, HAS_SEG: tl.constexpr):
    """A query block's lse (0 for rows that see no key: their p is 0 anyway), rowsum(dO∘O)
    and segment ids."""
    rows = offs_m < T
    lse = tl.load(LSE + bh * T + offs_m, rows, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, rows, other=0.0)
    seg_q = offs_m
    if HAS_SEG:
        seg_q = tl.load(SEG + b * T + offs_m, rows, other=-2)
    return tl.where(lse == float("-inf"), 0.0, lse), delta, seg_q


@triton.jit
def _dscores(p, capped, do, v, delta, scale, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
             UPCAST: tl.constexpr):  # fmt: skip
    """d scores·scale of a block: P∘(dO·Vᵀ − rowsum(dO∘O)), times tanh' under soft-capping."""
    ds = p * (_dot(do, tl.trans(v), PRECISION, UPCAST) - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - capped * capped)
    return ds * scale


@triton.jit
def _attention_backward_dkdv(
    Q, K, V, SEG, DO, LSE, DELTA, DK, DV_OUT,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sd_b, sd_h, sd_t,
    sdk_b, sdk_h, sdk_t, sdv_b, sdv_h, sdv_t,
    H, HKV, T, S, D, DV, REP, scale, softcap,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    start_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b, hk = bhk // HKV, bhk % HKV
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _tile(K + b * sk_b + hk * sk_h, offs_n, sk_t, S, offs_d, D)
    v = _tile(V + b * sv_b + hk * sv_h, offs_n, sv_t, S, offs_dv, DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo = 0
    if CAUSAL:
        lo = start_n * BLOCK_N // BLOCK_M * BLOCK_M
    hi = T
    if WINDOW > 0:
        hi = tl.minimum(T, (start_n + 1) * BLOCK_N + WINDOW - 1)
    for r in range(0, REP):
        h = hk * REP + r
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _tile(Q + b * sq_b + h * sq_h, offs_m, sq_t, T, offs_d, D)
            do = _tile(DO + b * sd_b + h * sd_h, offs_m, sd_t, T, offs_dv, DV)
            lse, delta, seg_q = _rows(LSE, DELTA, SEG, b * H + h, b, T, offs_m, HAS_SEG)
            s, capped = _scores(q, k, offs_m, offs_n, T, S, seg_q, SEG + b * T, scale, softcap,
                                CAUSAL, WINDOW, HAS_SEG, SOFTCAP, PRECISION, UPCAST)  # fmt: skip
            p = tl.exp(s - lse[:, None])
            dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
            ds = _dscores(p, capped, do, v, delta, scale, SOFTCAP, PRECISION, UPCAST)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)
    keys = offs_n[:, None] < S
    dk_ptr = DK + b * sdk_b + hk * sdk_h + offs_n[:, None] * sdk_t + offs_d[None, :]
    tl.store(dk_ptr, dk.to(DK.dtype.element_ty), keys & (offs_d[None, :] < D))
    dv_ptr = DV_OUT + b * sdv_b + hk * sdv_h + offs_n[:, None] * sdv_t + offs_dv[None, :]
    tl.store(dv_ptr, dv.to(DV_OUT.dtype.element_ty), keys & (offs_dv[None, :] < DV))


@triton.jit
def _attention_backward_dq(
    Q, K, V, SEG, DO, LSE, DELTA, DQ,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sd_b, sd_h, sd_t,
    sdq_b, sdq_h, sdq_t,
    H, T, S, D, DV, REP, scale, softcap,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // REP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m < T
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _tile(Q + b * sq_b + h * sq_h, offs_m, sq_t, T, offs_d, D)
    do = _tile(DO + b * sd_b + h * sd_h, offs_m, sd_t, T, offs_dv, DV)
    lse, delta, seg_q = _rows(LSE, DELTA, SEG, bh, b, T, offs_m, HAS_SEG)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m, T, S, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _tile(K + b * sk_b + hk * sk_h, offs_n, sk_t, S, offs_d, D)
        v = _tile(V + b * sv_b + hk * sv_h, offs_n, sv_t, S, offs_dv, DV)
        s, capped = _scores(q, k, offs_m, offs_n, T, S, seg_q, SEG + b * T, scale, softcap,
                            CAUSAL, WINDOW, HAS_SEG, SOFTCAP, PRECISION, UPCAST)  # fmt: skip
        p = tl.exp(s - lse[:, None])
        ds = _dscores(p, capped, do, v, delta, scale, SOFTCAP, PRECISION, UPCAST)
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
    dq_ptr = DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_t + offs_d[None, :]
    tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), rows[:, None] & (offs_d[None, :] < D))


def _launch_options(
    q: Tensor, k: Tensor, v: Tensor, segment_ids: Tensor | None, causal: bool, window: int,
    softcap: float,
) -> tuple[dict, Tensor]:  # fmt: skip
    """Constexprs and block sizes shared by the three kernels, and the segment ids as int32."""
    block = 16 if q.device.type == "cpu" else 64
    options = {
        "CAUSAL": causal,
        "WINDOW": window,
        "HAS_SEG": segment_ids is not None,
        "SOFTCAP": softcap > 0,
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "UPCAST": q.device.type == "cpu" and q.dtype == torch.bfloat16,
        "BLOCK_M": block,
        "BLOCK_N": block,
        "BLOCK_D": max(16, triton.next_power_of_2(q.shape[-1])),
        "BLOCK_DV": max(16, triton.next_power_of_2(v.shape[-1])),
    }
    seg = q.new_zeros(1, dtype=torch.int32) if segment_ids is None else segment_ids
    return options, seg.to(torch.int32).contiguous()


def _strides(x: Tensor) -> tuple[int, int, int]:
    """Batch, head and row strides; the last dim must be dense (a copy otherwise)."""
    return x.stride(0), x.stride(1), x.stride(2)


def _dense_rows(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def attention(
    q: Tensor, k: Tensor, v: Tensor, segment_ids: Tensor | None, causal: bool, scale: float,
    window: int, softcap: float, chunk: int, out: Tensor | None = None, lse: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Same contract as `memfit::attention`, written into `out` and `lse` if given (`chunk`
    belongs to the torch reference; the kernel's blocks are its own)."""
    del chunk
    q, k, v = (_dense_rows(x) for x in (q, k, v))
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    out = q.new_empty(b, h, t, v.shape[-1]) if out is None else out
    lse = q.new_empty(b, h, t, dtype=accumulation_dtype(q.dtype)) if lse is None else lse
    options, seg = _launch_options(q, k, v, segment_ids, causal, window, softcap)
    grid = (triton.cdiv(t, options["BLOCK_M"]), b * h)
    _attention_forward[grid](
        q, k, v, seg, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        h, t, s, d, v.shape[-1], h // hkv, scale, softcap or 1.0, **options,
    )  # fmt: skip
    return out, lse


def attention_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    segment_ids: Tensor | None, causal: bool, scale: float, window: int, softcap: float,
    chunk: int, dq: Tensor | None = None, dk: Tensor | None = None, dv: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Same contract as `memfit::attention_backward`, written into dq, dk, dv if given."""
    del chunk
    grad, q, k, v = (_dense_rows(x) for x in (grad, q, k, v))
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    delta = (grad.to(lse.dtype) * out.to(lse.dtype)).sum(-1).contiguous()
    lse = lse.contiguous()
    options, seg = _launch_options(q, k, v, segment_ids, causal, window, softcap)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad))
    sizes = (t, s, d, v.shape[-1], h // hkv, scale, softcap or 1.0)
    _attention_backward_dkdv[(triton.cdiv(s, options["BLOCK_N"]), b * hkv)](
        q, k, v, seg, grad, lse, delta, dk, dv, *common, *_strides(dk), *_strides(dv),
        h, hkv, *sizes, **options,
    )  # fmt: skip
    _attention_backward_dq[(triton.cdiv(t, options["BLOCK_M"]), b * h)](
        q, k, v, seg, grad, lse, delta, dq, *common, *_strides(dq), h, *sizes, **options
    )  # fmt: skip
    return dq, dk, dv
