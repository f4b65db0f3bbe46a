"""The language model's RMS norms: ``rms_norm`` (Glm4vRMSNorm's arithmetic) and ``add_rms_norms``, the residual add
between two norms that every layer does twice (after the attention's output projection and after the MLP).

On CUDA, for 16-bit rows, ``add_rms_norms`` is one Triton launch a call (``norm_kernel``, as the custom op
``glyphserve::add_rms_norms``, opaque to ``torch.compile``) with a row's values held in registers; it replaced the
kernels Inductor generated for the same expressions, which loop over a 4,096-value row in chunks (its persistent
reductions stop at 1,024 values) and re-read it for each of the two statistics and the output: on an H200, 3.2 us a
call in an eager decode step (profile-h200-s15.md), two calls a layer. Elsewhere (the CPU, fp32 rows) it is the
plain expressions, which ``torch.compile`` fuses where it is on.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows up to this many values go through the kernel: beyond it a thread's share of the row no longer fits in
# registers (16,384 bf16 values at 16 warps spilled, compiled for sm_90).
KERNEL_MAX_WIDTH = 8192


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Glm4vRMSNorm's arithmetic: statistics in float32, scale applied in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norms(y: Tensor, x: Tensor, post_w: Tensor, next_w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``x + rms_norm(y, post_w)`` (the residual stream after a block whose output ``y`` is normalised) and that
    stream normalised by ``next_w`` (for what reads it next). 16-bit rows on CUDA (``y``, ``x`` and the weights of
    one dtype and width) go through ``norm_kernel``, which rounds the normalised ``y`` times ``post_w`` plus ``x``
    once where the expressions round the product first (a rounding step apart at some values); everything else
    through the expressions as written."""
    d = x.shape[-1]
    if (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and y.shape == x.shape and d <= KERNEL_MAX_WIDTH
            and all(t.dtype == x.dtype for t in (y, post_w, next_w)) and post_w.shape == next_w.shape == (d,)):
        return kernel_add_rms_norms(y, x, post_w, next_w, eps)
    out = x + rms_norm(y, post_w, eps)
    return out, rms_norm(out, next_w, eps)


@torch.library.custom_op("glyphserve::add_rms_norms", mutates_args=())
def kernel_add_rms_norms(y: Tensor, x: Tensor, post_w: Tensor, next_w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``norm_kernel``'s launch on rows ``y`` and ``x`` [..., D] (CUDA, 16-bit, ``add_rms_norms``'s conditions):
    two new contiguous tensors of x's shape."""
    from glyphserve.engine.norm_kernel import add_rms_norms_rows

    out, h = x.new_empty(x.shape), x.new_empty(x.shape)
    d = x.shape[-1]
    add_rms_norms_rows(y.reshape(-1, d), x.reshape(-1, d), post_w, next_w, eps, out.view(-1, d), h.view(-1, d))
    return out, h


@kernel_add_rms_norms.register_fake
def _(y: Tensor, x: Tensor, post_w: Tensor, next_w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)
