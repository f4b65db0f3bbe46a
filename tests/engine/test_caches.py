"""Byte-bounded LRU behaviour of the vision and prefix caches."""

from __future__ import annotations

import torch

from glyphserve.engine.caches import ByteLRU, PrefixCache, PrefixEntry


def test_lru_evicts_least_recent_by_bytes():
    evicted = []
    lru = ByteLRU(100, on_evict=lambda k, v: evicted.append(k))
    lru.put("a", 1, 40)
    lru.put("b", 2, 40)
    assert lru.get("a") == 1  # a is now the most recent
    lru.put("c", 3, 40)
    assert evicted == ["b"] and "a" in lru and "c" in lru and lru.bytes == 80
    assert not lru.put("huge", 4, 101) and "huge" not in lru
    assert lru.get("b") is None
    assert (lru.hits, lru.misses) == (1, 1)


def test_prefix_cache_uses_an_entry_only_for_identical_tokens():
    cache = PrefixCache(10_000)
    kv = torch.zeros(2, 2, 1, 3, 4)
    cache.store("doc", PrefixEntry((1, 2, 3), kv))
    assert cache.lookup("doc", (1, 2, 3)) is not None
    assert cache.lookup("doc", (1, 2, 4)) is None  # another system prompt, same document key
    assert cache.lookup("other", (1, 2, 3)) is None
    assert cache.stats()["reused_tokens"] == 3 and cache.stats()["hits"] == 1


def test_zero_capacity_disables_storing():
    cache = PrefixCache(0)
    cache.store("doc", PrefixEntry((1,), torch.zeros(1, 2, 1, 1, 1)))
    assert cache.lookup("doc", (1,)) is None
