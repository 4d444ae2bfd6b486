"""Magnitude pruning with the masks in the graph: y = x (W ⊙ M)ᵀ + b.

The mask is a bool buffer multiplied into the weight in forward, so the traced backward gives
every pruned weight a zero gradient: its AdamW moments stay zero and weight decay keeps it
zero, so fine-tuning never revives it. Unstructured pruning drops the smallest |w| of each
weight (layer by layer); n:m keeps the n largest of every m consecutive weights along the input
dimension (2:4 is the pattern sparse tensor cores run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Pattern = tuple[int, int] | None  # (n, m) kept per group, or None for unstructured


def parse_pattern(text: str, sparsity: float) -> Pattern:
    """`unstructured`, `N:M` (e.g. 2:4), or `n:m` for m = 4 with n set by the sparsity."""
    if text == "unstructured":
        return None
    if text == "n:m":
        n, m = 4 * (1 - sparsity), 4
    else:
        try:
            n, m = (int(x) for x in text.split(":"))
        except ValueError:
            raise ValueError(f"--structured {text!r}: expected unstructured, n:m or N:M") from None
    if not (0 < n <= m and float(n).is_integer()) or abs(1 - n / m - sparsity) > 1e-9:
        raise ValueError(
            f"--structured {text!r} with --sparsity {sparsity}: an n:m pattern keeps n of every m"
            " weights, so n / m must be a whole n and equal 1 - sparsity (2:4 for 0.5)"
        )
    return int(n), m


def magnitude_mask(w: Tensor, sparsity: float, pattern: Pattern) -> Tensor:
    """Bool mask of the weights of `w` [out, in] to keep: the largest magnitudes."""
    magnitude = w.detach().abs()
    if pattern is None:
        keep = w.numel() - round(sparsity * w.numel())
        mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        return mask.scatter_(0, magnitude.flatten().topk(keep).indices, True).view_as(w)
    n, m = pattern
    if w.shape[-1] % m:
        raise ValueError(
            f"an {n}:{m} pattern needs the input dimension {w.shape[-1]} divisible by {m}"
        )
    groups = magnitude.reshape(*w.shape[:-1], -1, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    return mask.scatter_(-1, groups.topk(n, dim=-1).indices, True).view_as(w)


class MaskedLinear(nn.Module):
    """nn.Linear with a fixed bool mask on its weight; keeps the Linear's parameter names."""

    def __init__(self, linear: nn.Linear, mask: Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("weight_mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.weight_mask, self.bias)


@torch.no_grad()
def prune_linears(module: nn.Module, sparsity: float, pattern: Pattern) -> dict[str, float]:
    """Mask every nn.Linear whose weight is not shared, in place; returns each one's sparsity.

    A tied weight (GPT-2's lm_head = token embedding) is skipped: its rows are embeddings too.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    uses: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    chosen = [
        name
        for name, m in module.named_modules()
        if type(m) is nn.Linear and uses[id(m.weight)] == 1
    ]
    achieved = {}
    for name in chosen:
        parent, _, child = name.rpartition(".")
        owner = module.get_submodule(parent)
        linear = getattr(owner, child)
        mask = magnitude_mask(linear.weight, sparsity, pattern)
        linear.weight.mul_(mask)
        setattr(owner, child, MaskedLinear(linear, mask))
        achieved[name] = 1 - mask.float().mean().item()
    return achieved
