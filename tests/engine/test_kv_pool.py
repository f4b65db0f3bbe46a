"""The KV block pool alone: allocation, sharing, reference counts, eviction order, hash-chain hits, exhaustion."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glyphserve.engine.kv_pool import TRASH_BLOCK, KVPool, block_hashes


def hashes(tokens, block_size=4):
    return block_hashes(np.asarray(tokens, dtype=np.int64), block_size)


def test_hash_chain_covers_full_blocks_and_everything_before_them():
    a = hashes(range(10))
    assert len(a) == 2  # the partial third block has no hash
    assert hashes(range(8)) == a
    b = hashes([0, 1, 2, 3, 9, 5, 6, 7])
    assert b[0] == a[0] and b[1] != a[1]
    c = hashes([9, 1, 2, 3, 4, 5, 6, 7])
    assert c[0] != a[0] and c[1] != a[1]  # same second block, another prefix: another hash


def test_allocation_never_hands_out_the_trash_block_and_refuses_when_short():
    pool = KVPool(5, 4)
    blocks = pool.allocate(4)
    assert TRASH_BLOCK not in blocks and sorted(blocks) == [1, 2, 3, 4]
    assert pool.allocate(1) is None and pool.num_free == 0  # a clear refusal, nothing taken
    pool.release(blocks[:1])
    assert pool.allocate(1) == blocks[:1]


def test_published_blocks_are_shared_by_reference_and_outlive_their_writer():
    pool = KVPool(8, 4)
    h = hashes(range(8))
    first = pool.allocate(3)
    assert [pool.publish(b, x) for b, x in zip(first, h)] == [True, True]
    assert pool.match(h) == (first[:2], False)  # announced, not written yet
    pool.mark_ready(first[:2])
    assert pool.match(h) == (first[:2], True)
    pool.share(first[:2])
    assert pool.refs(first[0]) == 2 and pool.stats().hit_blocks == 2
    pool.release(first)  # the writer finishes
    assert pool.refs(first[0]) == 1 and pool.stats().in_use == 2
    pool.release(first[:2])
    stats = pool.stats()
    assert stats.in_use == 0 and stats.cached == 2  # kept for the next sequence with this prefix
    assert pool.match(h) == (first[:2], True)


def test_peak_in_use_counts_shared_blocks_once():
    pool = KVPool(16, 4)
    h = hashes(range(8))
    writer = pool.allocate(2)
    for b, x in zip(writer, h):
        pool.publish(b, x)
    pool.mark_ready(writer)
    readers = [pool.share(writer) or pool.allocate(1) for _ in range(3)]  # three sessions on one prefix
    assert pool.stats().peak_in_use == 2 + 3
    for own in readers:
        pool.release(writer + own)
    pool.release(writer)
    assert pool.stats().in_use == 0 and pool.stats().peak_in_use == 5
    pool.reset_peak()
    assert pool.stats().peak_in_use == 0


def test_a_second_block_with_the_same_content_stays_private():
    pool = KVPool(8, 4)
    h = hashes(range(4))
    a, b = pool.allocate(1), pool.allocate(1)
    assert pool.publish(a[0], h[0]) and not pool.publish(b[0], h[0])


def test_unwritten_announcements_are_withdrawn_when_released():
    pool = KVPool(8, 4)
    h = hashes(range(4))
    block = pool.allocate(1)
    pool.publish(block[0], h[0])
    pool.release(block)  # cancelled before its KV was written
    assert pool.match(h) == ([], True)


def test_cached_blocks_are_evicted_least_recently_released_first():
    pool = KVPool(4, 2)  # three usable blocks
    h = hashes(range(6), 2)
    blocks = pool.allocate(3)
    for block, x in zip(blocks, h):
        pool.publish(block, x)
    pool.mark_ready(blocks)
    pool.release([blocks[1]])
    pool.release([blocks[0]])
    pool.release([blocks[2]])
    assert pool.allocate(1) == [blocks[1]]  # released first, evicted first
    assert pool.stats().evictions == 1
    assert pool.match(h) == ([blocks[0]], True)  # the chain breaks at the evicted block
    pool.share([blocks[0]])  # a hit takes it off the free list: the next allocation skips it
    assert pool.allocate(1) == [blocks[2]]


def test_releasing_more_than_taken_is_an_error():
    pool = KVPool(4, 2)
    block = pool.allocate(1)
    pool.release(block)
    with pytest.raises(ValueError):
        pool.release(block)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "share", "free"]), st.integers(0, 5), st.integers(1, 3)),
                max_size=60))
def test_random_interleavings_keep_the_books_straight(ops):
    """Reference counts, free list and hash index agree after any mix of allocate/share/release."""
    pool = KVPool(12, 2)
    prefixes = [hashes(np.arange(8) + 100 * k, 2) for k in range(6)]
    held: list[list[int]] = []  # what each simulated sequence holds
    for op, k, n in ops:
        if op == "alloc":
            got = pool.allocate(n)
            if got is None:
                assert pool.num_free < n
                continue
            for block, h in zip(got, prefixes[k]):
                pool.publish(block, h)
            pool.mark_ready(got)
            held.append(got)
        elif op == "share":
            blocks, ready = pool.match(prefixes[k])
            if blocks and ready:
                pool.share(blocks)
                held.append(blocks)
        elif held:
            pool.release(held.pop(k % len(held)))
        refs = {}
        for blocks in held:
            for b in blocks:
                refs[b] = refs.get(b, 0) + 1
        for b in range(1, pool.num_blocks):
            assert pool.refs(b) == refs.get(b, 0)
        stats = pool.stats()
        assert stats.in_use == len(refs) and stats.free == pool.num_blocks - 1 - len(refs)
        assert stats.cached == sum(1 for b in range(1, pool.num_blocks) if not pool.refs(b) and pool._hash[b])
        for prefix in prefixes:  # every hit is a live or cached block holding that prefix
            blocks, _ = pool.match(prefix)
            assert len(set(blocks)) == len(blocks) and TRASH_BLOCK not in blocks
