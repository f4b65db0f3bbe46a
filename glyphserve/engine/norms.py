"""The language model's RMS norms: ``rms_norm`` (Glm4vRMSNorm's arithmetic) and ``add_rms_norms``, the residual add
between two norms that every layer does twice (after the attention's output projection and after the MLP).

On CUDA ``add_rms_norms`` is one Triton launch a call (``norm_kernel``) with a row's values held in registers; it
replaced the kernels Inductor generated for the same expressions, which loop over a 4,096-value row in chunks (its
persistent reductions stop at 1,024 values) and re-read the row for each of the two statistics and the output: on
an H200, 3.2 us a call in an eager decode step (profile-h200-s15.md), two calls a layer.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Glm4vRMSNorm's arithmetic: statistics in float32, scale applied in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@torch.library.custom_op("glyphserve::add_rms_norms", mutates_args=())
def add_rms_norms(y: Tensor, x: Tensor, post_w: Tensor, next_w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``x + rms_norm(y, post_w)`` (the residual stream after a block whose output ``y`` is normalised) and that
    stream normalised by ``next_w`` (for what reads it next), each in ``x``'s dtype. 16-bit rows on CUDA through
    ``norm_kernel`` (which rounds the normalised ``y`` times ``post_w`` plus ``x`` once, where the expressions round
    the product first: a rounding step apart at some values); elsewhere the expressions as written."""
    if y.is_cuda and y.dtype in (torch.bfloat16, torch.float16) and x.dtype == y.dtype and y.shape == x.shape:
        from glyphserve.engine.norm_kernel import add_rms_norms_rows

        shape = x.shape
        out, h = add_rms_norms_rows(y.reshape(-1, shape[-1]), x.reshape(-1, shape[-1]), post_w, next_w, eps)
        return out.view(shape), h.view(shape)
    out = x + rms_norm(y, post_w, eps)
    return out, rms_norm(out, next_w, eps)


@add_rms_norms.register_fake
def _(y: Tensor, x: Tensor, post_w: Tensor, next_w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(x)
