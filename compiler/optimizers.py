"""The optimizers a step can be traced with, by name (the arithmetic is in trace.py).

Free of torch at import, like precisions.py, so the command line offers the names for --help.
"""

from __future__ import annotations

import enum

STATE_BLOCK = 256  # elements per fp32 scale of an 8-bit moment (bitsandbytes' block size)


class Optimizer(enum.StrEnum):
    """AdamW with fp32 moments, or with both moments block-wise quantised to int8.

    adamw8bit stores, per trainable parameter flattened and padded to a multiple of
    STATE_BLOCK: int8 codes of the first moment (linear absmax: code = round(127·m/absmax)),
    int8 codes of the second moment's square root (same map on sqrt(v): v spans twice the
    orders of magnitude of sqrt(v); a positive root under half a step is stored as one step,
    never 0: see trace.quantize_blocks), and one fp32 absmax/127 scale per block for each. The
    update dequantises, computes in fp32 and requantises."""

    ADAMW = "adamw"
    ADAMW8BIT = "adamw8bit"

    @property
    def state_block(self) -> int:
        """Elements per quantisation block of the moments; 0 for fp32 moments."""
        return STATE_BLOCK if self is Optimizer.ADAMW8BIT else 0

    @classmethod
    def _missing_(cls, value: object) -> Optimizer:
        raise ValueError(f"unknown optimizer {value!r}; choose one of {', '.join(cls)}")


OPTIMIZERS = tuple(o.value for o in Optimizer)  # the names a command line offers
