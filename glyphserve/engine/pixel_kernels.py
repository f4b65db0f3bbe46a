"""Triton kernels of the page preprocessing on CUDA: one pass of Pillow's separable resize (``resample``) and the
lookup, temporal repeat and patch layout of the processor's output (``patchify``), each one launch over a batch of
pages of one shape.

The torch versions (``resize._resize_rows``, ``PagePreprocessor.patchify`` off CUDA) are a sequence of whole-tensor
operations: a pass of the resize is ``ksize`` gathers, products and sums over the pages as int32 (4 bytes a
subpixel, 5 taps a pass for the renderer's pages), the lookup indexes a float32 table with int64 pixel values and
the layout copies the float32 result twice. On an H200 a W200 question's 24 pages (three widths) took 6.8 ms from
uint8 to patches that way and 0.9-1.4 ms with these kernels (one shape's resize 1.28 -> 0.16-0.25 ms;
docs/benchmarks/experiments-h200-s17.json). Same integer arithmetic and the same table values, so the results are
equal bit for bit.

Imported lazily (Triton is needed only on CUDA; the tests run the kernels under Triton's interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # output subpixels a resample program writes


# Sizes and the tap count are not specialised on: Triton compiles a variant for each integer argument's divisibility
# by 16 (and for 1), and pages of a new size would meet a compilation (2.5 s on an H200) in a user's question.
@triton.jit(do_not_specialize=["S_IN", "S_OUT", "E", "KSIZE", "BLOCKS"])
def _resample_kernel(src_ptr, dst_ptr, index_ptr, weight_ptr, S_IN, S_OUT, E, KSIZE, BLOCKS,
                     PRECISION: tl.constexpr, BLOCK: tl.constexpr):
    """dst[o, s, e] = clip((2**(PRECISION-1) + sum_t src[o, index[s, t], e] * weight[s, t]) >> PRECISION); program
    ``o * BLOCKS + b`` writes block ``b`` of ``dst[o]`` (one grid axis: the second and third hold 65,535 programs,
    fewer than the rows of a step's pages; offsets in int64: a page may pass 2**31 subpixels)."""
    pid = tl.program_id(0).to(tl.int64)
    o = pid // BLOCKS
    offs = (pid % BLOCKS) * BLOCK + tl.arange(0, BLOCK)
    live = offs < S_OUT.to(tl.int64) * E
    s = offs // E
    e = offs % E
    acc = tl.full((BLOCK,), 1 << (PRECISION - 1), tl.int32)
    for t in range(KSIZE):
        idx = tl.load(index_ptr + s * KSIZE + t, mask=live, other=0).to(tl.int64)
        w = tl.load(weight_ptr + s * KSIZE + t, mask=live, other=0)
        acc += tl.load(src_ptr + o * S_IN * E + idx * E + e, mask=live, other=0).to(tl.int32) * w
    out = tl.minimum(tl.maximum(acc >> PRECISION, 0), 255)
    tl.store(dst_ptr + o * S_OUT * E + offs, out.to(tl.uint8), mask=live)


def resample(src: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, precision: int) -> torch.Tensor:
    """One pass over ``src`` uint8 [O, S_in, E] along S: [O, S_out, E] uint8, from the pass's taps ``index`` and
    fixed-point ``weight`` [S_out, ksize] (int32, ``resize._coefficients``)."""
    o, s_in, e = src.shape
    s_out, ksize = index.shape
    dst = torch.empty((o, s_out, e), dtype=torch.uint8, device=src.device)
    blocks = triton.cdiv(s_out * e, BLOCK)
    if o and blocks:
        _resample_kernel[(o * blocks,)](src.contiguous(), dst, index, weight, s_in, s_out, e, ksize, blocks,
                                        PRECISION=precision, BLOCK=BLOCK)
    return dst


@triton.jit(do_not_specialize=["H", "W", "GW"])
def _patchify_kernel(page_ptr, lut_ptr, rows_ptr, out_ptr, H, W, GW,
                     P: tl.constexpr, M: tl.constexpr, T: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr):
    """One patch of one page: program (r, n) writes row ``rows[n] + r`` of ``out``, the processor's order within a
    page being merge blocks row-major, then the M x M patches of a block, each patch's values channel-major, each
    channel's P x P values repeated for the T temporal copies."""
    r = tl.program_id(0)
    n = tl.program_id(1)
    mw = r % M
    mh = (r // M) % M
    block = r // (M * M)
    pw = (block % (GW // M)) * M + mw
    ph = (block // (GW // M)) * M + mh
    i = tl.arange(0, BLOCK)
    live = i < P * P
    src = page_ptr + n.to(tl.int64) * H * W * C + ((ph * P + i // P) * W + pw * P + i % P) * C
    dst = out_ptr + (tl.load(rows_ptr + n) + r) * (C * T * P * P) + i
    for c in range(C):
        value = tl.load(lut_ptr + c * 256 + tl.load(src + c, mask=live, other=0).to(tl.int32), mask=live, other=0.0)
        for t in range(T):
            tl.store(dst + (c * T + t) * P * P, value.to(out_ptr.dtype.element_ty), mask=live)


def patchify(pages: torch.Tensor, lut: torch.Tensor, out: torch.Tensor, rows: torch.Tensor, patch: int, merge: int,
             temporal: int) -> None:
    """Write the patches of ``pages`` uint8 [N, H, W, C] (already at the processor's size) into ``out`` [R, C * T * P
    * P], page ``n``'s at rows ``rows[n]`` onwards (int64 [N] on the device), values ``lut[c, pixel]`` (float32
    [C, 256]) in out's dtype."""
    n, h, w, c = pages.shape
    gh, gw = h // patch, w // patch
    if n and gh * gw:
        _patchify_kernel[(gh * gw, n)](pages.contiguous(), lut, rows, out, h, w, gw, P=patch, M=merge, T=temporal,
                                       C=c, BLOCK=triton.next_power_of_2(patch * patch))
