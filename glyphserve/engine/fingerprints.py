"""Which pixel pages an engine has seen, by a cheap sparse fingerprint, so that pages it has never seen are keyed
once the device has their request's work, instead of before their request's first step.

A pixel page's identity in the engine's caches is the SHA-256 of all its pixels (``preprocess.page_digest``). A
W200 request's 24 pages are 36 MB: hashed in 4 ms by an H200 host's threads in a loop, 7-18 ms inside a question's
planning (twentieth session), all of it before the request's first step could start. But a page whose pixels the
engine has never hashed cannot be in its caches: its vision features and KV are computed either way, and its key
is needed only to store them for later. So the planner first fingerprints a request's pixel pages (the shape and
``SAMPLES`` values at fixed places, blake2b; tens of microseconds a page); when none of them was seen before, their
full hashes wait (``PendingKeys``) until the request's first step has its pages on their way through the vision
tower (``EngineCore._settle_keys``): then they are computed while the device encodes, and its blocks and features
are stored under them. (Hashing them on the page threads from planning on instead gained ~1 ms of a W200
question's 4-5 ms on an H200 host: the threads slowed the pages' copies to the device.) A fingerprint seen before
(the same page again, or a page that shares it) means the full hashes now, as always: identity is only ever the
full hash, a fingerprint only decides when it is computed, so a collision costs time, never a wrong answer.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict

import numpy as np

from glyphserve.engine.preprocess import page_keys
from glyphserve.engine.types import EncodedPage, Page

SAMPLES = 4096  # pixel values a fingerprint reads (two text pages differ in far more places than it could miss)
REMEMBERED = 1 << 16  # fingerprints kept, most recent first (~10 MB); one forgotten only costs a recomputation


@functools.lru_cache(maxsize=64)
def _places(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``SAMPLES`` fixed (row, column, channel) places of a page shape, in memory order, from a seed of the shape
    (the same places in every process)."""
    h, w, c = shape
    rng = np.random.default_rng(h * 1_000_003 + w * 7 + c)
    flat = np.unique(rng.integers(0, h * w * c, size=SAMPLES))
    return flat // (w * c), flat // c % w, flat % c


def fingerprint(page: np.ndarray) -> bytes:
    """A page's shape and the values at its shape's fixed places, hashed (no copy of the page)."""
    rows, cols, channels = _places(page.shape)
    h = hashlib.blake2b(repr(page.shape).encode(), digest_size=16)
    h.update(page[rows, cols, channels].tobytes())
    return h.digest()


class PendingKeys:
    """The keys of a request's pixel pages, hashed when first asked for (thread-safe)."""

    def __init__(self, pages: list[np.ndarray]):
        self._pages: list[np.ndarray] | None = pages
        self._keys: list[str] = []
        self._lock = threading.Lock()

    def result(self) -> list[str]:
        with self._lock:
            if self._pages is not None:
                self._keys, self._pages = page_keys(self._pages), None
            return self._keys


class PageFingerprints:
    """The fingerprints of the pixel pages an engine planned (thread-safe: requests are planned on several
    threads)."""

    def __init__(self, remembered: int = REMEMBERED):
        self.remembered = remembered
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    def keys(self, pages: list[Page]) -> tuple[list[str | None], PendingKeys | None]:
        """The pages' keys (``preprocess.page_key``), or, when the request has pixel pages and none was seen
        before, the encoded pages' keys with None for the pixel pages, and the pixel pages' keys (in order) to
        compute later. Either way the pixel pages count as seen from now on."""
        pixels = [i for i, p in enumerate(pages) if not isinstance(p, EncodedPage)]
        prints = [fingerprint(pages[i]) for i in pixels]
        with self._lock:
            fresh = bool(prints) and not any(p in self._seen for p in prints)
            for p in prints:
                self._seen[p] = None
                self._seen.move_to_end(p)
            while len(self._seen) > self.remembered:
                self._seen.popitem(last=False)
        if not fresh:
            return page_keys(pages), None
        keys: list[str | None] = [p.key() if isinstance(p, EncodedPage) else None for p in pages]
        return keys, PendingKeys([pages[i] for i in pixels])
