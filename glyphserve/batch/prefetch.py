"""Ingest and render documents in worker processes, ahead of the engine.

A bounded window of documents is in flight at once, so memory stays flat however many
documents the run has, while the GPU finds pages ready whenever it asks for more.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from glyphserve.batch.inputs import BatchDocument
from glyphserve.engine.types import Page
from glyphserve.errors import WORKER_DIED, GlyphserveError
from glyphserve.retrieve import DocumentPages


@dataclass(frozen=True)
class RenderOptions:
    """How pages are rendered (the same knobs as ``glyphserve render``)."""

    preset: str = "auto"
    dpi: float | None = None
    newline: str | None = None


@dataclass(frozen=True)
class ItemError:
    """A failure recorded in the results; ``retryable`` ones run again on the next run."""

    code: str
    message: str
    retryable: bool = False

    @classmethod
    def from_exception(cls, exc: BaseException) -> ItemError:
        if isinstance(exc, GlyphserveError):
            return cls(exc.code, exc.message, retryable=exc.http_status >= 500)
        # Not a user error: a bug or an environment failure; a rerun after the fix retries it.
        return cls("internal_error", f"{type(exc).__name__}: {exc}", retryable=True)

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


@dataclass
class PreparedDocument:
    """A document ready for the engine (``pages``: pixels, or a scan's page as its PNG file), or the reason it could
    not be prepared."""

    document: BatchDocument
    pages: list[Page] = field(default_factory=list)
    vision_tokens: int = 0
    text_tokens: int = 0  # what the text would cost as plain tokens (render's count)
    kind: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: ItemError | None = None
    selectable: DocumentPages | None = None  # what page selection knows of the pages (when they do not all fit)
    # The document's text and each page's manifest entry (its span of the text, its lines): what extractive answers
    # search and cite pages by (``glyphserve.batch.extractive``).
    text: str = ""
    manifests: list[dict] = field(default_factory=list)


def prepare_document(
    document: BatchDocument, options: RenderOptions, *, render_workers: int | None = None
) -> PreparedDocument:
    """Ingest and render one document; every failure is returned, never raised.

    ``render_workers`` is passed to the renderer (1 inside a pool that already renders
    several documents at once; None lets it use every core for a long text).
    """
    from glyphserve.engine import engine_page
    from glyphserve.ingest import ingest_path, ingest_text
    from glyphserve.render import fit_scans, render_document, resolve_config
    prepared = PreparedDocument(document)
    try:
        start = time.perf_counter()
        if document.path is not None:
            # Each scan becomes its page file as it is read, not all its pixels held until rendered, and goes to the
            # engine as that file (100 A4 scans: 783 MiB at the peak, now 101).
            doc = ingest_path(document.path, keep=fit_scans(options.preset, options.dpi))
        else:
            doc = ingest_text(document.text or "")
        prepared.kind = doc.kind
        ingested = time.perf_counter()
        config = resolve_config(doc.text, options.preset, dpi=options.dpi, newline=options.newline)
        rendered = render_document(doc, config, workers=render_workers)
        prepared.timings = {"ingest": ingested - start, "render": time.perf_counter() - ingested}
        prepared.pages = [engine_page(page) for page in rendered.pages]
        prepared.vision_tokens = rendered.stats.vision_tokens
        prepared.text_tokens = rendered.stats.text_tokens
        prepared.selectable = DocumentPages(doc.text, rendered.pages)
        prepared.text, prepared.manifests = doc.text, [page.manifest() for page in rendered.pages]
    except Exception as exc:  # noqa: BLE001 (recorded per document; the run goes on)
        prepared.error = ItemError.from_exception(exc)
    return prepared


def _init_worker(parent_pid: int) -> None:
    # Ctrl-C reaches the whole process group, and so may SIGTERM (timeout, systemd): only the parent decides
    # what to do with them (it shuts the pool down).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A parent killed outright (SIGKILL, OOM killer) cannot stop its pool: leave with it.
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


@dataclass
class Item:
    """One question about a prepared document."""

    prepared: PreparedDocument
    question: str
    pages_shown: list[int] | None = None  # set when its request is made


class Prefetcher:
    """Yields prepared documents in completion order with at most ``window`` in flight.

    ``start()`` submits the first window right away, so rendering overlaps whatever the
    caller does next (loading the model). ``workers=0`` renders in the calling process.
    """

    def __init__(self, documents: Iterable[BatchDocument], options: RenderOptions, *, workers: int, window: int):
        self._documents = iter(documents)
        self._options = options
        self._workers = workers
        self._window = max(1, window)
        self._pool: ProcessPoolExecutor | None = None
        self._pending: dict[Future, BatchDocument] = {}

    def start(self) -> Prefetcher:
        if self._workers > 0:
            self._fill()
        return self

    def __iter__(self) -> Iterator[PreparedDocument]:
        if self._workers <= 0:
            for document in self._documents:
                yield prepare_document(document, self._options)
            return
        while True:
            self._fill()
            if not self._pending:
                return
            finished, _ = wait(self._pending, return_when=FIRST_COMPLETED)
            for future in finished:
                document = self._pending.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    # A worker died (e.g. killed for memory); the pool cannot be reused.
                    self._shutdown()
                    yield PreparedDocument(
                        document, error=ItemError("render_worker_died", WORKER_DIED, True)
                    )

    def close(self) -> None:
        self._pending.clear()
        self._shutdown()

    def _fill(self) -> None:
        while len(self._pending) < self._window:
            document = next(self._documents, None)
            if document is None:
                return
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self._workers, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker, initargs=(os.getpid(),),
                )
            self._pending[self._pool.submit(prepare_document, document, self._options, render_workers=1)] = document

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
