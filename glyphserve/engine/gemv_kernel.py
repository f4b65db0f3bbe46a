"""Triton kernel of the one-row linear layer (decode at one row): ``out = (x @ W.T) * scale + bias``, for 16-bit
weights and for FP8 weights with per-output-channel scales.

At one row a linear layer is a weight stream: each weight byte is read once and used once, so the kernel's only
job is to read the weights at the card's copy bandwidth. Each program owns ``BLOCK_N`` output channels and walks
their whole rows in ``BLOCK_K`` steps (contiguous along K, 16 bytes per thread per load), keeping per-lane fp32
products and summing them once at the end; the weights are loaded with ``evict_first`` (each byte is used once,
so they should not push the activations out of L2). No split of K: the channels alone give hundreds of programs
at GLM-4.1V-9B's sizes, and no second kernel is needed to add partial sums.

Measured on an H200 inside the engine's decode step (CUDA graphs; docs/benchmarks/NOTES.md, twelfth and thirteenth
sessions), the language model's weights (every layer's qkv, o, gate_up and down, then the head) at one row: bf16
4.28 ms against cuBLAS's 4.75 (floor ~4.2 at the run's copy bandwidth), FP8 2.75 ms (floor 2.15; the few-rows
kernel of ``fp8_kernels`` took 3.00 in a sweep). An FP8 step is not bound by the byte's conversion (integer
conversions and PTX ``prmt`` ones were slower, sixteenth session) but by the per-lane accumulators: a tile of FP8
weights has twice the elements of a 16-bit one of the same bytes, so FP8 tiles sum each thread's adjacent products
first (``lane_group``) and stream more bytes a step: 2.43 ms against 2.77 in the same sweep of isolated products.

Imported lazily: Triton is needed only on CUDA, and the tests run this kernel under Triton's interpreter on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from glyphserve.engine.pdl import begin, pdl_enabled


@dataclass(frozen=True)
class RowConfig:
    block_n: int  # output channels per program
    block_k: int  # inputs per step
    num_warps: int
    lane_group: int = 1  # adjacent products a thread adds up each step before they reach an fp32 accumulator


@triton.jit
def _row_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, N, K, stride_wn, k_iters,
                HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP: tl.constexpr, PDL: tl.constexpr):
    begin(PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
    lanes = tl.zeros((BLOCK_N, BLOCK_K // GROUP), dtype=tl.float32)
    # A runtime trip count: with a compile-time one, ptxas interleaved each step's weight loads with the products
    # (about 4 of a thread's 8 16-byte loads in flight instead of all 8), and bf16 weights read at 4 KB a row a step
    # took 6.14 ms a decode step on an H200 against 4.28 with the count at run time (thirteenth session).
    for _ in range(0, k_iters):
        k_mask = offs_k < K
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0)
        products = w.to(tl.float32) * x.to(tl.float32)[None, :]
        if GROUP > 1:  # adjacent products (one thread's) summed first: a GROUP-th of the accumulator registers
            lanes += tl.sum(tl.reshape(products, (BLOCK_N, BLOCK_K // GROUP, GROUP)), axis=2)
        else:
            lanes += products
        w_ptrs += BLOCK_K
        offs_k += BLOCK_K
    acc = tl.sum(lanes, axis=1)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


def choose_row_config(n: int, k: int, weight_bytes: int) -> RowConfig:
    """Tiles from sweeps over GLM-4.1V-9B's layer shapes on an H200: 16-bit weights stream best as 4 channels by
    2,048 inputs (4 KB a row a step) for every shape (block_n 4/8/16, block_k 512-2048, 4 or 8 warps; twelfth
    session). FP8 weights with each thread's 8 adjacent products summed before its accumulators (sixteenth
    session, 12 tiles tried per shape, 40 layers' distinct weights in a CUDA graph): 8 channels by 2,048 inputs for
    the square and the down projection, 4 by 4,096 for the fused qkv, gate_up and the head; the step's products
    2.43 ms against 2.77 for the best of the accumulate-each-product tiles in the same run."""
    if weight_bytes >= 2:
        return RowConfig(4, 2048, 4)
    if n <= 4096:
        return RowConfig(8, 2048, 4, lane_group=8)
    return RowConfig(4, 4096, 4, lane_group=8)


def row_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
               config: RowConfig | None = None) -> torch.Tensor:
    """``x`` [1, K] (16-bit; fp32 under the interpreter) times ``weight`` [N, K] (16-bit, or fp8 with fp32
    ``scale`` [N]) plus optional ``bias`` [N]: [1, N] in x's dtype. No host synchronisation; one launch."""
    n, k = weight.shape
    if x.shape != (1, k):
        raise ValueError(f"row_matmul takes one row of {k} inputs, got {tuple(x.shape)}")
    if n * max(k, weight.stride(0)) >= 2**31:  # the kernel's offsets are 32-bit (GLM-4.1V's head: 6.2e8 elements)
        raise ValueError(f"row_matmul takes weights of fewer than 2**31 elements, got {n} x {k}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    config = config or choose_row_config(n, k, weight.element_size())
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    pdl = pdl_enabled(x.device)
    _row_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, scale if scale is not None else x, bias if bias is not None else x, out, n, k, weight.stride(0),
        triton.cdiv(k, config.block_k), HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP=config.lane_group, PDL=pdl,
        num_warps=config.num_warps, num_stages=1,
        launch_pdl=pdl,
    )
    return out
