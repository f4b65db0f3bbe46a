"""Triton kernels of the rotations: ``rotary.rotate_and_store`` (the language model) and ``rotary.rotate_vision``
(the vision tower), one program per (token, group of heads).

``rotate_and_store``: a program loads its heads' rows of the fused projection (each head's ``d`` values
contiguous, ``d`` padded to a power of two) and, for the rotated dimensions, each value's pair partner
(``j ^ 1``); computes ``x * cos + rotate_half_llm(x) * sin`` in fp32 for the rotated dimensions of query and key
heads (the others and value heads pass through as loaded); writes queries and keys out (and the values, where a
tensor for them is given: a prompt's padded q/k/v), and keys and values to the token's pool slot.

``rotate_vision``: a program loads its heads' query and key rows of a vision block's fused projection, rotates
them over all ``d`` dimensions in halves (``rotate_half``: x[j] pairs with x[(j + d/2) % d]) in fp32, and writes
them token-major, as the HF code's rotated tensors are laid out.

Imported lazily (Triton is needed only on CUDA; the tests run them under Triton's interpreter).
"""

from __future__ import annotations

import triton
import triton.language as tl

from glyphserve.engine.pdl import begin_early, pdl_enabled


@triton.jit
def _rotate_store_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                         stride_qkv, stride_cos,
                         H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, V_OUT: tl.constexpr, PDL: tl.constexpr):
    begin_early(PDL)  # the attention after it launches at once, to prefetch the keys of earlier steps
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    live = (heads < H + 2 * KV)[:, None] & (dims < D)[None, :]
    row = qkv_ptr + t.to(tl.int64) * stride_qkv + heads[:, None] * D
    x = tl.load(row + dims[None, :], mask=live, other=0.0).to(tl.float32)
    turned = dims < ROT
    partner = tl.load(row + (dims ^ 1)[None, :], mask=live & turned[None, :], other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + t.to(tl.int64) * stride_cos + dims, mask=turned, other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + t.to(tl.int64) * stride_cos + dims, mask=turned, other=0.0).to(tl.float32)
    sign = tl.where(dims % 2 == 0, -1.0, 1.0)
    rotated = x * cos[None, :] + partner * (sign * sin)[None, :]
    is_v = (heads >= H + KV)[:, None]
    out = tl.where(is_v | (dims >= ROT)[None, :], x, rotated).to(q_ptr.dtype.element_ty)
    q_row = heads[:, None] * D + dims[None, :]
    tl.store(q_ptr + t.to(tl.int64) * (H * D) + q_row, out, mask=(heads < H)[:, None] & live)
    is_k = ((heads >= H) & (heads < H + KV))[:, None] & live
    k_row = (heads - H)[:, None] * D + dims[None, :]
    tl.store(k_ptr + t.to(tl.int64) * (KV * D) + k_row, out, mask=is_k)
    slot = tl.load(slot_ptr + t).to(tl.int64) * (KV * D)
    tl.store(k_cache_ptr + slot + k_row, out, mask=is_k)
    v_row = (heads - H - KV)[:, None] * D + dims[None, :]
    tl.store(v_cache_ptr + slot + v_row, out, mask=is_v & live)
    if V_OUT:
        tl.store(v_ptr + t.to(tl.int64) * (KV * D) + v_row, out, mask=is_v & live)


def launch(qkv, cos, sin, q, k, v, k_cache, v_cache, slots, n_heads: int, kv_heads: int, head_dim: int,
           heads_per_program: int) -> None:
    """Fill ``q`` [T, H, d], ``k`` [T, KV, d] (their first T rows) and the pool slots ``slots`` [T] of the caches
    from ``qkv`` [T, ...], and with ``v`` (else None) its first T rows with the values."""
    t = qkv.shape[0]
    grid = (t, triton.cdiv(n_heads + 2 * kv_heads, heads_per_program))
    pdl = pdl_enabled(qkv.device)
    _rotate_store_kernel[grid](
        qkv, cos, sin, q, k, v if v is not None else k, k_cache, v_cache, slots, qkv.stride(0), cos.stride(0),
        H=n_heads, KV=kv_heads, D=head_dim, ROT=cos.shape[-1], BLOCK_H=heads_per_program,
        BLOCK_D=triton.next_power_of_2(head_dim), V_OUT=v is not None, PDL=pdl, num_warps=4, launch_pdl=pdl,
    )


# The patches of a page are not specialised on: Triton compiles a variant for an integer argument that is a multiple of
# 16 or 1, and this is the only one of the vision path's kernel arguments that follows the page's shape. On an H200
# a cropped page of 32 x 42 patches (1,344, a multiple of 16) took ~110 ms longer than the others the first time
# (crop-probe-h200.json).
@triton.jit(do_not_specialize=["SEQ"])
def _rotate_vision_kernel(qkv_ptr, cos_ptr, sin_ptr, out_ptr, SEQ, stride_qkv, stride_cos,
                          H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, D)
    live = (heads < H)[:, None] & (dims < D)[None, :]
    s = t % SEQ
    cos = tl.load(cos_ptr + s * stride_cos + dims).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + s * stride_cos + dims).to(tl.float32)[None, :]
    sin = tl.where(dims < D // 2, -1.0, 1.0)[None, :] * sin
    partner = ((dims + D // 2) % D)[None, :]
    q_row = qkv_ptr + t.to(tl.int64) * stride_qkv + heads[:, None] * D
    k_row = q_row + H * D
    dst = out_ptr + t.to(tl.int64) * (2 * H * D) + heads[:, None] * D + dims[None, :]
    q = tl.load(q_row + dims[None, :], mask=live, other=0.0).to(tl.float32) * cos
    q += tl.load(q_row + partner, mask=live, other=0.0).to(tl.float32) * sin
    tl.store(dst, q.to(out_ptr.dtype.element_ty), mask=live)
    k = tl.load(k_row + dims[None, :], mask=live, other=0.0).to(tl.float32) * cos
    k += tl.load(k_row + partner, mask=live, other=0.0).to(tl.float32) * sin
    tl.store(dst + H * D, k.to(out_ptr.dtype.element_ty), mask=live)


def launch_vision(qkv, cos, sin, out, seq: int, heads: int, head_dim: int, heads_per_program: int) -> None:
    """Fill ``out`` [T, 2, heads, d] with the rotated queries and keys of ``qkv`` [T, 3 * heads * d] (T = pages *
    seq) from one page's ``cos``/``sin`` [seq, d]."""
    grid = (qkv.shape[0], triton.cdiv(heads, heads_per_program))
    _rotate_vision_kernel[grid](qkv, cos, sin, out, seq, qkv.stride(0), cos.stride(0), H=heads, D=head_dim,
                                BLOCK_H=heads_per_program, num_warps=4)
