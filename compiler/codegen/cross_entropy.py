"""Fused linear + cross-entropy on the triton backend: cuBLAS chunk matmuls, Triton row kernels.

The logits of one chunk of rows are the only vocabulary-sized buffer. Per chunk, the forward
kernel streams each row once (online max and sum of exponentials) for its logsumexp and picks
the target's log-probability; the backward kernel streams the recomputed logits twice, for
the logsumexp and then to turn them into d logits = grad · (onehot(target) − softmax) in
place, which two matmuls turn into the hidden and weight gradients. Rows of any length work:
the kernels loop over the vocabulary in blocks. The torch reference is `compiler.custom_ops`
(the same chunking, in ATen); tests compare both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from compiler.custom_ops import chunked_backward

BLOCK = 1024


@triton.jit
def _row_logsumexp(base, n_cols, BLOCK: tl.constexpr):
    """logsumexp of one row in one pass: a running max and a rescaled running sum."""
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
    return running_max + tl.log(running_sum)


@triton.jit
def cross_entropy_forward_kernel(logits, index, picked, n_cols, BLOCK: tl.constexpr):
    """One program per row: the target's log-probability."""
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * n_cols
    row_lse = _row_logsumexp(base, n_cols, BLOCK)
    target = tl.load(index + row)
    tl.store(picked + row, tl.load(base + target).to(tl.float32) - row_lse)


@triton.jit
def cross_entropy_backward_kernel(logits, index, grad, n_cols, BLOCK: tl.constexpr):
    """One program per row, in place: logits → grad · (onehot(target) − softmax)."""
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * n_cols
    cols = tl.arange(0, BLOCK)
    target = tl.load(index + row)
    scale = tl.load(grad + row).to(tl.float32)
    row_lse = _row_logsumexp(base, n_cols, BLOCK)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        probs = tl.exp(tl.load(base + start + cols, mask, other=0.0).to(tl.float32) - row_lse)
        onehot = tl.where(start + cols == target, 1.0, 0.0)
        tl.store(base + start + cols, scale * (onehot - probs), mask)


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, index: Tensor, chunk: int, picked: Tensor | None = None
) -> Tensor:
    """Same contract as `memfit::linear_cross_entropy` (compiler/custom_ops.py), written into
    `picked` if given."""
    picked = hidden.new_empty(hidden.shape[0], 1) if picked is None else picked
    for start in range(0, hidden.shape[0], chunk):
        end = min(start + chunk, hidden.shape[0])
        logits = hidden[start:end] @ weight.T
        cross_entropy_forward_kernel[(end - start,)](
            logits, index[start:end], picked[start:end], weight.shape[0], BLOCK
        )
        del logits  # else this chunk stays alive while the next one is computed
    return picked


def linear_cross_entropy_backward(
    hidden: Tensor,
    weight: Tensor,
    index: Tensor,
    grad: Tensor,
    chunk: int,
    grad_hidden: Tensor | None = None,
    grad_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Same contract as `memfit::linear_cross_entropy_backward`, written into the given
    gradients if any."""

    def dlogits(rows: Tensor, start: int, end: int) -> Tensor:
        logits = rows @ weight.T
        cross_entropy_backward_kernel[(end - start,)](
            logits, index[start:end], grad[start:end], weight.shape[0], BLOCK
        )
        return logits

    grad_hidden = torch.empty_like(hidden) if grad_hidden is None else grad_hidden
    grad_weight = torch.empty_like(weight) if grad_weight is None else grad_weight
    return chunked_backward(hidden, weight, chunk, dlogits, grad_hidden, grad_weight)
