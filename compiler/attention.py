"""memfit's attention ops: softmax(q·kᵀ·scale + mask)·v as ONE forward op and ONE backward op.

Spelled out, attention holds [B, H, T, S] scores and probabilities, and its backward saves
them: at 4096 tokens that term dominates a step's memory. As in FlashAttention-2, the forward
saves only its output and each row's log-sum-exp; the backward recomputes the probabilities
block by block from them. Both ops are registered with torch.library, the forward with
autograd, so tracing `F.scaled_dot_product_attention` (compiler/trace.py) records exactly
these two nodes; `passes/attention.py` rewrites the spelled-out pattern into them.

The arguments, in IR order:
- q [B, H, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv]; H a multiple of Hkv (grouped-query:
  query head h reads key/value head h // (H // Hkv); k and v are never repeated in memory);
- segment_ids [B, T] integers or None: a query sees only keys of its own segment (packed
  documents; then S == T);
- causal: key j is visible to query i only if j <= i (top-left aligned, as SDPA's is_causal);
- scale: multiplies q·kᵀ; window: if > 0, key j is visible only if i - j < window;
- softcap: if > 0, scores become softcap·tanh(scores / softcap) (Gemma 2) before masking;
- chunk: query rows per block of the torch reference (its scratch is one block of scores).

The torch implementation here is exact (fp32 scores and sums for fp32 and narrower inputs) and
what the eager and arena backends run; `compiler/codegen/flash_attention.py` is the Triton one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from compiler.ir import Node

FORWARD = "memfit::attention"
BACKWARD = "memfit::attention_backward"
_NEG_INF = float("-inf")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and narrower inputs, else the input's own (fp64)."""
    return torch.promote_types(dtype, torch.float32)


def chunk_rows(seq: int, head_dim: int) -> int:
    """Query rows per block: a block of scores [rows, S] is then about as big as q [T, D]."""
    return min(seq, max(16, 1 << (head_dim - 1).bit_length()))


def _check(q: Tensor, k: Tensor, v: Tensor, segment_ids: Tensor | None) -> None:
    """Shapes the ops accept; a clear error for anything else (also raised while tracing)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention takes 4-d q, k, v, got {q.dim()}, {k.dim()}, {v.dim()}-d")
    (b, h, t, d), (bk, hkv, s, dk) = q.shape, k.shape
    if bk != b or dk != d or v.shape[:3] != k.shape[:3] or hkv == 0 or h % hkv:
        raise ValueError(
            f"attention shapes do not match: q {list(q.shape)}, k {list(k.shape)},"
            f" v {list(v.shape)} (k and v need q's batch and head dim, and H a multiple of Hkv)"
        )
    if segment_ids is not None and (tuple(segment_ids.shape) != (b, t) or s != t):
        raise ValueError(
            f"segment ids must be [batch, seq] = [{b}, {t}] for self-attention, got"
            f" {list(segment_ids.shape)} with {s} keys"
        )


def key_range(t0: int, t1: int, keys: int, causal: bool, window: int) -> tuple[int, int]:
    """The keys any query row in [t0, t1) may see: the rest of the row is masked."""
    hi = min(keys, t1) if causal else keys
    lo = max(0, t0 - window + 1) if window > 0 else 0
    return lo, max(lo, hi)


def _visible(
    span: tuple[int, int, int, int],
    seg: Tensor | None,
    causal: bool,
    window: int,
    device: torch.device,
) -> Tensor | None:
    """Bool [B or 1, 1, 1, t1-t0, hi-lo]: which (query, key) pairs of the block of queries
    t0..t1 and keys lo..hi (`span`) are visible; None if all are."""
    t0, t1, lo, hi = span
    i = torch.arange(t0, t1, device=device)[:, None]
    j = torch.arange(lo, hi, device=device)[None, :]
    mask = None
    if causal:
        mask = j <= i
    if window > 0:
        mask = (i - j < window) if mask is None else mask & (i - j < window)
    if seg is not None:
        same = seg[:, t0:t1, None] == seg[:, None, lo:hi]
        mask = same if mask is None else same & mask
    return None if mask is None else mask.view(-1, 1, 1, t1 - t0, hi - lo)


def _scores(
    qb: Tensor, kb: Tensor, scale: float, softcap: float, mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Scores of a block [B, Hkv, rep, C, S'] in the accumulation dtype, masked with -inf, and
    for soft-capping the tanh (its derivative is 1 - tanh²)."""
    b, hkv, rep, c, _ = qb.shape
    s = (qb.flatten(2, 3) @ kb.transpose(-1, -2)).unflatten(2, (rep, c)).mul_(scale)
    capped = None
    if softcap > 0:
        capped = s.div_(softcap).tanh_()
        s = capped * softcap
    if mask is not None:
        s = s.masked_fill_(~mask, _NEG_INF)
    return s, capped


