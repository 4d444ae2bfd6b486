"""Frozen base weights stored quantised: int8 or NF4 codes with one absmax scale per block.

A frozen weight needs no gradient and no optimizer state, so its only cost is its storage:
int8 keeps 1 byte + 4/64 (scale) per element, NF4 (QLoRA's 4-bit NormalFloat) 0.5 + 4/64, vs
4 for fp32. `QuantizedLinear` dequantises inside a custom autograd.Function, in forward and
again in backward, and saves only the codes: in the traced graph the full-precision weight is a
temporary next to its matmul, never a value kept from forward to backward.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QuantMode = Literal["int8", "nf4"]
QUANT_MODES: tuple[QuantMode, ...] = ("int8", "nf4")
BLOCK = 64  # elements per absmax scale (QLoRA's block size)

# The 16 NF4 levels (Dettmers et al. 2023, appendix E): quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def quantize_blockwise(w: Tensor, mode: QuantMode) -> tuple[Tensor, Tensor]:
    """(codes, absmax): int8 codes [numel], or NF4 nibble pairs packed in uint8 [numel / 2].

    The weight is cut into blocks of BLOCK elements (row-major); each block is divided by its
    largest magnitude, so one outlier costs precision only in its own block.
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantisation {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    if w.numel() % BLOCK:
        raise ValueError(
            f"a weight of {w.numel()} elements is not a whole number of {BLOCK}-blocks"
        )
    blocks = w.detach().float().reshape(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    unit = blocks / absmax[:, None]
    if mode == "int8":
        return (unit * 127).round().to(torch.int8).flatten(), absmax
    levels = torch.tensor(NF4_LEVELS, device=w.device)
    nibbles = (unit.flatten()[:, None] - levels).abs().argmin(dim=1).to(torch.uint8)
    return nibbles[0::2] * 16 + nibbles[1::2], absmax


def dequantize_blockwise(
    codes: Tensor, absmax: Tensor, levels: Tensor | None, shape: torch.Size
) -> Tensor:
    """The fp32 weight the codes stand for; `levels` is the NF4 table (None for int8)."""
    if levels is None:
        unit = codes.float().reshape(-1, BLOCK) / 127
    else:  # high nibble first, as quantize_blockwise packs them
        nibbles = torch.stack((codes // 16, codes % 16), dim=-1).flatten().long()
        unit = levels[nibbles].reshape(-1, BLOCK)
    return (unit * absmax[:, None]).reshape(shape)


class _DequantLinear(torch.autograd.Function):
    """y = x Wᵀ with W dequantised on the spot; backward dequantises again (saves codes only)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        codes: Tensor,
        absmax: Tensor,
        levels: Tensor | None,
        shape: torch.Size,
    ) -> Tensor:
        ctx.save_for_backward(codes, absmax, levels)
        ctx.shape = shape  # type: ignore[attr-defined]
        return F.linear(x, dequantize_blockwise(codes, absmax, levels, shape))

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, ...]:
        codes, absmax, levels = ctx.saved_tensors  # type: ignore[attr-defined]
        weight = dequantize_blockwise(codes, absmax, levels, ctx.shape)  # type: ignore[attr-defined]
        return grad @ weight, None, None, None, None


class QuantizedLinear(nn.Module):
    """A frozen nn.Linear whose weight lives as blockwise-quantised buffers."""

    def __init__(self, linear: nn.Linear, mode: QuantMode) -> None:
        super().__init__()
        self.mode = mode
        self.in_features, self.out_features = linear.in_features, linear.out_features
        codes, absmax = quantize_blockwise(linear.weight, mode)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_absmax", absmax)
        levels = torch.tensor(NF4_LEVELS, device=codes.device) if mode == "nf4" else None
        self.register_buffer("nf4_levels", levels)
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def weight_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def dequantized_weight(self) -> Tensor:
        """The weight in fp32 (for merging adapters and for tests); not used by forward."""
        return dequantize_blockwise(
            self.weight_codes, self.weight_absmax, self.nf4_levels, self.weight_shape
        )

    def forward(self, x: Tensor) -> Tensor:
        y = _DequantLinear.apply(
            x, self.weight_codes, self.weight_absmax, self.nf4_levels, self.weight_shape
        )
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, mode={self.mode}, block={BLOCK}"


def quantize_frozen_linears(module: nn.Module, mode: QuantMode) -> list[str]:
    """Replace every frozen nn.Linear (weight not shared with another module) in place.

    Returns the replaced names (none if done already). A tied weight (GPT-2's lm_head is the
    token embedding) stays: the embedding reads it too, and a lookup in quantised rows is
    another kernel.
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantisation {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    uses = Counter(id(p) for _, p in module.named_parameters(remove_duplicate=False))
    targets = [
        name
        for name, m in module.named_modules()
        if type(m) is nn.Linear and not m.weight.requires_grad and uses[id(m.weight)] == 1
    ]
    if not targets and not any(isinstance(m, QuantizedLinear) for m in module.modules()):
        raise ValueError(
            "--quantize-base stores frozen Linear weights quantised, and this model has none:"
            " freeze the base first (e.g. with --lora)"
        )
    for name in targets:
        module.set_submodule(name, QuantizedLinear(module.get_submodule(name), mode))
    return targets
