"""Triton kernel of the FP8 prefill path: the per-row quantization of a prompt's activations for
``torch._scaled_mm`` (``quantize_activations``). The FP8 weight-only products of decode are ``gemv_kernel``'s (one
row) and ``rows_kernel``'s (2 to 64 rows).

Imported lazily: Triton is needed only on CUDA, and the tests run this kernel under Triton's interpreter on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quantize_activations_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm, k_iters,
                                 BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    top = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for i in range(0, k_iters):
        k = i * BLOCK_K + offs
        top = tl.maximum(top, tl.abs(tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)))
    # The values of the PyTorch expression on CUDA, which divides by a number as a product with its fp32 reciprocal
    # and by a tensor correctly rounded (Triton's "/" is not: div_rn).
    s = tl.maximum(tl.max(top, axis=0), 1e-12) * (1.0 / 448.0)
    tl.store(scale_ptr + row, s)
    for i in range(0, k_iters):
        k = i * BLOCK_K + offs
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, s), -448.0), 448.0)
        tl.store(q_ptr + row * stride_qm + k, v.to(q_ptr.dtype.element_ty), mask=k < K)


def quantize_activations(x: torch.Tensor, block_k: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] to (e4m3 [M, K], fp32 scale [M, 1]): each row's absmax maps to 448, values clamped to +-448,
    the same values as ``(x.float() / s).clamp(-448, 448).to(float8_e4m3fn)`` with
    ``s = x.abs().amax(1, keepdim=True).float().clamp(min=1e-12) / 448`` on CUDA (where ``/ 448`` is a product
    with the fp32 reciprocal), in one launch that reads the row twice (the second time from L2) instead of
    PyTorch's five passes with fp32 copies. Finite inputs only: Triton's max and clamp skip NaN, so a NaN or an
    infinity in a row does not come out as NaN as in PyTorch's expression."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _quantize_activations_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), triton.cdiv(k, block_k),
                                    BLOCK_K=block_k, num_warps=4)
    return q, scale
