"""The language model's linear layers as the model runner calls them: ``linear`` takes 16-bit weights, or FP8
weights with their per-output-channel scales.

16-bit weights go to ``F.linear`` (cuBLAS) at every row count. The one-row weight-streaming kernel of
``gemv_kernel`` read the 16-bit language model in 4.36 ms against cuBLAS's 4.99 in a sweep on an H200 (layers in
a row, one shape at a time), but inside the engine's decode step the same kernel took 6.1 ms a step against
cuBLAS's 4.9 (docs/benchmarks/NOTES.md, twelfth session; cause not found), so only FP8 weights use it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from glyphserve.engine.fp8 import fp8_linear


def linear(x: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, or with a ``scale`` the FP8 weight-only op (``weight`` e4m3, per-output-channel scales)."""
    return F.linear(x, weight, bias) if scale is None else fp8_linear(x, weight, scale, bias)
