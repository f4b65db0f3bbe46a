"""The consistent-hash ring and the router's ordering, without processes."""

from __future__ import annotations

import pytest

from glyphserve.errors import ConfigError
from glyphserve.serve.config import ServeConfig
from glyphserve.serve.routing import HashRing, Router, health_url

KEYS = [f"document-{i}" for i in range(4000)]
NODES = ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000", "http://10.0.0.4:8000"]


def _owners(ring: HashRing) -> dict[str, str]:
    return {key: ring.lookup(key) for key in KEYS}


def test_keys_spread_evenly_and_deterministically():
    ring = HashRing(NODES)
    owners = _owners(ring)
    assert owners == _owners(HashRing(list(reversed(NODES))))  # placement does not depend on the order
    for node in NODES:
        share = sum(owner == node for owner in owners.values()) / len(KEYS)
        assert 0.15 < share < 0.35, (node, share)


def test_adding_a_replica_moves_about_one_nth_all_to_it():
    ring = HashRing(NODES[:3])
    before = _owners(ring)
    ring.add(NODES[3])
    after = _owners(ring)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(after[key] == NODES[3] for key in moved)  # nothing moves between the old replicas
    assert 0.15 < len(moved) / len(KEYS) < 0.35  # about 1/4


def test_removing_a_replica_moves_only_its_keys():
    ring = HashRing(NODES)
    before = _owners(ring)
    ring.remove(NODES[1])
    after = _owners(ring)
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == NODES[1]}
    assert 0.15 < len(moved) / len(KEYS) < 0.35
    ring.add(NODES[1])
    assert _owners(ring) == before  # it gets its keys back when it rejoins


def test_preference_is_the_failover_order():
    ring = HashRing(NODES)
    for key in KEYS[:200]:
        order = ring.preference(key)
        assert sorted(order) == sorted(NODES) and order[0] == ring.lookup(key)
        smaller = HashRing([n for n in NODES if n != order[0]])
        assert smaller.lookup(key) == order[1]  # the next on the ring takes over, as if the owner were gone
    assert HashRing().preference("x") == []
    with pytest.raises(LookupError):
        HashRing().lookup("x")


def test_router_puts_unhealthy_replicas_last_and_counts_capacity():
    router = Router(NODES[:3], concurrency=4)
    try:
        assert router.capacity() == 0  # nothing checked yet
        for state in router.replicas.values():
            state.healthy = True
        assert router.capacity() == 12
        key = KEYS[7]
        order = router.candidates(key)
        assert order == HashRing([u + "/v1/chat/completions" for u in NODES[:3]]).preference(key)
        router.mark_down(order[0], "ConnectError")
        assert router.candidates(key) == order[1:] + order[:1]
        assert router.capacity() == 8
        down = next(r for r in router.snapshot() if r["url"] == order[0])
        assert down == {"url": order[0], "healthy": False, "last_error": "ConnectError", "downs": 1, "spilled_in": 0}
    finally:
        router.close()


def test_a_full_owner_spills_to_the_next_replica_in_ring_order():
    router = Router(NODES[:3], concurrency=2)
    try:
        for state in router.replicas.values():
            state.healthy = True
        key = KEYS[11]
        owner, second, third = router.candidates(key)
        assert router.choose(key, {}) == owner
        assert router.choose(key, {owner: 1, second: 0}) == owner  # a free slot: affinity holds
        assert router.choose(key, {owner: 2}) == second  # full: the same next replica every time
        assert router.choose(key, {owner: 2, second: 2}) == third
        assert router.choose(key, {owner: 2, second: 2, third: 5}) == owner  # all full: the owner
        assert router.choose(key, {}, exclude={owner}) == second  # it just failed this request
        router.mark_down(second, "ConnectError")
        assert router.choose(key, {owner: 2}) == third
        spilled = {r["url"]: r["spilled_in"] for r in router.snapshot()}
        assert spilled == {owner: 0, second: 1, third: 2}  # a retry elsewhere is no spill
    finally:
        router.close()


def test_health_url_beside_the_api():
    assert health_url("http://h:8000") == "http://h:8000/health"
    assert health_url("http://h:8000/v1/") == "http://h:8000/health"
    assert health_url("http://h:8000/v1/chat/completions") == "http://h:8000/health"


@pytest.mark.parametrize("settings, message", [
    ({"endpoints": ["http://h:1"]}, "--endpoint needs --backend openai"),
    ({"backend": "openai"}, "at least one --endpoint"),
    ({"backend": "openai", "endpoints": ["http://h:1"], "model": "m"}, "the servers choose their model"),
    ({"gpus": ["0", "1"]}, "--gpus starts one engine per GPU"),
    ({"backend": "openai", "endpoints": ["http://h:1"], "replica_concurrency": 0}, "--replica-concurrency"),
])
def test_scale_out_settings_are_checked(settings, message):
    with pytest.raises(ConfigError, match=message):
        ServeConfig(**settings).validate()
