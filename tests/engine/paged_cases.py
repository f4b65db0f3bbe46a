"""Random paged-attention inputs shared by the reference tests and the Triton-interpreter run."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    name: str
    n_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    seq_lens: tuple[int, ...]
    query_lens: tuple[int, ...]  # 0-length sequences write nothing; seq_len 0 rows come out as zeros
    dtype: torch.dtype = torch.float32
    padding_rows: int = 0  # rows of q past the last sequence's queries
    interpreted: bool = True  # also run through the Triton interpreter (fp32/fp16 only: its bf16 dot is wrong)
    splits: int | None = None  # the interpreter run's KV splits (None: the op's own choice, 1 on a CPU)


CASES = [
    Case("decode-group2", 4, 2, 32, 16, (5, 40, 0, 100), (1, 1, 1, 1), splits=3),
    Case("decode-group16", 32, 2, 128, 16, (300, 17, 1), (1, 1, 1), interpreted=False),
    Case("decode-group16-one-kv-head", 16, 1, 64, 16, (150, 17), (1, 1), splits=2),
    # as many splits as one decode row gets on a GPU (most of them empty here): the combine step then takes each
    # head in parts of its dimensions
    Case("decode-many-splits-heads-in-parts", 16, 1, 64, 16, (700, 33), (1, 1), splits=40),
    Case("decode-group1-block32", 2, 2, 16, 32, (33, 64, 7), (1, 1, 1)),
    Case("mixed-prefill-decode", 4, 2, 32, 16, (70, 33, 0, 9), (5, 1, 2, 3), padding_rows=2, splits=2),
    Case("prefill-group16-block32", 32, 2, 128, 32, (130, 40), (20, 1), interpreted=False),
    Case("prefill-group16-block32-small", 16, 1, 32, 32, (70, 40), (5, 1), splits=2),
    Case("whole-prompt-group1", 2, 2, 16, 16, (3, 20), (3, 20), interpreted=False),
    Case("group3-queries-past-keys", 6, 2, 32, 16, (40, 2), (4, 4), splits=5),
    Case("fp16-decode-prefill", 4, 2, 32, 16, (50, 90), (1, 6), dtype=torch.float16, splits=3),
    Case("bf16-mixed", 32, 2, 64, 16, (200, 31, 0), (1, 12, 1), dtype=torch.bfloat16, interpreted=False),
]


@dataclass
class Inputs:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start: torch.Tensor
    scale: float
    max_query_len: int
    zero_rows: torch.Tensor  # rows the op must write as zeros (padding, or sequences that see no key)

    @property
    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.query_start, self.scale,
                self.max_query_len)


def make_case(case: Case, seed: int) -> Inputs:
    """Blocks scattered through a pool with spare blocks; table entries past a sequence's length are garbage."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // case.block_size) for n in case.seq_lens]
    width = max(blocks_needed) + 2
    num_blocks = sum(blocks_needed) + 5
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    # A column slice of a wider table (row stride > width), as a runner's preallocated table would be.
    tables = torch.randint(-(2**20), 2**20, (len(case.seq_lens), width + 3), generator=gen, dtype=torch.int32)
    tables = tables[:, :width]
    used = 0
    for i, n in enumerate(blocks_needed):
        tables[i, :n] = order[used : used + n]
        used += n
    shape = (num_blocks, case.block_size, case.kv_heads, case.head_dim)
    k_cache = torch.randn(shape, generator=gen).to(case.dtype)
    v_cache = torch.randn(shape, generator=gen).to(case.dtype)
    counts = torch.tensor((0, *case.query_lens))
    query_start = counts.cumsum(0).to(torch.int32)
    n_rows = int(query_start[-1]) + case.padding_rows
    # q as a slice of a wider projection output (row stride > heads x head_dim), as after a fused QKV matmul.
    qkv = torch.randn((n_rows, case.n_heads + 2 * case.kv_heads, case.head_dim), generator=gen).to(case.dtype)
    q = qkv[:, : case.n_heads]
    zero = torch.zeros(n_rows, dtype=torch.bool)
    zero[int(query_start[-1]) :] = True
    for i, (seq_len, q_len) in enumerate(zip(case.seq_lens, case.query_lens)):
        first = int(query_start[i])
        blind = min(q_len, max(0, q_len - seq_len))  # queries whose position is below 0
        zero[first : first + blind] = True
    return Inputs(q, k_cache, v_cache, tables, torch.tensor(case.seq_lens, dtype=torch.int32), query_start,
                  case.head_dim**-0.5, max(1, *case.query_lens), zero)


@dataclass
class RowsCase:
    """Single-token rows for ``paged_attention_rows``: block tables that share leading blocks the way a step's rows
    do (sessions on one document, a prompt chunk's rows one per token), a row of its own, and a padding row."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    tables: torch.Tensor  # [R, W] int32, a column slice of a wider table
    seq_lens: torch.Tensor  # [R] int32
    query_start: torch.Tensor  # 0..R
    scale: float


def make_rows_case(n_heads: int = 32, kv_heads: int = 2, head_dim: int = 16, block_size: int = 4,
                   seed: int = 3) -> RowsCase:
    gen = torch.Generator().manual_seed(seed)
    doc = [7, 2, 9, 4]  # a document's prefix blocks, shared by five sessions and by a chunk's rows
    rows = [(doc + [20 + 2 * r, 21 + 2 * r], 17 + r) for r in range(5)]  # 4 whole blocks, then their own
    rows.append(([30, 31, 32], 10))  # a session of its own
    rows += [(doc[:3] + [40, 41], 14 + j) for j in range(3)]  # a chunk's rows: 14, 15, 16 keys
    rows += [([50, 51, 52, 53], 16)] * 2  # two sessions that share every key they have (no keys of their own)
    rows.append(([0], 1))  # padding
    width = 7
    tables = torch.randint(0, 64, (len(rows), width + 2), generator=gen, dtype=torch.int32)[:, :width]
    for i, (blocks, _) in enumerate(rows):
        tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    shape = (64, block_size, kv_heads, head_dim)
    return RowsCase(
        q=torch.randn((len(rows), n_heads, head_dim), generator=gen),
        k_cache=torch.randn(shape, generator=gen), v_cache=torch.randn(shape, generator=gen),
        tables=tables, seq_lens=torch.tensor([n for _, n in rows], dtype=torch.int32),
        query_start=torch.arange(len(rows) + 1, dtype=torch.int32), scale=head_dim**-0.5,
    )