def _finite(lse: Tensor) -> Tensor:
    """A row with no visible key has lse -inf; its probabilities must be 0, not nan."""
    return lse.masked_fill(lse == _NEG_INF, 0.0)


@torch.library.custom_op(FORWARD, mutates_args=())
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_ids: Tensor | None,
    causal: bool,
    scale: float,
    window: int,
    softcap: float,
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """(out [B, H, T, Dv] in q's dtype, lse [B, H, T] in the accumulation dtype)."""
    out, lse = _forward_outputs(q, k, v, segment_ids)
    return forward_into(q, k, v, segment_ids, causal, scale, window, softcap, chunk, out, lse)


def _forward_outputs(
    q: Tensor, k: Tensor, v: Tensor, segment_ids: Tensor | None
) -> tuple[Tensor, Tensor]:
    _check(q, k, v, segment_ids)
    b, h, t, _ = q.shape
    out = q.new_empty(b, h, t, v.shape[-1])  # contiguous, as the arena's planned view
    return out, q.new_empty(b, h, t, dtype=accumulation_dtype(q.dtype))


def forward_into(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_ids: Tensor | None,
    causal: bool,
    scale: float,
    window: int,
    softcap: float,
    chunk: int,
    out: Tensor,
    lse: Tensor,
) -> tuple[Tensor, Tensor]:
    """The forward, block of query rows by block, written into `out` and `lse` (the arena
    passes its planned views): one block of scores and probabilities is alive at a time."""
    hkv, keys = k.shape[1], k.shape[2]
    acc = accumulation_dtype(q.dtype)
    kf, vf = k.to(acc), v.to(acc)
    q5, o5, l5 = (x.unflatten(1, (hkv, -1)) for x in (q, out, lse))
    for t0 in range(0, q.shape[2], chunk):
        t1 = min(t0 + chunk, q.shape[2])
        lo, hi = key_range(t0, t1, keys, causal, window)
        mask = _visible((t0, t1, lo, hi), segment_ids, causal, window, q.device)
        s, _ = _scores(q5[:, :, :, t0:t1].to(acc), kf[:, :, lo:hi], scale, softcap, mask)
        rows = torch.logsumexp(s, dim=-1)
        p = s.sub_(_finite(rows)[..., None]).exp_()
        o5[:, :, :, t0:t1] = (p.flatten(2, 3) @ vf[:, :, lo:hi]).view(p.shape[:-1] + (-1,))
        l5[:, :, :, t0:t1] = rows
        del s, p  # else this block stays alive while the next one is computed
    return out, lse


@attention.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, segment_ids: Tensor | None, *options: object
) -> tuple[Tensor, Tensor]:
    return _forward_outputs(q, k, v, segment_ids)


@torch.library.custom_op(BACKWARD, mutates_args=())
def attention_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    segment_ids: Tensor | None,
    causal: bool,
    scale: float,
    window: int,
    softcap: float,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) given grad = d loss / d out, from the forward's out and lse."""
    dq, dk, dv = _gradients(q, k, v)
    args = (grad, q, k, v, out, lse, segment_ids, causal, scale, window, softcap, chunk)
    return backward_into(*args, dq, dk, dv)


