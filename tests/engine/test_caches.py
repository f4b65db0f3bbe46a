"""Byte-bounded LRU behaviour of the vision-feature cache."""

from __future__ import annotations

from glyphserve.engine.caches import ByteLRU


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


def test_zero_capacity_disables_storing():
    lru = ByteLRU(0)
    assert not lru.put("x", 1, 1) and lru.get("x") is None
