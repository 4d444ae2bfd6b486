"""Fused linear + cross-entropy on the triton backend: cuBLAS chunk matmuls, Triton row kernels.

The logits of one chunk of rows are the only vocabulary-sized buffer. Per chunk, the forward
kernel streams each row once (online max and sum of exponentials) for its logsumexp and picks
the target's log-probability; the backward kernel turns the recomputed logits into
d logits = grad · (onehot(target) − softmax) in place, which two matmuls turn into the hidden
and weight gradients. Rows of any length work: the kernels loop over the vocabulary in blocks.
The torch reference is `compiler.custom_ops` (the same chunking, in ATen); tests compare both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from compiler.custom_ops import accumulation_dtype

BLOCK = 1024


@triton.jit
def cross_entropy_forward_kernel(logits, index, picked, lse, n_cols, BLOCK: tl.constexpr):
    """One program per row: logsumexp of the row, and the target's log-probability."""
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * n_cols
    cols = tl.arange(0, BLOCK)
    running_max = tl.full([], float("-inf"), tl.float32)
    running_sum = tl.full([], 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK):
        x = tl.load(base + start + cols, start + cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
            tl.exp(x - new_max), axis=0
        )
        running_max = new_max
    row_lse = running_max + tl.log(running_sum)
    target = tl.load(index + row)
    tl.store(lse + row, row_lse)
    tl.store(picked + row, tl.load(base + target).to(tl.float32) - row_lse)


@triton.jit
def cross_entropy_backward_kernel(logits, index, grad, lse, n_cols, BLOCK: tl.constexpr):
    """One program per row, in place: logits → grad · (onehot(target) − softmax)."""
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * n_cols
    cols = tl.arange(0, BLOCK)
    target = tl.load(index + row)
    scale = tl.load(grad + row).to(tl.float32)
    row_lse = tl.load(lse + row)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        probs = tl.exp(tl.load(base + start + cols, mask, other=0.0).to(tl.float32) - row_lse)
        onehot = tl.where(start + cols == target, 1.0, 0.0)
        tl.store(base + start + cols, scale * (onehot - probs), mask)


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, index: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """Same contract as `memfit::linear_cross_entropy` (compiler/custom_ops.py)."""
    rows, acc = hidden.shape[0], accumulation_dtype(hidden.dtype)
    picked = hidden.new_empty(rows, 1)
    lse = hidden.new_empty(rows, dtype=acc)
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        logits = hidden[start:end] @ weight.T
        cross_entropy_forward_kernel[(end - start,)](
            logits, index[start:end], picked[start:end], lse[start:end], weight.shape[0], BLOCK
        )
    return picked, lse


def linear_cross_entropy_backward(
    hidden: Tensor, weight: Tensor, index: Tensor, grad: Tensor, lse: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """Same contract as `memfit::linear_cross_entropy_backward`."""
    acc = accumulation_dtype(hidden.dtype)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    for start in range(0, hidden.shape[0], chunk):
        end = min(start + chunk, hidden.shape[0])
        rows = hidden[start:end]
        dlogits = rows @ weight.T
        cross_entropy_backward_kernel[(end - start,)](
            dlogits, index[start:end], grad[start:end], lse[start:end], weight.shape[0], BLOCK
        )
        grad_hidden[start:end] = dlogits @ weight
        grad_weight.addmm_(dlogits.T.to(acc), rows.to(acc))
    return grad_hidden, grad_weight.to(weight.dtype)
