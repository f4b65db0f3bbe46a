"""Triton kernel of the few-rows linear layer (decode of 2 to 64 rows): ``out = (x @ W.T) * scale + bias`` for FP8
weights with per-output-channel scales, and its gated variant on the MLP's fused [gate; up] projection, which
writes ``up * silu(gate)`` (for FP8 and for 16-bit weights). One row goes to ``gemv_kernel`` instead.

At decode sizes a linear layer is a weight stream: each weight byte is read once and used for 2..64 rows, so the
kernel's only job is to read the weights at the card's copy bandwidth. Each program reads a tile of ``BLOCK_N``
output channels by ``BLOCK_K`` inputs, contiguous along K, widens it to the activations' dtype (exact: every e4m3
value is a bf16 value) and multiplies on the tensor cores (``tl.dot``, the rows padded to 16, their smallest tile)
with fp32 accumulation (on cards without FP8 conversions, through fp32: ``gemv_kernel.widen``); the per-channel
scale and the bias are applied once at the end. Where the output channels
alone give too few programs to keep every SM streaming, K is split across programs whose fp32 partial sums (each
scaled already: the scale is per channel) a second small kernel adds up with the bias (in a fixed order: results
do not depend on scheduling). ``swap`` puts the weight tile on the MMA's M side (the rows on its N side) instead
of the rows.

The gated variant interleaves each channel's gate row and up row in a tile (as ``gemv_kernel``'s gated kernel
does), so a program holds both halves of its channels and the step loses the elementwise launch that formed the
MLP's input. Each half is rounded to the activations' dtype first, then the activation and the product are
computed in fp32 and rounded once (what the compiled elementwise kernel did).

Measured on an H200 (twenty-second session, docs/benchmarks/NOTES.md; 40 layers' distinct weights a shape in a
CUDA graph): the gated kernel on bf16 weights at 2-16 rows, 53.5-54.9 us a layer against 59-62 for cuBLAS's
product and the activation (floor 53.2); FP8 weights at 64 rows, the step's products 6.22 ms with swapped tiles
against 7.17 for the tiles before (floor 2.08: FP8 at 64 rows stays slower than bf16's cuBLAS, ~5.1); at 8-32
rows the FP8 gated kernel 42-55 us a layer against 48-60 for the product and the activation.

Imported lazily: Triton is needed only on CUDA, and the tests run these kernels under Triton's interpreter on the CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from glyphserve.engine.gemv_kernel import e4m3_bits, widen
from glyphserve.engine.pdl import begin, pdl_enabled


@dataclass(frozen=True)
class RowsConfig:
    block_m: int  # rows per program: 16..64 (the tensor cores' tiles)
    block_n: int  # weight rows per program (gated: gate and up rows together, half as many channels)
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    swap: bool = False  # the weight tile as the MMA's M side


@triton.jit
def _rows_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, partial_ptr, M, N, K, stride_xm, stride_wn,
                 stride_om, k_per_split,
                 HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, K_ITERS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr,
                 GATED: tl.constexpr, PDL: tl.constexpr):
    begin(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if GATED:  # weight rows (gate of channel c, up of channel c) side by side; N counts channels, 2 N rows
        rows = tl.arange(0, BLOCK_N)
        offs_n = pid_n * (BLOCK_N // 2) + rows // 2
        offs_w = offs_n + (rows % 2) * N
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_w = offs_n
    offs_k = pid_k * k_per_split + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    w_ptrs = w_ptr + offs_w[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    k_end = tl.minimum((pid_k + 1) * k_per_split, K)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K_ITERS):
        k_mask = offs_k < k_end
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if w.dtype == tl.uint8:  # e4m3 bytes on a card without FP8 conversions (``gemv_kernel.widen``)
            w = widen(w)
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if SWAP:
            acc = tl.dot(w.to(x.dtype), tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        offs_k += BLOCK_K
    if SWAP:
        acc = tl.trans(acc)
    if HAS_SCALE:  # per output channel, so also right on a split's partial sum
        acc = acc * tl.load(scale_ptr + offs_w, mask=n_mask, other=0.0)[None, :]
    dtype = out_ptr.dtype.element_ty
    if GATED:
        gate, up = tl.split(tl.reshape(acc.to(dtype).to(tl.float32), (BLOCK_M, BLOCK_N // 2, 2)))
        channels = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + offs_m[:, None] * stride_om + channels[None, :], (up * (gate * tl.sigmoid(gate))).to(dtype),
                 mask=m_mask[:, None] & (channels < N)[None, :])
    else:
        mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT:
            tl.store(partial_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(dtype), mask=mask)


@triton.jit
def _split_sum_kernel(partial_ptr, bias_ptr, out_ptr, M, N, stride_om,
                      HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    begin(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(partial_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (offs // N) * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=mask)


def choose_rows_config(m: int, n: int, k: int, weight_bytes: int, gated: bool, multiprocessors: int) -> RowsConfig:
    """Tiles for ``m`` (2..64) rows of an ``n`` x ``k`` weight (``n`` counts weight rows, gate and up together
    when ``gated``), from sweeps over GLM-4.1V-9B's layer shapes on an H200 (CUDA graphs, distinct weights per
    call; sixteenth and twenty-second sessions). FP8 up to 32 rows: 32- or 64-channel tiles, 256 inputs a step;
    more rows: swapped 128 x 128 tiles (the 64-row step's products 6.22 ms against 7.17 with 32-channel ones).
    Gated: 16-bit weights in swapped 64 x 128 tiles; FP8 in 32 x 256 tiles (16 rows or fewer), 128 x 256 (up to
    32) or, like the plain product, swapped 128 x 128. K is split where the channels alone would leave SMs idle
    (never for a gated product: its channels are plenty)."""
    block_m = max(16, triton.next_power_of_2(m))
    if gated:
        if weight_bytes >= 2:
            return RowsConfig(block_m, 64, 128, 1, 4, 4, swap=True)
        if m <= 16:
            return RowsConfig(block_m, 32, 256, 1, 4, 4)
        if m <= 32:
            return RowsConfig(block_m, 128, 256, 1, 8, 3)
        return RowsConfig(block_m, 128, 128, 1, 4, 3, swap=True)
    if m <= 32:
        config, target = RowsConfig(block_m, 32 if m <= 16 else 64, 256, 1, 4, 3), 4 * multiprocessors
    else:
        config, target = RowsConfig(block_m, 128, 128, 1, 4, 3, swap=True), 2 * multiprocessors
    programs = triton.cdiv(n, config.block_n) * triton.cdiv(m, config.block_m)
    k_blocks = triton.cdiv(k, config.block_k)
    split = max(1, min(k_blocks, triton.cdiv(target, programs)))
    split = triton.cdiv(k_blocks, triton.cdiv(k_blocks, split))  # equal shares of K blocks
    return dataclasses.replace(config, split_k=split)


def rows_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                config: RowsConfig | None = None) -> torch.Tensor:
    """``x`` [M, K] (M >= 2; bf16/fp16, fp32 under the interpreter) times ``weight`` [N, K] (fp8 with fp32
    ``scale`` [N], its bytes as uint8 too, or x's dtype without) plus optional ``bias`` [N]: [M, N] in x's
    dtype. No host synchronisation, allocations fixed by the shapes."""
    return _launch(x, weight, scale, bias, config, gated=False)


def gated_rows_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                      config: RowsConfig | None = None) -> torch.Tensor:
    """``up * silu(gate)`` of ``x`` [M, K] times a fused [gate; up] ``weight`` [2 I, K] (fp8 with fp32 ``scale``
    [2 I], or x's dtype without): [M, I] in x's dtype, each half of the product rounded to x's dtype first."""
    if weight.shape[0] % 2:
        raise ValueError(f"a fused [gate; up] weight has an even row count, got {weight.shape[0]}")
    return _launch(x, weight, scale, None, config, gated=True)


def _launch(x, weight, scale, bias, config: RowsConfig | None, gated: bool) -> torch.Tensor:
    m, k = x.shape
    if weight.shape[1] != k:
        raise ValueError(f"x has {k} inputs, the weight {weight.shape[1]}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    weight = e4m3_bits(weight)
    if config is None:
        # Off CUDA (Triton's interpreter) tiles are chosen as for an H100/H200's 132 SMs.
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
        config = choose_rows_config(m, weight.shape[0], k, weight.element_size(), gated, sms)
    if gated and config.split_k != 1:
        raise ValueError("a gated product does not split K")
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    k_blocks = triton.cdiv(k, config.block_k)
    k_per_split = triton.cdiv(k_blocks, config.split_k) * config.block_k
    split = triton.cdiv(k, k_per_split)
    partial = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    tiles = triton.cdiv(n, config.block_n // 2) if gated else triton.cdiv(n, config.block_n)
    pdl = pdl_enabled(x.device)
    _rows_kernel[(tiles, split, triton.cdiv(m, config.block_m))](
        x, weight, scale if scale is not None else x, bias if bias is not None else x, out, partial, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0), k_per_split, HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None, SPLIT=split > 1, K_ITERS=k_per_split // config.block_k,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SWAP=config.swap, GATED=gated,
        PDL=pdl, num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )
    if split > 1:
        block = 1024
        _split_sum_kernel[(triton.cdiv(m * n, block),)](
            partial, bias if bias is not None else x, out, m, n, out.stride(0),
            HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK=block, PDL=pdl, launch_pdl=pdl,
        )
    return out
