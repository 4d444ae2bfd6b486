"""The compute precision a step is compiled for: one typed value from the command line on.

A name outside the enum fails where it is converted, not deep in a pass. Free of torch, so the
command line offers the choices without importing it; the dtypes are the precision pass's
(`compiler.passes.precision.LOW_DTYPES`).
"""

from __future__ import annotations

import enum


class Precision(enum.StrEnum):
    """A step's compute dtype; master weights, optimizer states and accumulators stay fp32."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

    @classmethod
    def _missing_(cls, value: object) -> Precision:
        names = ", ".join(cls)
        raise ValueError(f"unknown precision {value!r}; choose one of {names}")


PRECISIONS = tuple(p.value for p in Precision)  # the names a command line offers
