"""The KV block pool's bookkeeping: fixed-size blocks, shared by reference count, found by content, evicted LRU.

The KV of every sequence lives in blocks of ``block_size`` tokens taken from one pool (the tensors are the model
runner's; this module only decides which block holds what). A full block whose tokens are known in advance (the
prompt's) is published under a content hash that chains every token before it (text token ids and page
identities, see ``block_hashes``), so a later sequence with the same prefix (a follow-up question, another session
on the same document, the same pages uploaded twice) takes the same blocks by reference instead of computing them.
A published block is *ready* once its KV is written; a sequence whose prefix runs into blocks still being written
by another waits for them rather than computing a second copy. Blocks nobody references keep their content and
hash, sit in LRU order, and are evicted (their hash dropped) only when a fresh block is needed.

Block 0 is never handed out: padding rows of a CUDA-graph batch write their KV there.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TRASH_BLOCK = 0


def block_hashes(identities: np.ndarray, block_size: int) -> list[bytes]:
    """Content hashes of the full blocks of a token sequence, each chained to the ones before it.

    ``identities`` holds one int64 per token: its id for text, a page-specific value for a page's vision tokens
    (``Sequence`` builds them), so equal hashes mean equal KV."""
    data = np.ascontiguousarray(identities, dtype=np.int64)
    out: list[bytes] = []
    parent = b""
    for end in range(block_size, len(data) + 1, block_size):
        parent = hashlib.blake2b(parent + data[end - block_size : end].tobytes(), digest_size=16).digest()
        out.append(parent)
    return out


@dataclass
class PoolStats:
    blocks: int  # usable blocks (the trash block excluded)
    in_use: int  # referenced by at least one sequence
    cached: int  # unreferenced but holding a published prefix (reusable until evicted)
    free: int  # unreferenced (cached included): what allocation can take
    hit_blocks: int  # blocks taken from the cache instead of computed
    evictions: int
    peak_in_use: int  # the most blocks in use at once since the pool was made or ``reset_peak``


class KVPool:
    """Reference-counted KV blocks with content-addressed prefix sharing and LRU eviction.

    Not thread-safe: the engine's one loop owns it."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least 2 blocks (one is reserved)")
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError("block_size must be a power of two")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refs = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._ready = [False] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        # Unreferenced blocks, least recently released first: never-used ones, then released ones in order.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._cached_free = 0  # free blocks that still hold a published prefix (kept as a count: stats() is read
        # from other threads while the engine's loop changes the free list)
        self.hit_blocks = 0
        self.evictions = 0
        self.peak_in_use = 0

    # --- queries -------------------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    def match(self, hashes: Sequence[bytes]) -> tuple[list[int], bool]:
        """The published blocks holding the longest prefix of ``hashes``, and whether all of them are ready.
        Takes no reference."""
        blocks: list[int] = []
        ready = True
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
            ready = ready and self._ready[block]
        return blocks, ready

    def refs(self, block: int) -> int:
        return self._refs[block]

    def stats(self) -> PoolStats:
        free = len(self._free)
        return PoolStats(self.num_blocks - 1, self.num_blocks - 1 - free, self._cached_free, free, self.hit_blocks,
                         self.evictions, self.peak_in_use)

    def reset_peak(self) -> None:
        self.peak_in_use = self.num_blocks - 1 - len(self._free)

    # --- changes -------------------------------------------------------------------------------------------

    def share(self, blocks: Sequence[int]) -> None:
        """Take a reference to published blocks (a prefix hit)."""
        for block in blocks:
            if self._hash[block] is None:
                raise ValueError(f"block {block} holds no published prefix")
            if self._refs[block] == 0:
                del self._free[block]
                self._cached_free -= 1
            self._refs[block] += 1
        self.hit_blocks += len(blocks)
        self.peak_in_use = max(self.peak_in_use, self.num_blocks - 1 - len(self._free))

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks (one reference each), evicting the least recently used cached ones; None (and no
        change) when fewer than ``n`` are free."""
        if n > len(self._free):
            return None
        out = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            h = self._hash[block]
            if h is not None:
                del self._by_hash[h]
                self._hash[block] = None
                self._cached_free -= 1
                self.evictions += 1
            self._ready[block] = False
            self._refs[block] = 1
            out.append(block)
        self.peak_in_use = max(self.peak_in_use, self.num_blocks - 1 - len(self._free))
        return out

    def publish(self, block: int, h: bytes) -> bool:
        """Announce that ``block`` (referenced, fresh) will hold the prefix ``h``; False if another block already
        does (this one then stays private)."""
        if h in self._by_hash or self._hash[block] is not None:
            return False
        self._by_hash[h] = block
        self._hash[block] = h
        return True

    def mark_ready(self, blocks: Sequence[int]) -> None:
        """Their KV is written: sequences waiting for these prefixes may take them."""
        for block in blocks:
            self._ready[block] = True

    def mark_unwritten(self, blocks: Sequence[int]) -> None:
        """Their KV will not be written after all (the step that was to write it was cut): nobody may take them
        for written, and released they give up their prefix."""
        for block in blocks:
            self._ready[block] = False

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block. A block nobody references becomes free; it keeps its prefix (and
        can be shared again) only if that prefix is ready, else the announcement is withdrawn."""
        for block in blocks:
            refs = self._refs[block] - 1
            if refs < 0:
                raise ValueError(f"block {block} released more often than taken")
            self._refs[block] = refs
            if refs:
                continue
            h = self._hash[block]
            if h is not None and not self._ready[block]:
                del self._by_hash[h]
                self._hash[block] = None
            self._free[block] = None
            if self._hash[block] is not None:
                self._cached_free += 1

    def clear(self) -> None:
        """Forget every cached prefix (referenced blocks stay valid, but are no longer found by content)."""
        for h, block in list(self._by_hash.items()):
            if self._refs[block] == 0:
                self.evictions += 1
                self._cached_free -= 1
            self._hash[block] = None
            del self._by_hash[h]