def backward_into(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    segment_ids: Tensor | None,
    causal: bool,
    scale: float,
    window: int,
    softcap: float,
    chunk: int,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """FlashAttention-2's backward over blocks of query rows, into dq, dk, dv: per block
    P = exp(S − lse), dV += Pᵀ·dO, dS = P∘(dO·Vᵀ − rowsum(dO∘O)), dQ = dS·K, dK += dSᵀ·Q (times
    scale, and tanh' under soft-capping). dk and dv are summed in place unless narrower than
    the accumulation dtype (then in an fp32 sum, counted as scratch)."""
    hkv, keys = k.shape[1], k.shape[2]
    acc = accumulation_dtype(q.dtype)
    kf, vf = k.to(acc), v.to(acc)
    dks = dk.zero_() if dk.dtype == acc else torch.zeros_like(dk, dtype=acc)
    dvs = dv.zero_() if dv.dtype == acc else torch.zeros_like(dv, dtype=acc)
    delta = (grad.to(acc) * out.to(acc)).sum(-1)  # [B, H, T]
    q5, g5, dq5, l5, d5 = (x.unflatten(1, (hkv, -1)) for x in (q, grad, dq, lse, delta))
    for t0 in range(0, q.shape[2], chunk):
        t1 = min(t0 + chunk, q.shape[2])
        lo, hi = key_range(t0, t1, keys, causal, window)
        mask = _visible((t0, t1, lo, hi), segment_ids, causal, window, q.device)
        qb, gb = q5[:, :, :, t0:t1].to(acc), g5[:, :, :, t0:t1].to(acc)
        s, capped = _scores(qb, kf[:, :, lo:hi], scale, softcap, mask)
        p = s.sub_(_finite(l5[:, :, :, t0:t1])[..., None]).exp_()
        flat_p, flat_g, flat_q = p.flatten(2, 3), gb.flatten(2, 3), qb.flatten(2, 3)
        dvs[:, :, lo:hi] += flat_p.transpose(-1, -2) @ flat_g
        dp = (flat_g @ vf[:, :, lo:hi].transpose(-1, -2)).view(p.shape)
        ds = dp.sub_(d5[:, :, :, t0:t1, None]).mul_(p)
        if capped is not None:
            ds.mul_(1 - capped * capped)
        flat_ds = ds.mul_(scale).flatten(2, 3)
        dq5[:, :, :, t0:t1] = (flat_ds @ kf[:, :, lo:hi]).view(qb.shape)
        dks[:, :, lo:hi] += flat_ds.transpose(-1, -2) @ flat_q
        del s, p, dp, ds, capped  # else this block stays alive while the next one is computed
    if dks is not dk:
        dk.copy_(dks)
    if dvs is not dv:
        dv.copy_(dvs)
    return dq, dk, dv


@attention_backward.register_fake
def _(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, *rest: object
) -> tuple[Tensor, Tensor, Tensor]:
    return _gradients(q, k, v)


def _gradients(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Contiguous, whatever the inputs' strides: the arena's planned views are, and the trace
    must record the layout every backend gives."""
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


def _setup_context(ctx: object, inputs: tuple, output: tuple) -> None:
    q, k, v, segment_ids, *options = inputs
    ctx.save_for_backward(q, k, v, *output)  # type: ignore[attr-defined]
    ctx.segment_ids, ctx.options = segment_ids, options  # type: ignore[attr-defined]


def _backward(ctx: object, grad: Tensor, _grad_lse: Tensor | None) -> tuple:
    q, k, v, out, lse = ctx.saved_tensors  # type: ignore[attr-defined]
    seg, options = ctx.segment_ids, ctx.options  # type: ignore[attr-defined]
    dq, dk, dv = attention_backward(grad, q, k, v, out, lse, seg, *options)
    return dq, dk, dv, None, None, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)


OPS: dict[str, torch._ops.OpOverload] = {
    FORWARD: torch.ops.memfit.attention.default,
    BACKWARD: torch.ops.memfit.attention_backward.default,
}
# The ops' computations writing into given outputs: the arena's form of them (their out=).
INTO: dict[str, Callable[..., object]] = {FORWARD: forward_into, BACKWARD: backward_into}
LSE_ARG = 5  # the backward's lse: it stays in the accumulation dtype under bf16/fp16


def _options(node: Node) -> tuple[Tensor | None, bool, float, int, float, int]:
    first = 3 if node.op == FORWARD else 6
    return node.args[first : first + 6]


def visible_pairs(queries: int, keys: int, causal: bool, window: int) -> int:
    """(query, key) pairs the masks leave visible (segments ignored: an upper bound)."""
    i = np.arange(queries)
    hi = np.minimum(i + 1, keys) if causal else np.full(queries, keys)
    lo = np.maximum(i - window + 1, 0) if window > 0 else np.zeros(queries, dtype=np.int64)
    return int(np.maximum(hi - lo, 0).sum())


def flops(node: Node) -> int:
    """The forward is two matmuls over the visible pairs (q·kᵀ and p·v); the backward
    recomputes q·kᵀ and adds dv, dp, dq and dk: 5 matmuls, 2.5× the forward."""
    q, k, v = node.args[:3] if node.op == FORWARD else node.args[1:4]
    _, causal, _, window, _, _ = _options(node)
    pairs = q.shape[0] * q.shape[1] * visible_pairs(q.shape[2], k.shape[2], causal, window)
    forward = 2 * pairs * (q.shape[3] + v.shape[3])
    return forward if node.op == FORWARD else forward * 5 // 2


def workspace_bytes(node: Node) -> int:
    """Scratch a call holds besides its inputs and outputs: per block of query rows the fp32
    scores and probabilities (the backward also dp/ds and the rows' dO·O sums), and the fp32
    copies of k and v (the backward also their fp32 gradient sums) for narrower inputs."""
    q, k, v = node.args[:3] if node.op == FORWARD else node.args[1:4]
    chunk = node.args[-1]
    acc = accumulation_dtype(q.dtype)
    b, h, t, _ = q.shape
    block = b * h * min(chunk, t) * k.shape[2] * acc.itemsize
    narrow = (k.numel + v.numel) * acc.itemsize if k.dtype != acc else 0
    if node.op == FORWARD:
        return 2 * block + narrow
    return 3 * block + b * h * t * acc.itemsize + 2 * narrow


def sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    window: int = 0,
    segment_ids: Tensor | None = None,
) -> Tensor:
    """`F.scaled_dot_product_attention` as memfit's op (no attn_mask, no dropout; `window` and
    `segment_ids` from a recognised mask): any leading batch dims are flattened into one."""
    del attn_mask, dropout_p, enable_gqa  # checked by the caller (compiler/trace.py)
    lead = query.shape[:-3]
    q, k, v = (x.reshape(-1, *x.shape[-3:]) for x in (query, key, value))
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    chunk = chunk_rows(q.shape[2], d)
    out, _ = attention(q, k, v, segment_ids, is_causal, scale, window, 0.0, chunk)
    return out.view(*lead, *out.shape[1:])


def mask_options(mask: Tensor, queries: int, keys: int) -> tuple[bool, int] | None:
    """(causal, window) of a concrete `attn_mask` (bool: True keeps; float: 0 keeps, -inf or
    the dtype's lowest drops) if it is the same for every batch and head and one of: no mask,
    causal, causal within a window; else None."""
    if mask.dtype != torch.bool:
        dropped = mask <= torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | dropped).all()):
            return None
        mask = ~dropped
    mask = mask.broadcast_to(*mask.shape[:-2], queries, keys).reshape(-1, queries, keys)
    if not bool((mask == mask[:1]).all()):
        return None
    first = mask[0]
    if bool(first.all()):
        return False, 0
    rows = torch.arange(queries)
    lowest = torch.where(first, torch.arange(keys), keys).amin(dim=1)
    window = int((rows - lowest).amax()) + 1
    for option in ((True, 0), (True, window)):
        expected = _visible((0, queries, 0, keys), None, *option, first.device)
        if expected is not None and torch.equal(expected.view(queries, keys), first):
            return option
    return None


def spelled_out(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """`F.scaled_dot_product_attention` with an explicit mask, in plain ops (O(T²) like the
    mask itself): a bool mask keeps the True pairs, a float mask is added to the scores."""
    del dropout_p, enable_gqa
    rep = query.shape[-3] // key.shape[-3]
    if rep > 1:
        key, value = (x.repeat_interleave(rep, -3) for x in (key, value))
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    s = (query @ key.transpose(-1, -2)) * scale
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        s = s.masked_fill(attn_mask.logical_not(), _NEG_INF)
    elif attn_mask is not None:
        s = s + attn_mask
    if is_causal:
        t, keys = s.shape[-2:]
        s = s.masked_fill(torch.ones(t, keys, dtype=torch.bool, device=s.device).triu(1), _NEG_INF)
    return torch.softmax(s, dim=-1) @ value


def math_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_ids: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> Tensor:
    """The O(T²) definition, for tests: every score materialised, k and v repeated."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    span = (0, q.shape[2], 0, k.shape[2])
    mask = _visible(span, segment_ids, causal, window, q.device)
    if mask is not None:
        s = s.masked_fill(~mask.squeeze(2), _NEG_INF)
    return torch.softmax(s, dim=-1) @ v
