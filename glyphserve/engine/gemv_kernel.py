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
kernel of ``rows_kernel`` took 3.00 in a sweep). An FP8 step is not bound by the byte's conversion (integer
conversions and PTX ``prmt`` ones were slower, sixteenth session) but by the per-lane accumulators: a tile of FP8
weights has twice the elements of a 16-bit one of the same bytes, so FP8 tiles sum each thread's adjacent products
first (``lane_group``) and stream more bytes a step: 2.43 ms against 2.77 in the same sweep of isolated products.

``gated_row_matmul`` is the kernel on a fused [gate; up] projection (the MLP's ``gate_up``) that writes
``up * silu(gate)`` instead of both halves: each program streams the gate rows of its channels and the matching up
rows (the same bytes a step as the plain tiling), so the step loses the elementwise launch that formed the MLP's
input from the projection's output (40 a decode step).

Cards before Ada (sm_80/86: the A100, the 24 GB RTX 3090, A10 and A5000) have no FP8 conversion, and Triton
refuses an e4m3 pointer there: FP8 weights reach both kernels as their bytes (``e4m3_bits``), which ``widen``
turns into their values with integer operations, exactly.

Imported lazily: Triton is needed only on CUDA, and the tests run this kernel under Triton's interpreter on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from glyphserve.engine.fp8 import has_fp8_conversion
from glyphserve.engine.pdl import begin, pdl_enabled


@dataclass(frozen=True)
class RowConfig:
    block_n: int  # output channels per program
    block_k: int  # inputs per step
    num_warps: int
    lane_group: int = 1  # adjacent products a thread adds up each step before they reach an fp32 accumulator


def e4m3_bits(weight: torch.Tensor) -> torch.Tensor:
    """An FP8 weight as the kernels take it on this card: itself where Triton converts e4m3 (CUDA sm_89 and
    later; the interpreter), else a uint8 view of its bytes for ``widen``."""
    if weight.dtype == torch.float8_e4m3fn and weight.is_cuda and not has_fp8_conversion(weight.device):
        return weight.view(torch.uint8)
    return weight


@triton.jit
def widen(w):
    """A loaded weight tile in fp32; uint8 tiles are e4m3fn bytes. Each byte's sign, exponent and mantissa go to
    the matching places of a float16 (e4m3's bias is 7, float16's 15: the float16 is the value times 2**-8, exact
    for e4m3's subnormals too, which are float16 subnormals), widened and scaled back by 256. (e4m3fn's NaN byte,
    which quantizing never writes, would come out as a finite value.)"""
    if w.dtype == tl.uint8:
        b = w.to(tl.uint16)
        bits = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
        w = bits.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
    return w.to(tl.float32)


@triton.jit
def _row_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, N, K, stride_wn, k_iters,
                HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr):
    begin(PDL)
    if GATED:  # rows (gate of channel c, up of channel c) next to each other; N counts channels, 2 N rows
        rows = tl.arange(0, 2 * BLOCK_N)
        offs_n = tl.program_id(0) * BLOCK_N + rows // 2
        offs_w = offs_n + (rows % 2) * N
    else:
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_w = offs_n
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_ptrs = w_ptr + offs_w[:, None] * stride_wn + offs_k[None, :]
    lanes = tl.zeros((2 * BLOCK_N if GATED else BLOCK_N, BLOCK_K // GROUP), dtype=tl.float32)
    # A runtime trip count: with a compile-time one, ptxas interleaved each step's weight loads with the products
    # (about 4 of a thread's 8 16-byte loads in flight instead of all 8), and bf16 weights read at 4 KB a row a step
    # took 6.14 ms a decode step on an H200 against 4.28 with the count at run time (thirteenth session).
    for _ in range(0, k_iters):
        k_mask = offs_k < K
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0)
        products = widen(w) * x.to(tl.float32)[None, :]
        if GROUP > 1:  # adjacent products (one thread's) summed first: a GROUP-th of the accumulator registers
            lanes += tl.sum(tl.reshape(products, (lanes.shape[0], BLOCK_K // GROUP, GROUP)), axis=2)
        else:
            lanes += products
        w_ptrs += BLOCK_K
        offs_k += BLOCK_K
    acc = tl.sum(lanes, axis=1)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + offs_w, mask=n_mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_w, mask=n_mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    if GATED:
        # Each half rounded to the output dtype as the projection's output would be, then the activation and
        # product in fp32 rounded once (what the compiled elementwise kernel did with the two halves).
        gate, up = tl.split(tl.reshape(acc.to(dtype).to(tl.float32), (BLOCK_N, 2)))
        out = up * (gate * tl.sigmoid(gate))
        channels = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + channels, out.to(dtype), mask=channels < N)
    else:
        tl.store(out_ptr + offs_n, acc.to(dtype), mask=n_mask)


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
    ``scale`` [N], its bytes as uint8 too) plus optional ``bias`` [N]: [1, N] in x's dtype. No host
    synchronisation; one launch."""
    return _launch(x, weight, scale, bias, config, gated=False)


def gated_row_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                     config: RowConfig | None = None) -> torch.Tensor:
    """``up * silu(gate)`` of ``x`` [1, K] times a fused [gate; up] ``weight`` [2 I, K] (16-bit, or fp8 with fp32
    ``scale`` [2 I]): [1, I] in x's dtype. Each half of the product is rounded to x's dtype first, the activation
    and the product computed in fp32. ``config`` tiles the 2 I rows as ``row_matmul``'s would (a program owns
    ``block_n`` rows: half as many channels)."""
    if weight.shape[0] % 2:
        raise ValueError(f"a fused [gate; up] weight has an even row count, got {weight.shape[0]}")
    return _launch(x, weight, scale, None, config, gated=True)


def _launch(x, weight, scale, bias, config: RowConfig | None, gated: bool) -> torch.Tensor:
    n, k = weight.shape
    if x.shape != (1, k):
        raise ValueError(f"row_matmul takes one row of {k} inputs, got {tuple(x.shape)}")
    if n * max(k, weight.stride(0)) >= 2**31:  # the kernel's offsets are 32-bit (GLM-4.1V's head: 6.2e8 elements)
        raise ValueError(f"row_matmul takes weights of fewer than 2**31 elements, got {n} x {k}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    weight = e4m3_bits(weight)
    config = config or choose_row_config(n, k, weight.element_size())
    # gated: N counts output channels (half the rows), a program owns half its rows' count of them
    channels, block_n = (n // 2, max(1, config.block_n // 2)) if gated else (n, config.block_n)
    out = torch.empty((1, channels), dtype=x.dtype, device=x.device)
    pdl = pdl_enabled(x.device)
    _row_kernel[(triton.cdiv(channels, block_n),)](
        x, weight, scale if scale is not None else x, bias if bias is not None else x, out, channels, k,
        weight.stride(0), triton.cdiv(k, config.block_k), HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=config.block_k, GROUP=config.lane_group, GATED=gated, PDL=pdl,
        num_warps=config.num_warps, num_stages=1,
        launch_pdl=pdl,
    )
    return out
