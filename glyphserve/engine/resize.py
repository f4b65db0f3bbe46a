"""Pillow's 8-bit bicubic resize, bit for bit, in torch integer arithmetic on whatever device the pages are on.

Pillow (libImaging/Resample.c) resizes in two separable passes. Per output column (then row) it weighs the input
pixels within the filter's support around the mapped centre: the weights are evaluated in double precision,
normalised to sum to one, then rounded half away from zero to fixed point with 22 fraction bits. Each output value
is ``2**21 + sum(pixel * weight)`` in 32-bit integers, shifted right by 22 and clipped to 0..255; the horizontal
pass's result is stored as 8-bit before the vertical pass reads it. A pass whose size does not change is skipped,
and a page more than 100 times taller than wide that shrinks in height is resized vertically first (Pillow's
``Image.resize`` does that to bound memory), which changes the rounding, so it is followed here too.

Here the weights come from the same double-precision formulas in numpy (identical IEEE operations, same order), and
a pass is ``ksize`` gathers of whole rows (columns: of the transposed pages), each multiplied by its integer weight
and summed in int32: the result equals Pillow's exactly on any device. On CUDA a pass is one Triton launch on the
uint8 pages with the same arithmetic (``pixel_kernels.resample``).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

try:
    import triton
except ImportError:  # the torch passes only
    triton = None

PRECISION_BITS = 32 - 8 - 2  # Pillow's: 8 result bits, 2 bits of headroom for negative lobes and overshoot
BICUBIC = int(Image.Resampling.BICUBIC)
_SUPPORT = 2.0  # bicubic's filter support (input pixels either side, at scale 1)
_TALL = 100  # Pillow resizes a page taller than 100x its width vertically first when its height shrinks


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution with a = -0.5, written as Pillow evaluates it (same operations, same order)."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@lru_cache(maxsize=64)
def _coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(index int64 [out, ksize], weight int32 [out, ksize]) of one pass: input index and fixed-point weight of
    each tap (taps past a pixel's support weigh 0 and point at a valid index)."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # C's (int) truncates toward zero; below zero both clamp to 0, so floor is the same here.
    xmin = np.maximum(np.floor(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.floor(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize, dtype=np.int64)
    used = taps[None, :] < xmax[:, None]
    x = (xmin[:, None] + taps[None, :]) - center[:, None] + 0.5
    weights = np.where(used, _bicubic(x * (1.0 / filterscale)), 0.0)
    # Summed left to right like Pillow's loop (np.sum's pairwise order could differ in the last bit).
    total = np.zeros(out_size, dtype=np.float64)
    for t in range(ksize):
        total += weights[:, t]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    fixed = weights * (1 << PRECISION_BITS)
    fixed = np.where(weights < 0, np.trunc(fixed - 0.5), np.trunc(fixed + 0.5)).astype(np.int32)
    index = np.minimum(xmin[:, None] + taps[None, :], in_size - 1)
    return index, fixed


@lru_cache(maxsize=64)
def _device_coefficients(in_size: int, out_size: int, device: torch.device,
                         index_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    index, weight = _coefficients(in_size, out_size)
    return torch.from_numpy(index).to(device, index_dtype), torch.from_numpy(weight).to(device)


def _resize_rows(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """One pass along the rows (dim -3) of int32 pages holding 0..255; the result is clipped to 0..255 like
    Pillow's 8-bit intermediate. Each tap gathers whole rows, contiguous in memory. (On CUDA a pass is one Triton
    launch on the uint8 pages instead: ``_resample``.)"""
    index, weight = _device_coefficients(x.shape[-3], out_size, x.device)
    acc = torch.full((), 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=x.device)
    for t in range(index.shape[1]):
        acc = acc + x.index_select(-3, index[:, t]) * weight[:, t, None, None]
    return (acc >> PRECISION_BITS).clamp_(0, 255)


def _resize_columns(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """One pass along the columns (dim -2): the rows' pass on the transposed pages (gathering whole columns
    is several times faster than gathering pixels)."""
    return _resize_rows(x.transpose(-3, -2).contiguous(), out_size).transpose(-3, -2)


def _resample(pages: torch.Tensor, out_size: int, dim: int) -> torch.Tensor:
    """One pass of uint8 pages [..., H, W, C] along ``dim`` (-3: rows, -2: columns) through the Triton kernel
    (CUDA): the pages seen as [outer, size along dim, inner] with the inner elements contiguous."""
    from glyphserve.engine.pixel_kernels import resample

    index, weight = _device_coefficients(pages.shape[dim], out_size, pages.device, torch.int32)
    shape = list(pages.shape)
    outer = int(np.prod(shape[:dim]))
    inner = int(np.prod(shape[dim + 1 :]))
    out = resample(pages.contiguous().reshape(outer, shape[dim], inner), index, weight, PRECISION_BITS)
    shape[dim] = out_size
    return out.view(shape)


def _torch_pass(x: torch.Tensor, out_size: int, dim: int) -> torch.Tensor:
    return _resize_rows(x, out_size) if dim == -3 else _resize_columns(x, out_size)


def _passes(x: torch.Tensor, height: int, width: int, one_pass) -> torch.Tensor:
    """Pillow's passes over pages [..., H, W, C] in its order, each by ``one_pass(x, size, dim)``: width, then
    height, except for a page over 100 times taller than wide whose height shrinks; a pass whose size stays is
    skipped."""
    in_height, in_width = x.shape[-3], x.shape[-2]
    if in_height > in_width * _TALL and height < in_height:
        return one_pass(one_pass(x, height, -3), width, -2)
    if width != in_width:
        x = one_pass(x, width, -2)
    if height != in_height:
        x = one_pass(x, height, -3)
    return x


def resize_bicubic(pages: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 pages [..., H, W, C] resized to [..., height, width, C] exactly as Pillow's
    ``Image.resize((width, height), Image.BICUBIC)`` on each page, on the pages' device."""
    if pages.dtype != torch.uint8 or pages.dim() < 3:
        raise ValueError(f"expected uint8 pages [..., H, W, C], got {pages.dtype} of shape {tuple(pages.shape)}")
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize to {height}x{width}")
    if tuple(pages.shape[-3:-1]) == (height, width):
        return pages
    if pages.is_cuda and triton is not None:
        return _passes(pages, height, width, _resample).contiguous()
    return _passes(pages.to(torch.int32), height, width, _torch_pass).to(torch.uint8).contiguous()
