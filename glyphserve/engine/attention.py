"""Paged attention: the queries of many sequences against one layer's pool of K/V blocks.

Layout
------
``k_cache`` / ``v_cache`` hold one layer's pool, ``[num_blocks, block_size, kv_heads, head_dim]``. Token ``p`` of
sequence ``i`` sits in physical block ``block_tables[i, p // block_size]`` at slot ``p % block_size``; blocks may be
shared between sequences and may lie anywhere in the pool. The queries of ``S`` sequences are packed one after
another in ``q`` (``[T, n_heads, head_dim]``): sequence ``i`` owns rows ``query_start[i]:query_start[i + 1]``,
which are the last ``q_len`` positions of its ``seq_lens[i]`` keys (their K/V are already in the pool), and query
``j`` sees keys ``0 .. seq_len - q_len + j``. Decode is ``q_len == 1``; a follow-up question after a cached
prefix is a short ``q_len`` with a long ``seq_len``. Rows of ``q`` past ``query_start[S]`` and rows that see no key
(``seq_len`` 0) come out as zeros.

CUDA path (Triton), two launches whose grids depend only on static shapes, so a CUDA graph can hold them:

1. ``_attend_kernel``, grid ``(S * query_tiles, kv_heads, splits)``. A program owns one KV head and a tile of
   ``BLOCK_M`` rows, each row one (query token, query head of that KV head's GQA group) pair: the group's heads (16 for
   GLM-4.1V) share every K/V tile the program loads (read once from memory, not 16 times) and fill the M side of
   ``tl.dot``, which needs at least 16 rows (smaller groups are padded). It walks its split of the sequence's
   keys ``BLOCK_N`` at a time: each key's block number is read from the block table and the key's
   ``head_dim`` values are one contiguous 2 x 128 = 256-byte row, loaded as 16-byte vectors, so pages need not
   be adjacent. Online softmax (exp2, scale folded in) keeps a running max, sum and fp32 accumulator per row;
   the causal mask ``key <= query position`` also cuts the key range's tail. It writes these three as a
   partial result per split.
2. ``_combine_kernel``, grid ``(T, n_heads, parts of a head)``: rescales the splits' partials to their common
   max, sums them and writes the normalised row in ``q``'s dtype (zeros where no key was seen).

``paged_attention_tiles`` takes the first kernel's programs from a list of (sequence, query tile) pairs instead of
sequences x ``query_tiles``: a captured pass (``pass_graphs``) is sized by its bucket's tokens, whatever its chunks'
lengths. With one split (a pass of many prompt tokens) there is nothing to combine there: the first kernel writes
the normalised rows itself, into an output zeroed first for the padding rows no program owns.

Splits (flash-decoding): decode gives only ``S * kv_heads`` programs (2 for one GLM-4.1V row), far too few to
stream a long context through 132 SMs, so each sequence's keys are divided among ``splits`` programs. The count
comes from static numbers only (``plan_launch``): about ``_PROGRAMS_PER_SM`` programs per SM, rounded down, but no
more splits than loop steps in the block table's capacity, and at most ``_MAX_SPLITS``. Measured on an
H200 (GLM shapes, 4,096 keys a row, every split count from 1 to 64 tried): the best counts were 32 for 1 row, 16
for 8, 4 for 32, 2 for 64 and 1 for 128 rows, i.e. ~256 programs for 132 SMs, with 8-25% lost one step away
(consistent with waves: more programs leave a tail, fewer leave SMs idle); 1 row of 16k or 32k keys ran
fastest with 128 splits (of 64, 128, 256), and inside a decode layer (CUDA graph, the rotation before and the
output projection after) one row's 132 splits (two programs an SM) beat 128 by ~0.4 us a layer at 15k keys
(experiments-h200-s21.json). Inside the kernel a split's share is
cut from the sequence's *actual* length (``seq_lens`` is read on the device), so one launch spreads a 4k-token
and a 30k-token row evenly over its programs; a split with no keys writes only an empty max/sum, and the combine
step skips its accumulator. Decode loop steps of 128 keys with 4 warps and 3 pipeline stages were the fastest
of 18 tried alone (32/64/128 keys x 4/8 warps x 2/3/4 stages); but where a split holds about one step (64
splits or more: one or two rows), one stage is faster inside a decode layer: 1.2-1.7 us a layer at W200's 15k
keys, 0.2-0.4 at W50's 3.9k (a pipelined loop's prologue with nothing to overlap). Short prefills use tiles of 64
rows (4 query tokens x 16 heads) and steps of 64 keys (1 x 4,096 + 128 queries: 56 us against 71 with 128-key
steps and 102 with 16-row tiles); the same split rule picked the best count there too. ``max_query_len`` sets
the query tiles per sequence (programs past a sequence's own queries exit at once) and so lowers the split count:
a decode-only step should use ``max_query_len=1``. It must bound every sequence's query count.

Rows that share keys (``paged_attention_rows``, the graph steps of ``ModelRunner``): a graph step is single-token
rows, each its own "sequence", and rows often hold the same first blocks (sessions on one document share its
prefix through the prefix cache; a prompt chunk's rows, one per token, share everything before the chunk). The host
groups consecutive rows whose tables begin alike into tiles of up to ``BLOCK_M / GROUP_PAD`` rows
(``shared_tiles``); one launch (mode SHARED_KEYS, grid ``(rows, kv_heads, splits)``, a program per tile start)
reads the keys a tile's rows all see once for all of them, another (OWN_KEYS) reads each row's keys after those,
and the combine step takes both launches' partials as splits of one. Measured on an H200, 64 decode rows over 16
W50 documents (4 a document): attention 4.3 -> 2.8 ms a step by kernel time (two runs of one day,
docs/benchmarks/rows-profile-h200-s16.json).

Elsewhere (CPU, or no Triton) the op runs ``paged_attention_batched``: plain PyTorch, the single-query sequences
at once and each multi-query one alone (keys gathered and padded to the longest), softmax in fp32;
``paged_attention_reference`` does the same one sequence at a time and is the tests' oracle. Both read
``seq_lens`` on the host, so neither is for CUDA graphs.

The op is ``torch.ops.glyphserve.paged_attention`` (a ``torch.library.custom_op`` that mutates ``out``, with a
fake implementation), so ``torch.compile`` treats it as one opaque call.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch
from torch import Tensor

from glyphserve.engine.pdl import pdl_enabled

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS, Arm: the reference path only
    triton = None

_PROGRAMS_PER_SM = 2  # attention programs per SM that the split count aims for (measured best, see above)
_MAX_SPLITS = 256
_ONE_STAGE_FROM_SPLITS = 64  # decode plans with this many splits or more run their loop unpipelined
_COMBINE_DIMS = 32  # dimensions of a head a combine program takes when a row has many splits (a 128-byte row)
_COMBINE_SPLIT_FROM = 32  # padded split counts from which it does
_DECODE_BLOCK_N = 128  # keys per loop step with one query per sequence
_PREFILL_BLOCK_M = 64  # rows (query tokens x group heads) per program when sequences bring several queries
_PREFILL_BLOCK_N = 64  # keys per loop step then (measured faster than 128 with 64-row tiles)
# _attend_kernel's modes: each sequence's queries over its keys (causal); single-token rows over their own keys,
# from the first one they do not share; tiles of rows over the keys they share; the first mode's programs taken
# from a list of (sequence, query tile) pairs (``paged_attention_tiles``).
_SEQUENCES, _OWN_KEYS, _SHARED_KEYS, _TILES = 0, 1, 2, 3


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                    query_start: Tensor, scale: float, max_query_len: int, out: Tensor | None = None) -> Tensor:
    """Causal attention of each sequence's queries over its paged K/V; returns ``out`` ``[T, n_heads, head_dim]``.

    Triton on CUDA tensors where Triton imports, else ``paged_attention_batched``. No host synchronisation
    on the Triton path (safe inside CUDA graph capture).
    """
    _check(q, k_cache, v_cache, block_tables, seq_lens, query_start, max_query_len)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be like q {tuple(q.shape)} {q.dtype} with contiguous rows")
    torch.ops.glyphserve.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start,
                                         float(scale), int(max_query_len), out)
    return out


def shared_row_tiles(n_heads: int, kv_heads: int) -> int:
    """Rows a tile of ``paged_attention_rows``'s shared-keys launch holds: its 64 query rows over the GQA group's
    heads (4 for GLM-4.1V's 16 heads a KV head)."""
    return max(_PREFILL_BLOCK_M, _next_power_of_2(n_heads // kv_heads)) // _next_power_of_2(n_heads // kv_heads)


def shared_tiles(tables: np.ndarray, seq_lens: np.ndarray, block_size: int,
                 tile_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """How ``paged_attention_rows`` reads a step's single-token rows (host arrays: each row's block table [n, W]
    and key count [n]): consecutive rows whose tables begin with the same block form tiles of up to
    ``tile_rows`` rows. Returns (share, tiles): ``share[r]``, the keys every row of r's tile sees in blocks they
    all hold (whole blocks; 0 in a tile of one row), read once for the tile; ``tiles[r]``, the rows of the tile
    that starts at row r (0 where none starts)."""
    n = len(seq_lens)
    share, tiles = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    if n == 0:
        return share, tiles
    whole = seq_lens // block_size  # blocks a row sees whole
    tables = tables[:, : max(1, int(whole.max()))]
    first = tables[:, 0]
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = first[1:] != first[:-1]
    run_starts = np.flatnonzero(new_run)
    run = np.cumsum(new_run) - 1
    within = np.arange(n) - run_starts[run]
    run_len = np.diff(np.append(run_starts, n))[run]
    lead = within % tile_rows == 0
    starts = np.flatnonzero(lead)
    tiles[starts] = np.minimum(tile_rows, run_len[starts] - within[starts])
    tile_of = np.cumsum(lead) - 1
    same = tables == tables[starts[tile_of]]
    common = np.where(same.all(axis=1), tables.shape[1], same.argmin(axis=1))
    shared = np.minimum.reduceat(np.minimum(common, whole), starts) * block_size
    shared[tiles[starts] == 1] = 0
    share[:] = shared[tile_of]
    return share, tiles


def tile_tokens(n_heads: int, kv_heads: int) -> int:
    """Query tokens in a tile of a launch whose sequences bring several queries (4 for GLM-4.1V's 16 heads a KV
    head)."""
    group_pad = _next_power_of_2(n_heads // kv_heads)
    return max(_PREFILL_BLOCK_M, group_pad) // group_pad


def query_tiles(query_lens: np.ndarray, tokens: int, size: int) -> np.ndarray:
    """``paged_attention_tiles``'s list (host, int32 [size]): for each sequence with ``query_lens[i]`` queries, its
    tiles of ``tokens`` queries as ``i << 16 | tile``, one after another, then -1 (no tile) up to ``size``."""
    counts = -(-np.asarray(query_lens, dtype=np.int64) // tokens)
    total = int(counts.sum())
    if total > size:
        raise ValueError(f"{total} query tiles do not fit a list of {size}")
    seqs = np.repeat(np.arange(len(counts)), counts)
    tiles = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    out = np.full(size, -1, dtype=np.int32)
    out[:total] = seqs << 16 | tiles
    return out


def paged_attention_tiles(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                          query_start: Tensor, tiles: Tensor, scale: float, out: Tensor) -> Tensor:
    """``paged_attention`` with its programs taken from ``tiles`` (``query_tiles``, int32 on q's device), so that
    the launch's size follows the tokens, not the sequences times the longest one's queries: a CUDA graph of a
    pass over many prompt chunks of any lengths (one captured for 2,048 tokens and 256 sequences of up to 512
    queries would otherwise launch 256 x 128 tiles a KV head, nearly all empty). Off the Triton path,
    ``paged_attention`` (the same values, reading the query counts on the host). No host synchronisation."""
    if tiles.dim() != 1 or tiles.dtype != torch.int32 or tiles.device != q.device:
        raise ValueError(f"tiles must be int32 [P] on {q.device}, got {tiles.dtype} {tuple(tiles.shape)} on "
                         f"{tiles.device}")
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be like q {tuple(q.shape)} {q.dtype} with contiguous rows")
    if triton is None or not q.is_cuda:
        longest = int((query_start[1:] - query_start[:-1]).max()) if block_tables.shape[0] else 1
        return paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale, max(1, longest),
                               out=out)
    _check(q, k_cache, v_cache, block_tables, seq_lens, query_start, 1)
    paged_attention_tiles_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start, tiles, scale, out)
    return out


def paged_attention_tiles_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                                 seq_lens: Tensor, query_start: Tensor, tiles: Tensor, scale: float,
                                 out: Tensor) -> None:
    """The Triton path of ``paged_attention_tiles`` (also on CPU tensors under ``TRITON_INTERPRET=1``)."""
    n_heads = q.shape[1]
    _, block_size, kv_heads, _ = k_cache.shape
    group_pad = _next_power_of_2(n_heads // kv_heads)
    capacity = block_tables.shape[1] * block_size
    splits = max(1, min(_PROGRAMS_PER_SM * _sm_count(q.device) // max(1, tiles.shape[0] * kv_heads),
                        -(-capacity // _PREFILL_BLOCK_N), _MAX_SPLITS))
    plan = LaunchPlan(max(_PREFILL_BLOCK_M, group_pad), _PREFILL_BLOCK_N, group_pad, 1, splits)
    _attend_and_combine(q, k_cache, v_cache, block_tables, seq_lens, query_start, tiles, scale, plan, out, _TILES)


def paged_attention_rows(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                         query_start: Tensor, share: Tensor, tiles: Tensor, scale: float, out: Tensor) -> Tensor:
    """``paged_attention`` of single-token rows (``query_start`` is 0..R) where tiles of rows share their first
    keys (``shared_tiles``: ``share`` and ``tiles``, int32 on q's device): each tile reads the keys its rows
    share once, for all of them, and each row reads its own keys after those; the two launches' partial results
    combine as the splits of one. Decode rows of sessions on one document share its prefix, and a prompt chunk's
    rows share everything before them: 64 rows over 16 W50 documents read 256 MB a layer one row at a time.
    Off the Triton path, ``paged_attention`` (the same values). No host synchronisation (CUDA graphs)."""
    rows = q.shape[0]
    for name, t in (("share", share), ("tiles", tiles)):
        if t.shape != (rows,) or t.dtype != torch.int32 or t.device != q.device:
            raise ValueError(f"{name} must be int32 [{rows}] on {q.device}, got {t.dtype} {tuple(t.shape)} on "
                             f"{t.device}")
    if triton is None or not q.is_cuda:
        return paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale, 1, out=out)
    _check(q, k_cache, v_cache, block_tables, seq_lens, query_start, 1)
    paged_attention_rows_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start, share, tiles, scale, out)
    return out


def paged_attention_rows_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                                seq_lens: Tensor, query_start: Tensor, share: Tensor, tiles: Tensor, scale: float,
                                out: Tensor) -> None:
    """The Triton path of ``paged_attention_rows`` (also on CPU tensors under ``TRITON_INTERPRET=1``)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    rows, n_heads, head_dim = q.shape
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"the Triton path needs a power-of-two head_dim >= 16, got {head_dim}")
    _, block_size, kv_heads, _ = k_cache.shape
    capacity = block_tables.shape[1] * block_size
    sms = _sm_count(q.device)
    own = plan_launch(rows, n_heads, kv_heads, 1, capacity, sms)
    group_pad = _next_power_of_2(n_heads // kv_heads)
    block_m = max(_PREFILL_BLOCK_M, group_pad)
    tile_programs = kv_heads * max(1, rows // (block_m // group_pad))  # as if every tile were full
    shared = LaunchPlan(block_m, _PREFILL_BLOCK_N, group_pad, 1,
                        max(1, min(_PROGRAMS_PER_SM * sms // tile_programs, -(-capacity // _PREFILL_BLOCK_N),
                                   _MAX_SPLITS)))
    total = own.splits + shared.splits
    partial_max = torch.empty((rows, n_heads, total), dtype=torch.float32, device=q.device)
    partials = (partial_max, torch.empty_like(partial_max),
                torch.empty((rows, n_heads, total, head_dim), dtype=torch.float32, device=q.device))
    _attend(q, k_cache, v_cache, block_tables, seq_lens, query_start, share, partials, scale, own, 0, total,
            _OWN_KEYS)
    _attend(q, k_cache, v_cache, block_tables, share, tiles, share, partials, scale, shared, own.splits, total,
            _SHARED_KEYS)
    _combine(partials, out, query_start[rows:], total)


def compile_split_variants(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                           query_start: Tensor, scale: float, max_query_len: int) -> None:
    """Compile the Triton kernels for every padded split count a launch of this shape can pick (the combine
    kernel's one compile-time size that varies between launches), so that no request pays for a compile."""
    if triton is None or not q.is_cuda:
        return
    splits = 1
    while splits <= _MAX_SPLITS:
        paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale, max_query_len,
                               out=torch.empty_like(q), splits=splits)
        splits *= 2


def paged_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                              query_start: Tensor, scale: float, max_query_len: int,
                              out: Tensor | None = None) -> Tensor:
    """Plain PyTorch version of ``paged_attention``: gather each sequence's blocks, causal softmax in fp32."""
    _check(q, k_cache, v_cache, block_tables, seq_lens, query_start, max_query_len)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    out.zero_()
    block_size, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    starts, lengths = query_start.tolist(), seq_lens.tolist()
    for i, seq_len in enumerate(lengths):
        q_len = starts[i + 1] - starts[i]
        if q_len > max_query_len:
            raise ValueError(f"sequence {i} has {q_len} queries, more than max_query_len={max_query_len}")
        if q_len == 0 or seq_len == 0:
            continue
        blocks = block_tables[i, : -(-seq_len // block_size)].long()
        keys = k_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, dim=1)  # [L, H, D]
        values = v_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, dim=1)
        queries = q[starts[i] : starts[i + 1]].float()  # [q_len, H, D]
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * scale
        positions = torch.arange(seq_len - q_len, seq_len, device=q.device)
        visible = torch.arange(seq_len, device=q.device)[None, :] <= positions[:, None]  # [q_len, L]
        weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        weights = weights.nan_to_num(0.0)  # queries before position 0 (seq_len < q_len) see no key
        out[starts[i] : starts[i + 1]] = torch.einsum("hqk,khd->qhd", weights, values).to(out.dtype)
    return out


def paged_attention_batched(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start: Tensor,
    scale: float,
    max_query_len: int,
    out: Tensor | None = None,
) -> Tensor:
    """``paged_attention`` in a few batched PyTorch operations (keys gathered and padded to the longest, masked
    out past each sequence's length): the path off CUDA. The single-query sequences (decode rows) go together:
    64 of them on the CPU cost one gather and two matmuls a layer instead of 64 of each. A sequence with several
    queries goes on its own, padded only to its own count (padding 64 decode rows to a 512-token chunk beside
    them would score 64 x 512 queries against every key)."""
    _check(q, k_cache, v_cache, block_tables, seq_lens, query_start, max_query_len)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    out.zero_()
    if block_tables.shape[0] == 0 or q.shape[0] == 0:
        return out
    q_lens = (query_start[1:] - query_start[:-1]).tolist()
    if max(q_lens) > max_query_len:
        raise ValueError(f"a sequence has {max(q_lens)} queries, more than max_query_len={max_query_len}")
    single = [i for i, n in enumerate(q_lens) if n == 1]
    for group in ([single] if single else []) + [[i] for i, n in enumerate(q_lens) if n > 1]:
        index = torch.tensor(group, device=q.device)
        _attend_group(q, k_cache, v_cache, block_tables[index], seq_lens[index].long(), query_start[index].long(),
                      query_start[index + 1].long(), scale, max(q_lens[i] for i in group), out)
    return out


def _attend_group(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                  starts: Tensor, ends: Tensor, scale: float, max_query_len: int, out: Tensor) -> None:
    """Sequences [S] of ``paged_attention_batched`` at once, their queries padded to ``max_query_len``."""
    n_seqs = block_tables.shape[0]
    block_size, kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    group = q.shape[1] // kv_heads
    q_lens = ends - starts
    longest = int(seq_lens.max())
    if longest == 0:
        return
    blocks = block_tables[:, : -(-longest // block_size)].long()
    own = -(-seq_lens // block_size)  # a table's entries past its own blocks may hold anything
    blocks = blocks.where(torch.arange(blocks.shape[1], device=q.device)[None, :] < own[:, None], 0)
    keys = k_cache[blocks].flatten(1, 2)[:, :longest].float()  # [S, L, KV, D]
    values = v_cache[blocks].flatten(1, 2)[:, :longest].float()
    # Slots past a sequence's length were never written (the pool is uninitialised): their weight is 0, but 0 * NaN
    # is NaN, so their values are zeroed (the Triton kernel loads them as 0 the same way).
    written = torch.arange(longest, device=q.device)[None, :] < seq_lens[:, None]  # [S, L]
    values = values.masked_fill(~written[:, :, None, None], 0.0)
    offsets = torch.arange(max_query_len, device=q.device)
    valid = offsets[None, :] < q_lens[:, None]  # [S, Q]
    rows = (starts[:, None] + offsets[None, :]).clamp(max=q.shape[0] - 1)
    queries = q[rows].float().view(n_seqs, max_query_len, kv_heads, group, head_dim)
    scores = torch.einsum("sqkgd,slkd->skgql", queries, keys) * scale
    position = seq_lens[:, None] - q_lens[:, None] + offsets[None, :]  # [S, Q]
    visible = torch.arange(longest, device=q.device)[None, None, :] <= position[:, :, None]  # [S, Q, L]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that see no key
    result = torch.einsum("skgql,slkd->sqkgd", weights, values).reshape(n_seqs, max_query_len, -1, head_dim)
    out[rows[valid]] = result[valid].to(out.dtype)


def _check(q, k_cache, v_cache, block_tables, seq_lens, query_start, max_query_len) -> None:
    """Static-shape checks (no device values read)."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be [T, heads, dim] and k/v caches [blocks, block_size, kv_heads, dim] alike; "
                         f"got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}: head_dim differs or "
                         "query heads are not a multiple of KV heads")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q is {q.dtype} but the caches are {k_cache.dtype}/{v_cache.dtype}")
    n_seqs = block_tables.shape[0]
    if block_tables.dim() != 2 or seq_lens.shape != (n_seqs,) or query_start.shape != (n_seqs + 1,):
        raise ValueError(f"block_tables must be [S, max_blocks], seq_lens [S], query_start [S + 1]; got "
                         f"{tuple(block_tables.shape)}, {tuple(seq_lens.shape)}, {tuple(query_start.shape)}")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens), ("query_start", query_start)):
        if t.dtype != torch.int32 or t.device != q.device:
            raise ValueError(f"{name} must be int32 on {q.device}, got {t.dtype} on {t.device}")
    if max_query_len < 1:
        raise ValueError(f"max_query_len must be >= 1, got {max_query_len}")


@torch.library.custom_op("glyphserve::paged_attention", mutates_args=("out",))
def _paged_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                        query_start: Tensor, scale: float, max_query_len: int, out: Tensor) -> None:
    if q.is_cuda and triton is not None:
        paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale, max_query_len, out)
    else:
        paged_attention_batched(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale, max_query_len,
                                out)


@_paged_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale, max_query_len, out) -> None:
    return None


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # Triton's interpreter on the CPU
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """The Triton path's grid for a batch, from static shapes only."""

    block_m: int  # rows per program: query tokens x the GQA group's heads (padded to a power of two)
    block_n: int  # keys per loop step
    group_pad: int
    query_tiles: int  # programs per sequence and KV head along its queries
    splits: int  # programs per sequence and KV head along its keys

    def stages(self, element_size: int) -> int:
        """Software pipeline stages of the kernel's loop over caches of ``element_size`` bytes a value: one where
        decode rows' splits hold about one step each, and for fp32 caches (checking, not serving: three stages
        took 116-148 KB of shared memory a block, past the 99 KB of sm_86/89 cards, the RTX 3090, A10, RTX 4090
        and L4, where the engine failed at its first launch)."""
        one = element_size >= 4 or (self.block_n == _DECODE_BLOCK_N and self.splits >= _ONE_STAGE_FROM_SPLITS)
        return 1 if one else 3


def plan_launch(n_seqs: int, n_heads: int, kv_heads: int, max_query_len: int, key_capacity: int,
                sm_count: int) -> LaunchPlan:
    """``key_capacity``: keys a block table can address (its width x block size); bounds useful splits."""
    group_pad = _next_power_of_2(n_heads // kv_heads)
    if max_query_len == 1:
        block_m, block_n = max(16, group_pad), _DECODE_BLOCK_N
    else:
        block_m, block_n = max(_PREFILL_BLOCK_M, group_pad), _PREFILL_BLOCK_N
    query_tiles = -(-max_query_len // (block_m // group_pad))
    programs = max(1, n_seqs * query_tiles * kv_heads)
    splits = max(1, min(_PROGRAMS_PER_SM * sm_count // programs, -(-key_capacity // block_n), _MAX_SPLITS))
    return LaunchPlan(block_m, block_n, group_pad, query_tiles, splits)


def paged_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                           query_start: Tensor, scale: float, max_query_len: int, out: Tensor,
                           splits: int | None = None) -> None:
    """The Triton path into ``out`` (also on CPU tensors under ``TRITON_INTERPRET=1``); ``splits`` overrides
    the plan's (tests)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    _, n_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"the Triton path needs a power-of-two head_dim >= 16, got {head_dim}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or block_tables.stride(1) != 1:
        raise ValueError("q, the caches and block_tables need a contiguous last dimension")
    n_seqs = block_tables.shape[0]
    plan = plan_launch(n_seqs, n_heads, kv_heads, max_query_len, block_tables.shape[1] * block_size,
                       _sm_count(q.device))
    if splits is not None:
        plan = dataclasses.replace(plan, splits=splits)
    _attend_and_combine(q, k_cache, v_cache, block_tables, seq_lens, query_start, query_start, scale, plan, out,
                        _SEQUENCES)


def _attend_and_combine(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                        query_start: Tensor, key_start: Tensor, scale: float, plan: LaunchPlan, out: Tensor,
                        mode: int) -> None:
    """``_attend`` (mode SEQUENCES or TILES) into ``out``, through partials and the combine step; in mode TILES
    with one split, straight into ``out``, zeroed first for the rows no program owns (a captured pass's padding).
    The combine step of one split only normalises, and it took 6.6 of a 960-token pass's 40 ms on an H200
    (profile-h200-s27.md: 30,720 programs a layer, every partial written and read back in fp32). Mode SEQUENCES
    keeps it: its launches follow the rotation with programmatic dependent launch (the keys' prefetch before the
    wait), which a memset between them would undo."""
    n_tokens, n_heads, head_dim = q.shape
    n_seqs = block_tables.shape[0]
    if plan.splits == 1 and mode == _TILES:
        out.zero_()
        if n_seqs:
            _attend(q, k_cache, v_cache, block_tables, seq_lens, query_start, key_start, (out, out, out), scale,
                    plan, 0, 1, mode, out=out)
        return
    partial_max = torch.empty((n_tokens, n_heads, plan.splits), dtype=torch.float32, device=q.device)
    partials = (partial_max, torch.empty_like(partial_max),
                torch.empty((n_tokens, n_heads, plan.splits, head_dim), dtype=torch.float32, device=q.device))
    if n_seqs:
        _attend(q, k_cache, v_cache, block_tables, seq_lens, query_start, key_start, partials, scale, plan, 0,
                plan.splits, mode)
    _combine(partials, out, query_start[n_seqs:], plan.splits)


def _attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
            query_start: Tensor, key_start: Tensor, partials: tuple[Tensor, Tensor, Tensor], scale: float,
            plan: LaunchPlan, part_offset: int, part_splits: int, mode: int, out: Tensor | None = None) -> None:
    """One launch of ``_attend_kernel`` over ``block_tables.shape[0]`` sequences (or rows; in mode TILES, over
    the ``key_start.shape[0]`` tiles listed there); with ``out`` (one split), normalised rows straight into it
    (``partials`` unused)."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    pdl = pdl_enabled(q.device)
    programs = key_start.shape[0] if mode == _TILES else block_tables.shape[0] * plan.query_tiles
    _attend_kernel[(programs, kv_heads, plan.splits)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start, key_start, *partials,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), plan.query_tiles, plan.splits, n_heads, part_splits, part_offset,
        q if out is None else out, 0 if out is None else out.stride(0), 0 if out is None else out.stride(1),
        DIRECT=out is not None, GROUP=n_heads // kv_heads, GROUP_PAD=plan.group_pad, HEAD_DIM=head_dim, PAGE=block_size,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PDL=pdl, MODE=mode,
        LINE=line_values(head_dim, k_cache.element_size()), num_warps=4,
        num_stages=plan.stages(k_cache.element_size()), launch_pdl=pdl,
    )


def line_values(head_dim: int, element_size: int) -> int:
    """Values of a key's row in a 128-byte cache line (the attention kernel's prefetch step): the whole row when
    it is shorter."""
    return min(head_dim, 128 // element_size)


def _combine(partials: tuple[Tensor, Tensor, Tensor], out: Tensor, rows: Tensor, splits: int) -> None:
    """Every row's ``splits`` partials into ``out``; rows from ``rows[0]`` (device) on are padding (zeros)."""
    n_tokens, n_heads, head_dim = out.shape
    if not n_tokens:
        return
    pdl = pdl_enabled(out.device)
    splits_pad = max(2, _next_power_of_2(splits))
    # Many splits come with few rows: a row's heads are then split along their dimensions too (a decode step of
    # one row: 128 programs, not 32 that each read all of W200's 119 splits, 61 KB). The part of a head a program
    # combines follows from the split count alone, so ``compile_split_variants`` compiles every variant.
    dims = min(head_dim, _COMBINE_DIMS) if splits_pad >= _COMBINE_SPLIT_FROM else head_dim
    _combine_kernel[(n_tokens, n_heads, head_dim // dims)](
        *partials, out, rows, out.stride(0), out.stride(1), n_heads, splits,
        HEAD_DIM=head_dim, DIMS=dims, SPLITS_PAD=splits_pad, PDL=pdl,
        num_warps=4, launch_pdl=pdl,
    )


if triton is not None:
    from glyphserve.engine.pdl import begin

    # The launch's counts are not specialised on (Triton compiles a variant per integer argument that is 1 or a
    # multiple of 16 otherwise): a new combination of them, which any request can bring, cost a 1.8 s compile
    # on an H200 (a follow-up's 47 queries: 12 query tiles, 11 splits).
    @triton.jit(do_not_specialize=["query_tiles", "splits", "part_splits", "part_offset"])
    def _attend_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, query_start_ptr, key_start_ptr,
        part_max_ptr, part_sum_ptr, part_acc_ptr,
        qk_scale,  # softmax scale * log2(e): the kernel works in exp2
        q_stride_t, q_stride_h,
        k_stride_b, k_stride_s, k_stride_h,
        v_stride_b, v_stride_s, v_stride_h,
        tables_stride, query_tiles, splits, n_heads,
        part_splits, part_offset,  # a row's partials: part_splits slots, this launch's from part_offset
        out_ptr, out_stride_t, out_stride_h,  # DIRECT: the normalised rows go here (one split), no partials
        DIRECT: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
        MODE: tl.constexpr,  # SEQUENCES, OWN_KEYS or SHARED_KEYS (see paged_attention_rows)
        LINE: tl.constexpr,  # values in a 128-byte line of the caches (a head's row, if shorter)
    ):
        # Up to ``begin`` the kernel just before (the rotation, which writes this step's queries and newest keys)
        # may still run, and so may the one before that: only what kernels before those wrote is read here (the
        # step's metadata and block tables, copied or computed before the layers; each earlier kernel had finished
        # when the rotation's predecessor passed its own wait), and it is used after the wait too, so a change that
        # computed them right before the rotation would need the wait first. Programs without queries leave
        # before waiting: they touch nothing.
        TOKENS: tl.constexpr = BLOCK_M // GROUP_PAD  # query tokens per tile
        if MODE == 3:  # key_start_ptr holds each program's (sequence << 16 | query tile), or -1 for none
            entry = tl.load(key_start_ptr + tl.program_id(0))
            seq = tl.where(entry >= 0, entry >> 16, 0)
            tile = tl.where(entry >= 0, entry & 65535, 1 << 20)  # none: a tile past any sequence's queries
        else:
            seq = tl.program_id(0) // query_tiles
            tile = tl.program_id(0) % query_tiles
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        if MODE == 2:  # a tile of rows from this one: query_start holds each tile's row count (0: none starts here)
            q_begin = seq
            q_len = tl.load(query_start_ptr + seq)
        else:
            q_begin = tl.load(query_start_ptr + seq)
            q_len = tl.load(query_start_ptr + seq + 1) - q_begin
        if tile * TOKENS >= q_len:
            return
        seq_len = tl.load(seq_lens_ptr + seq)  # SHARED_KEYS: the keys the tile's rows share
        key_start = 0
        if MODE == 1:  # a row's own keys start after those it shares (read by the SHARED_KEYS launch)
            key_start = tl.load(key_start_ptr + seq)

        rows = tl.arange(0, BLOCK_M)
        token = tile * TOKENS + rows // GROUP_PAD  # query index within the sequence
        head = kv_head * GROUP + rows % GROUP_PAD
        live = (token < q_len) & (rows % GROUP_PAD < GROUP)
        if MODE == 2:  # every row sees every shared key (each row's own position is past them)
            position = tl.where(live, seq_len - 1, -1)
        else:
            position = tl.where(live, seq_len - q_len + token, -1)  # last key this row may see

        # This split's share of the sequence's keys, ending at the tile's last query position (causal).
        per_split = tl.cdiv(tl.cdiv(seq_len - key_start, BLOCK_N), splits) * BLOCK_N
        start = key_start + split * per_split
        if MODE == 2:
            end = tl.minimum(start + per_split, seq_len)
        else:
            end = tl.minimum(start + per_split, seq_len - q_len + tl.minimum(tile * TOKENS + TOKENS, q_len))

        table = tables_ptr + seq * tables_stride
        k_base = k_ptr + kv_head * k_stride_h
        v_base = v_ptr + kv_head * v_stride_h
        if PDL and start < end:
            _prefetch_keys(table, k_base, v_base, start, end, k_stride_b, k_stride_s, v_stride_b, v_stride_s,
                           HEAD_DIM, PAGE, BLOCK_N, LINE)
        begin(PDL)

        part = ((q_begin + token) * n_heads + head) * part_splits + part_offset + split
        dims = tl.arange(0, HEAD_DIM)
        out_rows = out_ptr + (q_begin + token)[:, None] * out_stride_t + head[:, None] * out_stride_h + dims[None, :]
        if start >= end:  # nothing to see here (a short sequence in a launch sized for long ones): no accumulator
            if DIRECT:  # rows that see no key come out as zeros
                tl.store(out_rows, tl.zeros([BLOCK_M, HEAD_DIM], tl.float32).to(out_ptr.dtype.element_ty),
                         mask=live[:, None])
            else:
                tl.store(part_max_ptr + part, tl.full([BLOCK_M], -1e30, tl.float32), mask=live)
                tl.store(part_sum_ptr + part, tl.zeros([BLOCK_M], tl.float32), mask=live)
            return

        q = tl.load(q_ptr + (q_begin + token)[:, None] * q_stride_t + head[:, None] * q_stride_h + dims[None, :],
                    mask=live[:, None], other=0.0)
        # A finite floor, not -inf: a row that sees no key in this split keeps max -1e30 and sum 0, no NaN.
        row_max = tl.full([BLOCK_M], -1e30, tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for first in range(start, end, BLOCK_N):
            keys = first + tl.arange(0, BLOCK_N)
            inside = keys < end
            block = tl.load(table + keys // PAGE, mask=inside, other=0).to(tl.int64)
            slot = keys % PAGE
            k = tl.load(k_base + block[None, :] * k_stride_b + slot[None, :] * k_stride_s + dims[:, None],
                        mask=inside[None, :], other=0.0)  # [HEAD_DIM, BLOCK_N]
            scores = tl.dot(q, k, input_precision=PRECISION) * qk_scale
            scores = tl.where(keys[None, :] <= position[:, None], scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            rescale = tl.exp2(row_max - new_max)
            p = tl.exp2(scores - new_max[:, None])
            row_sum = row_sum * rescale + tl.sum(p, 1)
            v = tl.load(v_base + block[:, None] * v_stride_b + slot[:, None] * v_stride_s + dims[None, :],
                        mask=inside[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            row_max = new_max

        if DIRECT:
            row = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
            tl.store(out_rows, row.to(out_ptr.dtype.element_ty), mask=live[:, None])
        else:
            tl.store(part_max_ptr + part, row_max, mask=live)
            tl.store(part_sum_ptr + part, row_sum, mask=live)
            tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=live[:, None])

    @triton.jit
    def _prefetch_keys(table, k_base, v_base, start, end, k_stride_b, k_stride_s, v_stride_b, v_stride_s,
                       HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, LINE: tl.constexpr):
        """Start the lines of a split's first ``BLOCK_N`` keys and values on their way into L2 while the kernel
        before still runs. Earlier steps wrote all but a step's newest keys; a line that the rotation is writing
        meanwhile is fetched early for nothing (a prefetch is a hint: L2 keeps what the rotation stores)."""
        keys = start + tl.arange(0, BLOCK_N)
        ok = keys < end
        block = tl.load(table + keys // PAGE, mask=ok, other=0).to(tl.int64)
        row = tl.where(ok, keys % PAGE, 0)
        lines = tl.arange(0, HEAD_DIM // LINE) * LINE
        _prefetch_l2(k_base + block[:, None] * k_stride_b + row[:, None] * k_stride_s + lines[None, :])
        _prefetch_l2(v_base + block[:, None] * v_stride_b + row[:, None] * v_stride_s + lines[None, :])

    @triton.jit
    def _prefetch_l2(pointers):
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [pointers],
                                  dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit(do_not_specialize=["splits"])
    def _combine_kernel(
        part_max_ptr, part_sum_ptr, part_acc_ptr, out_ptr, rows_ptr,
        out_stride_t, out_stride_h, n_heads, splits,
        HEAD_DIM: tl.constexpr, DIMS: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr,
    ):
        begin(PDL)
        token = tl.program_id(0)
        head = tl.program_id(1)
        dims = tl.program_id(2) * DIMS + tl.arange(0, DIMS)  # this program's part of the head's dimensions
        parts = tl.arange(0, SPLITS_PAD)
        # Rows from rows_ptr[0] on (padding past the last sequence's queries) have no partials: they combine to
        # zeros.
        ok = (parts < splits) & (token < tl.load(rows_ptr))
        base = (token * n_heads + head) * splits
        maxes = tl.load(part_max_ptr + base + parts, mask=ok, other=-1e30)
        sums = tl.load(part_sum_ptr + base + parts, mask=ok, other=0.0)
        weights = tl.exp2(maxes - tl.max(maxes, 0))
        total = tl.sum(weights * sums, 0)
        seen = ok & (sums > 0)  # empty splits wrote no accumulator
        accs = tl.load(part_acc_ptr + (base + parts)[:, None] * HEAD_DIM + dims[None, :], mask=seen[:, None],
                       other=0.0)
        row = tl.sum(accs * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + token * out_stride_t + head * out_stride_h + dims, row.to(out_ptr.dtype.element_ty))
