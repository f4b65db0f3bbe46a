"""Pixel pages the engine never saw are keyed once their request's first step runs: the keys, hashes, cached
blocks and features end up as if they had been computed at planning."""

from __future__ import annotations

import numpy as np
import pytest

from glyphserve.engine import AnswerRequest, EncodedPage, GenerationSettings
from glyphserve.engine.fingerprints import PageFingerprints, fingerprint
from glyphserve.engine.fingerprints import _places as places
from glyphserve.engine.kv_pool import block_hashes
from glyphserve.engine.preprocess import page_keys
from tests.engine.conftest import make_pages

N = 8


def request(pages, question, **fields):
    return AnswerRequest(pages=pages, question=question, settings=GenerationSettings(max_tokens=N, ignore_eos=True),
                         **fields)


@pytest.fixture(scope="module")
def pages():
    return make_pages([(112, 140), (168, 196)], seed=3)


def test_fingerprint_reads_the_values_at_fixed_places_of_any_layout():
    page = make_pages([(120, 90)], seed=1)[0]
    assert fingerprint(page) == fingerprint(page.copy())
    assert fingerprint(np.asfortranarray(page)) == fingerprint(page)  # no contiguous copy needed
    rows, cols, channels = places(page.shape)
    changed = page.copy()
    changed[rows[7], cols[7], channels[7]] ^= 1
    assert fingerprint(changed) != fingerprint(page)
    assert fingerprint(page[:119]) != fingerprint(page[1:])  # another shape: other places, and the shape itself


def test_new_pixel_pages_are_keyed_later_and_seen_ones_at_once(pages):
    prints = PageFingerprints()
    encoded = EncodedPage(b"\x89PNG not decoded here", 10, 10)
    keys, pending = prints.keys([pages[0], encoded, pages[1]])
    assert keys == [None, encoded.key(), None] and pending is not None
    assert pending.result() == page_keys([pages[0], pages[1]])
    keys, pending = prints.keys([pages[1]])  # seen: the full hash now
    assert pending is None and keys == page_keys([pages[1]])
    fresh = make_pages([(112, 140)], seed=9)
    keys, pending = prints.keys([pages[0], *fresh])  # one seen page: all at once (a prefix may be cached)
    assert pending is None and keys == page_keys([pages[0], *fresh])
    assert prints.keys([encoded]) == ([encoded.key()], None)  # no pixels: nothing to defer


def test_fingerprints_are_forgotten_oldest_first():
    prints = PageFingerprints(remembered=2)
    a, b, c = make_pages([(112, 112)] * 3, seed=5)
    for page in (a, b, c):
        assert prints.keys([page])[1] is not None
    assert prints.keys([c])[1] is None and prints.keys([a])[1] is not None  # a was forgotten: new again


def test_a_planned_sequence_takes_its_keys_and_hashes_when_they_are_known(load_engine, pages):
    engine = load_engine()
    seq = engine.plan(request(pages, "Who?"))
    assert seq.keys_pending is not None and seq.page_keys == [None, None]
    assert len(seq.hashes) == seq.image_offsets[0] // 16  # the blocks before the first page only
    bs = engine.pool.block_size
    assert seq.settle_keys(bs) and seq.keys_pending is None
    assert seq.page_keys == page_keys(pages)
    assert seq.hashes == block_hashes(seq.identities(), bs) and len(seq.hashes) == seq.prompt_len // bs
    again = engine.plan(request(pages, "Where?"))
    assert again.keys_pending is None and again.page_keys == seq.page_keys
    engine.clear_caches(prefix=False)
    assert engine.plan(request(pages, "Where?")).keys_pending is None  # its blocks may still be cached
    engine.clear_caches()
    assert engine.plan(request(pages, "Where?")).keys_pending is not None  # nothing is: new again


def test_uncached_requests_hash_no_page(load_engine, pages, monkeypatch):
    from glyphserve.engine import preprocess

    hashed = []
    digest = preprocess.page_digest
    monkeypatch.setattr(preprocess, "page_digest", lambda page: hashed.append(page.shape) or digest(page))
    engine = load_engine()
    answer = engine.answer(AnswerRequest(pages=pages, question="Who?", settings=GenerationSettings(
        max_tokens=N, ignore_eos=True, use_cache=False)))
    assert answer.new_tokens == N and hashed == []


def test_a_follow_up_finds_the_blocks_and_features_of_pages_keyed_later(load_engine, reference, pages):
    engine = load_engine()
    first = engine.answer(request(pages, "Who?"))
    assert first.cache.vision_misses == 2 and first.cache.prefix_reused_tokens == 0
    follow = engine.answer(request(pages, "Where does the grandmother live?"))
    expected, _ = reference.generate(pages, "Where does the grandmother live?", max_new_tokens=N, ignore_eos=True)
    assert follow.token_ids == expected
    seq = engine.plan(request(pages, "Why?"))
    assert follow.cache.prefix_reused_tokens >= seq.image_end // 16 * 16  # every page's blocks
    keyed = engine.answer(request(pages, "Why?", page_keys=page_keys(pages)))  # the keys planning computes
    assert keyed.cache.prefix_reused_tokens == follow.cache.prefix_reused_tokens
    engine.clear_caches(vision=False)
    again = engine.answer(request(pages, "Who?"))  # features stored under the keys computed later
    assert (again.cache.vision_hits, again.cache.vision_misses, again.token_ids) == (2, 0, first.token_ids)


def test_same_new_pages_in_one_batch_are_encoded_once_and_shared(load_engine, reference, pages):
    engine = load_engine()
    questions = ["Who?", "Who pretended to be the grandmother?"]
    answers = engine.answer_batch([request(pages, q) for q in questions])
    expected = [reference.generate(pages, q, max_new_tokens=N, ignore_eos=True)[0] for q in questions]
    assert [a.token_ids for a in answers] == expected
    assert sum(a.cache.vision_misses for a in answers) == 2
    assert answers[0].cache.prefix_reused_tokens == 0 and answers[1].cache.prefix_reused_tokens > 0
