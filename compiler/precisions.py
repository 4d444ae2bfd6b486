"""The compute precisions a step can be lowered to, by name (the pass is passes/precision.py).

Kept apart from the pass, and free of torch at import, so that the command line can offer the
names without loading torch to print its --help.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class Precision(enum.StrEnum):
    """A step's compute precision; master weights, optimizer states and accumulators stay fp32.

    One value from the command line through compile, plan and train: a name outside the enum
    fails where it is converted, not deep in a pass."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

    @property
    def low_dtype(self) -> torch.dtype | None:
        """The dtype the step computes in, or None when that is fp32 (nothing to lower)."""
        import torch

        return {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(self)

    @classmethod
    def _missing_(cls, value: object) -> Precision:
        names = ", ".join(cls)
        raise ValueError(f"unknown precision {value!r}; choose one of {names}")


PRECISIONS = tuple(p.value for p in Precision)  # the names a command line offers
