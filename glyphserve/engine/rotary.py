"""A layer's fused q/k/v projection output to rotated queries and keys, with its K/V stored in the pool; and the
vision tower's rotation (``rotate_vision``).

GLM-4.1V's language model rotates the first ``rot`` (= half) of each head's dimensions in interleaved pairs
(``rotate_half_llm``: the pair (x[2i], x[2i+1]) becomes (-x[2i+1], x[2i])), with per-token cos/sin from its
M-RoPE positions; the rest of each head passes through. ``rotate`` is the HF arithmetic (``apply_rotary_pos_emb``)
on a ``[T, (H + 2 KV) * d]`` projection. ``rotate_and_store`` also writes every token's key and value to its pool
slot; on CUDA it is one Triton kernel for all of it (``rotary_kernel``). Measured on an H200 (``bench profile``)
before it existed: the rotation compiled by Inductor from the HF code took 0.85 ms a layer for a 15k-token prefill
(about 14 times its memory traffic) and two launches a decode step, and the two ``index_copy_`` stores two more.
The kernel computes in fp32 and rounds once (the HF code rounds each product to the model's dtype, so in bf16 the
two differ by a rounding step; in fp32 only where the compiler fuses a multiply and add).
"""

from __future__ import annotations

import torch
from transformers.models.glm4v.modeling_glm4v import apply_rotary_pos_emb, apply_rotary_pos_emb_vision

try:
    import triton
except ImportError:  # the HF arithmetic only
    triton = None

HEADS_PER_PROGRAM = 4  # GLM-4.1V's 32 + 2 + 2 heads: 9 programs a token, so a decode step's token is not one SM's
# From this many rows (a prompt's pass, or a graph step of as many rows), 8 heads a program: on an H200 a W200
# prompt's 15,360 tokens took 125 us a layer against 169 with 4 (143 with 16), 3,840 tokens 32 against 43; one
# token 1.35 us against 1.23 (experiments-h200-s20.json, run 3).
WIDE_FROM_TOKENS, WIDE_HEADS_PER_PROGRAM = 256, 8
VISION_HEADS_PER_PROGRAM = 4  # the vision tower's 12 heads: 3 programs a token


def rotate(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, kv_heads: int, head_dim: int):
    """``qkv`` [T, (H + 2 KV) * d], cos/sin [T, rot] -> q [T, H, d], k [T, KV, d] rotated, v [T, KV, d] (a view)."""
    t = qkv.shape[0]
    q, k, v = qkv.split([n_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = apply_rotary_pos_emb(q.view(t, n_heads, head_dim), k.view(t, kv_heads, head_dim), cos, sin)
    return q, k, v.view(t, kv_heads, head_dim)


def rotate_and_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slots: torch.Tensor, n_heads: int, kv_heads: int, head_dim: int,
                     out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """``rotate``, and token ``i``'s key and value written to pool slot ``slots[i]`` of ``k_cache``/``v_cache``
    ([blocks, block_size, KV, d], contiguous). With ``out`` (contiguous [R >= T, heads, d] for q, k and v) the
    queries, keys and values are written into its first T rows (the values copied too) and views of those rows
    returned. No host synchronisation (CUDA graphs capture it)."""
    if qkv.is_cuda and triton is not None:
        return _rotate_and_store_cuda(qkv, cos, sin, k_cache, v_cache, slots, n_heads, kv_heads, head_dim, out)
    q, k, v = rotate(qkv, cos, sin, n_heads, kv_heads, head_dim)
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, v)
    if out is None:
        return q, k, v
    for dst, src in zip(out, (q, k, v)):
        dst[: src.shape[0]] = src
    return tuple(dst[: q.shape[0]] for dst in out)


def _rotate_and_store_cuda(qkv, cos, sin, k_cache, v_cache, slots, n_heads, kv_heads, head_dim, out):
    from glyphserve.engine.rotary_kernel import launch

    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):  # the kernel addresses slots as slot * KV * d
        raise ValueError("the KV pool's tensors must be contiguous")
    t = qkv.shape[0]
    if out is not None and not all(x.is_contiguous() and x.shape[0] >= t for x in out):
        raise ValueError("rotate_and_store's out tensors must be contiguous and hold every token")
    q, k, v = out if out is not None else (qkv.new_empty((t, n_heads, head_dim)),
                                           qkv.new_empty((t, kv_heads, head_dim)), None)
    if t:
        launch(qkv.contiguous(), cos.contiguous(), sin.contiguous(), q, k, v, k_cache, v_cache, slots, n_heads,
               kv_heads, head_dim, WIDE_HEADS_PER_PROGRAM if t >= WIDE_FROM_TOKENS else HEADS_PER_PROGRAM)
    if v is None:
        v = qkv[:, (n_heads + kv_heads) * head_dim :].view(t, kv_heads, head_dim)
    return q[:t], k[:t], v[:t]


def rotate_vision(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pages: int, heads: int,
                  kernel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A vision block's fused projection ``qkv`` [pages * seq, 3 * heads * d] with one page's cos/sin [seq, d] ->
    q, k (rotated in halves, ``apply_rotary_pos_emb_vision``) and v, each [pages, heads, seq, d] (token-major
    views, the layout attention was given before). With ``kernel`` (CUDA) one Triton launch rotates q and k;
    Inductor's compiled HF arithmetic took 0.3 ms a block for W50's 6 pages on an H200 (29 ms of W200's vision
    tower), about six times its memory traffic. Both compute in fp32 and round once; the kernel may fuse a
    multiply and add that HF rounds apart (fp32 only)."""
    seq, head_dim = cos.shape
    t = pages * seq
    v = qkv.view(t, 3, heads, head_dim)[:, 2]
    if kernel and qkv.is_cuda and triton is not None and head_dim & (head_dim - 1) == 0:
        from glyphserve.engine.rotary_kernel import launch_vision

        out = qkv.new_empty((t, 2, heads, head_dim))
        if t:
            launch_vision(qkv.contiguous(), cos.contiguous(), sin.contiguous(), out, seq, heads, head_dim,
                          VISION_HEADS_PER_PROGRAM)
        q, k = out.unbind(1)
    else:
        q, k, _ = qkv.view(t, 3, heads, head_dim).unbind(1)
        q, k = apply_rotary_pos_emb_vision(q, k, cos.repeat(pages, 1), sin.repeat(pages, 1))
    return tuple(x.reshape(pages, seq, heads, head_dim).transpose(1, 2) for x in (q, k, v))
