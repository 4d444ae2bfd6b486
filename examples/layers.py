"""Pieces both example decoders share, written so make_fx sees plain aten ops.

Attention calls F.scaled_dot_product_attention: memfit traces it as one op whose saved state
is the output and the row log-sum-exp (compiler/attention.py), so no [B, H, T, T] scores are
held; eager PyTorch runs its own fused kernels, the reference the compiled step is checked
against.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def split_heads(x: Tensor, n_head: int) -> Tensor:
    """[B, T, H * D] -> [B, H, T, D]."""
    return x.unflatten(-1, (n_head, -1)).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, H, T, D] -> [B, T, H * D]."""
    return x.transpose(1, 2).flatten(2)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, segments: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / sqrt(D), future masked out) v for q [B, H, T, D] and k, v [B, Hkv, T, D]
    (grouped-query when Hkv < H: k and v are not repeated). With `segments` [B, T] a query
    sees only earlier keys of its own document, through a [B, 1, T, T] boolean mask."""
    gqa = k.shape[1] != q.shape[1]
    if segments is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    t = q.shape[2]
    past = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    mask = (segments[:, None, :, None] == segments[:, None, None, :]) & past
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def documents(idx: Tensor, eos: int) -> tuple[Tensor, Tensor]:
    """Segment ids and positions [B, T] of documents packed into rows of token ids, each ending
    with `eos`: a document starts at 0 and after each eos; positions restart at each start.
    Plain ops (cumsum, scatter_add, gather): traced into the graph from the tokens alone."""
    b, t = idx.shape
    first = torch.ones(b, 1, dtype=torch.bool, device=idx.device)
    starts = torch.cat([first, idx[:, :-1] == eos], dim=1).long()
    segments = starts.cumsum(1) - 1
    index = torch.arange(t, device=idx.device).expand(b, t)
    start_of = torch.zeros_like(segments).scatter_add(1, segments, index * starts)
    return segments, index - start_of.gather(1, segments)


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 / Llama init for one module: N(0, std) Linear and Embedding weights, zero biases.

    Meant for `model.apply`; norms keep their default ones/zeros.
    """
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
