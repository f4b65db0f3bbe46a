"""Triton kernel of ``norms.add_rms_norms``: one program a row, the row's values in registers (GLM-4.1V's 4,096
values: 16 a thread at 8 warps), both statistics from the registers, one store of each output.

Rounding: the normalised values are rounded to the row's dtype as in ``norms.rms_norm``, then multiplied by the
norm's weight and added to the residual stream in fp32 and rounded once. The eager expressions round the product
first; the Inductor kernels this replaced did not, and an explicit rounding between them here did not survive the
GPU compiler, which fused the product and the sum into one multiply-add (on an H200 27% of a 4,096-value row came
out one rounding step from the eager result either way). The stream's norm is the weight times the
rounded normalised values, rounded once, as in the eager expressions. The statistics are fp32 sums in the kernel's
order, not PyTorch's.

Imported lazily: Triton is needed only on CUDA, and the tests run this kernel under Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glyphserve.engine.pdl import begin, pdl_enabled


@triton.jit
def _add_rms_norms_kernel(y_ptr, x_ptr, post_w_ptr, next_w_ptr, out_ptr, h_ptr, D, eps, stride_y, stride_x,
                          BLOCK: tl.constexpr, PDL: tl.constexpr):
    begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    live = cols < D
    dtype = out_ptr.dtype.element_ty
    y = tl.load(y_ptr + row * stride_y + cols, mask=live, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * stride_x + cols, mask=live, other=0.0).to(tl.float32)
    post_w = tl.load(post_w_ptr + cols, mask=live, other=0.0).to(tl.float32)
    next_w = tl.load(next_w_ptr + cols, mask=live, other=0.0).to(tl.float32)
    normed = (y * tl.rsqrt(tl.sum(y * y, axis=0) / D + eps)).to(dtype).to(tl.float32)
    out = (x + post_w * normed).to(dtype)
    tl.store(out_ptr + row * D + cols, out, mask=live)
    stream = out.to(tl.float32)
    normed = (stream * tl.rsqrt(tl.sum(stream * stream, axis=0) / D + eps)).to(dtype).to(tl.float32)
    tl.store(h_ptr + row * D + cols, (next_w * normed).to(dtype), mask=live)


def add_rms_norms_rows(y: torch.Tensor, x: torch.Tensor, post_w: torch.Tensor, next_w: torch.Tensor, eps: float,
                       out: torch.Tensor, h: torch.Tensor) -> None:
    """``norms.add_rms_norms`` of rows ``y`` and ``x`` [T, D] (copied first unless their last dimension is
    contiguous) with weights [D] of their dtype, into contiguous ``out`` and ``h`` [T, D]."""
    t, d = x.shape
    if y.shape != (t, d) or post_w.shape != (d,) or next_w.shape != (d,) or out.shape != (t, d) or h.shape != (t, d):
        raise ValueError(f"add_rms_norms_rows takes rows [T, D] and weights [D], got {tuple(y.shape)}, "
                         f"{tuple(x.shape)}, {tuple(post_w.shape)}, {tuple(next_w.shape)}")
    if not (out.is_contiguous() and h.is_contiguous()):
        raise ValueError("add_rms_norms_rows writes contiguous rows")
    if y.stride(1) != 1:
        y = y.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    if t:
        block = triton.next_power_of_2(d)
        pdl = pdl_enabled(x.device)
        _add_rms_norms_kernel[(t,)](y, x, post_w.contiguous(), next_w.contiguous(), out, h, d, eps, y.stride(0),
                                    x.stride(0), BLOCK=block, PDL=pdl, num_warps=max(1, min(16, block // 512)),
                                    launch_pdl=pdl)
