"""The language model's linear layers as the model runner calls them: ``linear`` takes 16-bit weights, or FP8
weights with their per-output-channel scales; ``gated_linear`` is the MLP's fused [gate; up] projection with its
activation (``up * silu(gate)``).

16-bit weights go through ``dense_linear``: one row of activations on CUDA (a decode step of one sequence, the head
after a prompt) through the weight-streaming kernel of ``gemv_kernel``, everything else through ``F.linear``
(cuBLAS). Measured inside the decode step on an H200 (thirteenth session, docs/benchmarks/NOTES.md): the language
model's weight reads 4.28 ms a step through the kernel against 4.75 through cuBLAS, whose one-row GEMMs split K and
add a reduction kernel for the square and down projections. From 2 rows up cuBLAS streams the other layers as fast
as Triton's tiles did (twenty-second session), but not the gated projection with its activation: decode steps of
up to ``BF16_GATED_ROWS`` rows (64 with FP8 weights) run it through ``rows_kernel``'s gated kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from glyphserve.engine.fp8 import DECODE_ROWS, fp8_linear

# Rows up to which a 16-bit gated projection runs through the gated kernel (measured to 16 rows on an H200; for
# more rows cuBLAS's product with the compiled activation was not measured against it).
BF16_GATED_ROWS = 16


def linear(x: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None = None) -> Tensor:
    """``dense_linear``, or with a ``scale`` the FP8 weight-only op (``weight`` e4m3, per-output-channel scales)."""
    return dense_linear(x, weight, bias) if scale is None else fp8_linear(x, weight, scale, bias)


def gated_linear(x: Tensor, weight: Tensor, scale: Tensor | None) -> Tensor:
    """``up * silu(gate)`` of ``linear(x, weight, scale)`` split in halves [gate, up] (HF's ``Glm4vTextMLP``). A few
    rows of 16-bit activations on CUDA (a decode step's, a short chunk's, a pass's sampled rows in its last layer),
    with 16-bit (up to ``BF16_GATED_ROWS`` rows) or FP8 weights (up to ``DECODE_ROWS``), go through a
    weight-streaming kernel's gated variant (``gated_rows``), which writes the activation's output instead of the
    projection's: a step's 40 elementwise launches fewer. (Under ``torch.compile`` the row bound is a guard: more
    rows, a prompt's, trace the plain product and activation; ``Engine`` traces the prompt's variant at load and
    the few rows' with its decode graphs.)"""
    if x.is_cuda and x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16) and (
            scale is not None or weight.dtype == x.dtype) and x.shape[0] <= (
            DECODE_ROWS if scale is not None else BF16_GATED_ROWS):
        return gated_rows(x, weight, scale)
    gate, up = linear(x, weight, scale).chunk(2, dim=-1)
    return up * F.silu(gate)


# A custom op, opaque to torch.compile: the kernel is launched by Triton's own runtime, which specialises it on
# the arguments' 16-byte alignment (vectorised loads); the branch on the row count is taken at run time.
@torch.library.custom_op("glyphserve::dense_linear", mutates_args=())
def dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for 16-bit or fp32 ``weight`` [out, in]; [..., out] in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    if x.is_cuda and rows.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype:
        from glyphserve.engine.gemv_kernel import row_matmul

        return row_matmul(rows, weight, None, bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


@dense_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("glyphserve::gated_rows", mutates_args=())
def gated_rows(x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
    """The gated kernels (CUDA) as an op opaque to ``torch.compile``: ``gemv_kernel.gated_row_matmul`` for one
    row, ``rows_kernel.gated_rows_matmul`` for more (the branch on the row count taken at run time)."""
    if x.shape[0] == 1:
        from glyphserve.engine.gemv_kernel import gated_row_matmul

        return gated_row_matmul(x, weight, scale)
    from glyphserve.engine.rows_kernel import gated_rows_matmul

    return gated_rows_matmul(x, weight, scale)


@gated_rows.register_fake
def _(x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0] // 2))
