"""Pieces both example decoders share, written so make_fx sees plain aten ops.

Attention is spelled out (matmul, masked_fill, softmax, matmul) rather than calling
F.scaled_dot_product_attention, so the traced graph exposes the [B, H, T, T] score and
probability tensors that memory planning and rematerialisation have to reason about.
"""

import torch
from torch import Tensor, nn


def causal_mask(block_size: int) -> Tensor:
    """[block_size, block_size] bool, True above the diagonal: the future a query must not see.

    Storing the *future* (not the allowed past) lets forward mask without a logical_not op.
    """
    return torch.ones(block_size, block_size, dtype=torch.bool).triu(1)


def split_heads(x: Tensor, n_head: int) -> Tensor:
    """[B, T, H * D] -> [B, H, T, D]."""
    return x.unflatten(-1, (n_head, -1)).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, H, T, D] -> [B, T, H * D]."""
    return x.transpose(1, 2).flatten(2)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, future: Tensor) -> Tensor:
    """softmax(q kᵀ / sqrt(D), future masked out) v for [B, H, T, D] inputs, future [T, T]."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 / Llama init for one module: N(0, std) Linear and Embedding weights, zero biases.

    Meant for `model.apply`; norms keep their default ones/zeros.
    """
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
