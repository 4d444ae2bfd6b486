"""memfit's own ops: the fused linear + cross-entropy head, registered with torch.library.

The LM head of a 50k-vocabulary model materialises logits [tokens, vocab] in fp32 — 1.6 GB at
8×1024 tokens — plus as many bytes again for log_softmax and for each backward temporary. These
ops never hold more than one chunk of rows of logits: the forward returns the log-probability
picked at each row's target; the backward recomputes each chunk's logits (and their
logsumexp: one more pass over the chunk, no saved activation that a low-precision pass could
round) and turns them into the gradient chunk in place. The torch
implementation below is what the eager backend runs and the reference for the Triton kernels in
`compiler/codegen/cross_entropy.py`; the fake (meta) implementations let the verifier check
shapes. `passes/linear_cross_entropy.py` rewrites the traced loss head into these ops.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from compiler.ir import Node

FORWARD = "memfit::linear_cross_entropy"
BACKWARD = "memfit::linear_cross_entropy_backward"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and narrower inputs (logits of bf16 models are summed in fp32), else fp64."""
    return torch.promote_types(dtype, torch.float32)


def chunk_rows(rows: int, vocab: int, hidden: int) -> int:
    """Rows per chunk so one chunk of logits is about as big as the hidden states (Liger's rule)."""
    per_chunk = math.ceil(rows / math.ceil(vocab / hidden))
    return min(rows, 1 << max(per_chunk - 1, 0).bit_length())


@torch.library.custom_op(FORWARD, mutates_args=())
def linear_cross_entropy(hidden: Tensor, weight: Tensor, index: Tensor, chunk: int) -> Tensor:
    """log_softmax(hidden @ weight.T)[r, index[r]], as [M, 1].

    hidden [M, K], weight [V, K] (nn.Linear layout), index int64 [M, 1].
    """
    return forward_into(hidden, weight, index, chunk, hidden.new_empty(hidden.shape[0], 1))


def forward_into(
    hidden: Tensor, weight: Tensor, index: Tensor, chunk: int, picked: Tensor
) -> Tensor:
    """The forward, written into `picked` (the arena passes its planned buffer)."""
    rows, acc = hidden.shape[0], accumulation_dtype(hidden.dtype)
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        logits = (hidden[start:end] @ weight.T).to(acc)
        lse = torch.logsumexp(logits, dim=1, keepdim=True)
        picked[start:end] = logits.gather(1, index[start:end]) - lse
        del logits, lse  # else this chunk stays alive while the next one is computed
    return picked


@linear_cross_entropy.register_fake
def _(hidden: Tensor, weight: Tensor, index: Tensor, chunk: int) -> Tensor:
    return hidden.new_empty(hidden.shape[0], 1)


@torch.library.custom_op(BACKWARD, mutates_args=())
def linear_cross_entropy_backward(
    hidden: Tensor, weight: Tensor, index: Tensor, grad: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """Gradients of hidden and weight given `grad` [M, 1] = d loss / d picked log-probability.

    d logits = grad · (onehot(index) − softmax(logits)), built chunk by chunk in place.
    """
    outs = torch.empty_like(hidden), torch.empty_like(weight)
    return backward_into(hidden, weight, index, grad, chunk, *outs)


def backward_into(
    hidden: Tensor,
    weight: Tensor,
    index: Tensor,
    grad: Tensor,
    chunk: int,
    grad_hidden: Tensor,
    grad_weight: Tensor,
) -> tuple[Tensor, Tensor]:
    """The backward, written into `grad_hidden` and `grad_weight`."""
    acc = accumulation_dtype(hidden.dtype)

    def dlogits(rows: Tensor, start: int, end: int) -> Tensor:
        logits = (rows @ weight.T).to(acc)
        probs = logits.sub_(torch.logsumexp(logits, dim=1, keepdim=True)).exp_()
        probs.scatter_add_(1, index[start:end], probs.new_full((end - start, 1), -1.0))
        return probs.mul_(-grad[start:end].to(acc)).to(hidden.dtype)

    return chunked_backward(hidden, weight, chunk, dlogits, grad_hidden, grad_weight)


def chunked_backward(
    hidden: Tensor,
    weight: Tensor,
    chunk: int,
    dlogits: Callable[[Tensor, int, int], Tensor],
    grad_hidden: Tensor,
    grad_weight: Tensor,
) -> tuple[Tensor, Tensor]:
    """The backward's loop over chunks of rows, for any way of making a chunk's d logits
    (`dlogits(rows, start, end)`), into the given gradients: one chunk of logits is alive at a
    time, and the weight's gradient is summed in place unless it is narrower than fp32."""
    acc = accumulation_dtype(hidden.dtype)
    wide = grad_weight.dtype == acc
    summed = grad_weight.zero_() if wide else torch.zeros_like(grad_weight, dtype=acc)
    for start in range(0, hidden.shape[0], chunk):
        end = min(start + chunk, hidden.shape[0])
        rows = hidden[start:end]
        d = dlogits(rows, start, end)
        torch.mm(d, weight, out=grad_hidden[start:end])
        summed.addmm_(d.T.to(acc), rows.to(acc))
        del d  # else this chunk stays alive while the next one is computed
    if not wide:
        grad_weight.copy_(summed)
    return grad_hidden, grad_weight


@linear_cross_entropy_backward.register_fake
def _(
    hidden: Tensor, weight: Tensor, index: Tensor, grad: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(hidden), torch.empty_like(weight)


OPS: dict[str, torch._ops.OpOverload] = {
    FORWARD: torch.ops.memfit.linear_cross_entropy.default,
    BACKWARD: torch.ops.memfit.linear_cross_entropy_backward.default,
}


def flops(node: Node) -> int:
    """The forward is one logits matmul; the backward recomputes it and adds two more."""
    hidden, weight = node.args[:2]
    matmul = 2 * hidden.shape[0] * weight.shape[0] * hidden.shape[1]
    return matmul if node.op == FORWARD else 3 * matmul


def workspace_bytes(node: Node) -> int:
    """Scratch a call holds besides its inputs and outputs: one fp32 chunk of logits and the
    temporary of its logsumexp, and for a weight narrower than fp32 the backward's fp32 sum of
    its gradient."""
    hidden, weight, chunk = node.args[0], node.args[1], node.args[-1]
    acc = accumulation_dtype(hidden.dtype)
    summed = weight.numel * acc.itemsize if node.op == BACKWARD and weight.dtype != acc else 0
    return 2 * chunk * weight.shape[0] * acc.itemsize + summed


# The ops' computations writing into given outputs: the arena's form of them (their out=).
INTO: dict[str, Callable[..., object]] = {FORWARD: forward_into, BACKWARD: backward_into}
