"""Triton kernels of the FP8 path: the FP8 weight-only linear for a few rows (decode of 2 to 64 rows),
``out = (x @ W.T) * scale + bias`` (one row goes to ``gemv_kernel`` instead), and the per-row quantization of a
prompt's activations for ``torch._scaled_mm`` (``quantize_activations``).

At decode sizes a linear layer is a weight stream: each fp8 weight byte is read once and used for 2..64 rows, so
the kernel's only job is to read the weights at the card's copy bandwidth. Each program reads a tile of
``BLOCK_N`` output channels by ``BLOCK_K`` inputs, contiguous along K (16 fp8 bytes per thread per load), widens
it to the activations' dtype (exact: every e4m3 value is a bf16 value) and accumulates in fp32; the per-channel
scale and the bias are applied once at the end. Where the output channels alone give too few programs to keep
every SM streaming (narrow layers with several rows), K is split across programs whose fp32 partial sums a
second small kernel adds up (in a fixed order: results do not depend on scheduling).

The rows are multiplied with ``tl.dot``, padded to 16 (the tensor cores' smallest tile). Imported lazily: Triton is
needed only on CUDA, and the tests run these kernels under Triton's interpreter on the CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from glyphserve.engine.pdl import begin, pdl_enabled


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # rows per program: 16..64 (the tensor cores' tiles)
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


@triton.jit
def _fp8_weight_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, partial_ptr, M, N, K, stride_xm, stride_wn,
                       stride_om, k_per_split,
                       HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, K_ITERS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    begin(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * k_per_split + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    k_end = tl.minimum((pid_k + 1) * k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K_ITERS):
        k_mask = offs_k < k_end
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        offs_k += BLOCK_K
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        tl.store(partial_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)
    else:
        acc = acc * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_sum_kernel(partial_ptr, scale_ptr, bias_ptr, out_ptr, M, N, stride_om,
                      HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    begin(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(partial_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    acc = acc * tl.load(scale_ptr + n, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (offs // N) * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=mask)


def choose_config(m: int, n: int, k: int, multiprocessors: int) -> KernelConfig:
    """Tiles for ``m`` (2..64) rows of an ``n`` x ``k`` weight, from sweeps over GLM-4.1V-9B's layer shapes on an
    H200 (CUDA graphs, distinct weights per call): up to 32 rows from 32- or 64-channel tiles; up to 64 rows from
    32-channel tiles, or 128-channel ones for wide layers. K is split where the channels alone would leave SMs
    idle."""
    if m <= 32:
        config = KernelConfig(max(16, triton.next_power_of_2(m)), 32 if m <= 16 else 64, 256, 1, 4, 3)
        target = 4 * multiprocessors
    elif n >= 16384:
        return KernelConfig(64, 128, 128, 1, 4, 3)
    else:
        config = KernelConfig(64, 32, 128, 1, 4, 3)
        target = 3 * multiprocessors
    programs = triton.cdiv(n, config.block_n) * triton.cdiv(m, config.block_m)
    k_blocks = triton.cdiv(k, config.block_k)
    split = max(1, min(k_blocks, triton.cdiv(target, programs)))
    split = triton.cdiv(k_blocks, triton.cdiv(k_blocks, split))  # equal shares of K blocks
    return dataclasses.replace(config, split_k=split)


def fp8_weight_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                      config: KernelConfig | None = None) -> torch.Tensor:
    """``x`` [M, K] (M >= 2; bf16/fp16, fp32 under the interpreter) times fp8 ``qweight`` [N, K] with fp32
    ``scale`` [N] and optional ``bias`` [N]: [M, N] in x's dtype. No host synchronisation, allocations fixed by the
    shapes."""
    m, k = x.shape
    n = qweight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    if config is None:
        # Off CUDA (Triton's interpreter) tiles are chosen as for an H100/H200's 132 SMs.
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
        config = choose_config(m, n, k, sms)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    k_blocks = triton.cdiv(k, config.block_k)
    k_per_split = triton.cdiv(k_blocks, config.split_k) * config.block_k
    split = triton.cdiv(k, k_per_split)
    partial = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    grid = (triton.cdiv(n, config.block_n), split, triton.cdiv(m, config.block_m))
    pdl = pdl_enabled(x.device)
    _fp8_weight_kernel[grid](
        x, qweight, scale, bias if bias is not None else scale, out, partial, m, n, k, x.stride(0),
        qweight.stride(0), out.stride(0), k_per_split, HAS_BIAS=bias is not None, SPLIT=split > 1,
        K_ITERS=k_per_split // config.block_k,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, PDL=pdl,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )
    if split > 1:
        block = 1024
        _split_sum_kernel[(triton.cdiv(m * n, block),)](
            partial, scale, bias if bias is not None else scale, out, m, n, out.stride(0),
            HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK=block, PDL=pdl, launch_pdl=pdl,
        )
    return out


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
