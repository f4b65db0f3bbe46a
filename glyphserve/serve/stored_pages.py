"""What the service keeps in memory of stored documents' pages between questions: what page selection knows of
each document, each page's key for the engine's caches, and the pages' files (read from the store, then from
memory). Questions are planned on several threads: one lock guards all three."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from glyphserve.engine.types import EncodedPage
from glyphserve.serve.store import DocumentStore

if TYPE_CHECKING:
    from glyphserve.retrieve import DocumentPages

# Documents whose page-selection index (glyphserve.retrieve.DocumentPages) is kept between questions.
SELECTABLE_DOCUMENTS = 32
# Bytes of stored pages' files kept in memory for the next questions about them.
PAGE_FILE_BYTES = 256 << 20


class StoredPages:
    def __init__(self, store: DocumentStore):
        self.store = store
        self._selectables: OrderedDict[str, DocumentPages] = OrderedDict()
        self._keys: dict[str, dict[int, str]] = {}  # document -> page number -> the engine's page key
        self._files: OrderedDict[tuple[str, int], EncodedPage] = OrderedDict()  # (document, number), LRU
        self._file_bytes = 0
        self._lock = threading.Lock()

    def selectable(self, document_id: str) -> DocumentPages:
        """What page selection knows of a stored document, kept for the next questions."""
        from glyphserve.retrieve import DocumentPages, PageFacts

        with self._lock:
            hit = self._selectables.get(document_id)
            if hit is not None:
                self._selectables.move_to_end(document_id)
                return hit
        manifest, text = self.store.manifest(document_id), self.store.text(document_id)
        hit = DocumentPages(text, [PageFacts.from_manifest(p) for p in manifest["pages"]])
        with self._lock:
            self._selectables[document_id] = hit
            while len(self._selectables) > SELECTABLE_DOCUMENTS:
                self._keys.pop(self._selectables.popitem(last=False)[0], None)
        return hit

    def files(self, wanted: list[tuple[str, int]], use_cache: bool = True) -> list[EncodedPage]:
        """The (document, page number) pages' files, those read before from memory (the latest PAGE_FILE_BYTES of
        them) unless ``use_cache`` is off: a question about a stored document read its pages' files and image
        headers every time (on the threads that also take requests: under 64 sessions they held up the engine's)."""
        found: dict[tuple[str, int], EncodedPage] = {}
        with self._lock:
            for key in wanted if use_cache else ():
                page = self._files.get(key)
                if page is not None:
                    self._files.move_to_end(key)
                    found[key] = page
        missing: dict[str, list[int]] = {}
        for document_id, number in wanted:
            if (document_id, number) not in found:
                missing.setdefault(document_id, []).append(number)
        if missing:
            with self.store.reading(*missing):
                for document_id, numbers in missing.items():
                    for number, data in zip(numbers, self.store.pages_bytes(document_id, numbers)):
                        found[document_id, number] = EncodedPage.from_bytes(data)
            with self._lock:
                for document_id, numbers in missing.items() if use_cache else ():
                    if document_id not in self._selectables:  # deleted meanwhile (or evicted): not kept
                        continue
                    for number in numbers:
                        key = (document_id, number)
                        if key not in self._files:
                            self._files[key] = found[key]
                            self._file_bytes += len(found[key].data)
                while self._file_bytes > PAGE_FILE_BYTES:
                    self._file_bytes -= len(self._files.popitem(last=False)[1].data)
        return [found[key] for key in wanted]

    def key(self, document_id: str, number: int, page: EncodedPage) -> str:
        """The page's identity for the engine's caches (the hash of its file, as the engine would compute it for
        every question: 0.3 ms a W50 page), computed once per stored page."""
        with self._lock:
            key = self._keys.get(document_id, {}).get(number)
        if key is None:
            key = page.key()
            with self._lock:
                if document_id in self._selectables:  # kept with what selection knows (deleted or evicted: not)
                    self._keys.setdefault(document_id, {})[number] = key
        return key

    def forget(self, document_id: str) -> None:
        """Drop all kept of a deleted document."""
        with self._lock:
            self._selectables.pop(document_id, None)
            self._keys.pop(document_id, None)
            for key in [k for k in self._files if k[0] == document_id]:
                self._file_bytes -= len(self._files.pop(key).data)
