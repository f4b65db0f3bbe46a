"""What answers questions: the model engine, or the embedded extractive backend.

Both expose the same two calls, made only from the scheduler's worker thread:
``stream(job) -> Iterator[StreamEvent | Reply]`` (the engine's text deltas, then the Reply) and
``stream_batch(jobs, admit) -> Iterator[tuple[int, StreamEvent | Reply | GlyphserveError]]`` (the same,
for jobs answered together, each item tagged with its job's index). A backend with ``admits`` set
calls ``admit(free)`` while it runs for more jobs to take in, numbered after the ones before; one
of those that cannot run yields its error instead of a Reply.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from glyphserve.engine.types import Answer, AnswerRequest, CacheReport, StageTimings, StreamEvent
from glyphserve.errors import GlyphserveError
from glyphserve.render import clip_to_tokens, count_text_tokens
from glyphserve.retrieve import BM25Index, Corpus, tokenize
from glyphserve.serve.errors import NO_MODEL_HINT, InvalidRequestError
from glyphserve.serve.retrieval import PageLayout, crop_rows, pages_for_span
from glyphserve.serve.store import UNNAMED

# A local engine steps on one thread of a process whose other threads take requests (HTTP, page choice, planning:
# each holds the GIL for a few ms a question). Python hands the GIL to a waiting thread only after its holder has
# had it this long (5 ms by default): under 64 sessions on an H200, when a round of questions arrived at once, the
# engine's thread waited so long between its launches that an eager pass of a few hundred tokens took 150-200 ms
# of its time. With 0.5 ms the fifteenth session's code served 4,115 concurrent answers a minute (median of three
# rounds) where it served 3,633 and 3,693 without, in other commands the same day (sixteenth session's NOTES).
SWITCH_INTERVAL_S = 0.0005


if TYPE_CHECKING:
    from glyphserve.engine import Engine
    from glyphserve.serve.store import DocumentStore


@dataclass
class ChatJob:
    """One question on its way to a backend: the engine's own request (question, history, settings; the service
    fills its pages from a stored document, the scheduler its ``cancel``), and what serve needs beside it."""

    request: AnswerRequest
    document_id: str | None = None
    documents: list[str] | None = None  # a collection: stored document ids, in order (instead of document_id)
    page_selection: str = "retrieve"  # which pages the model sees when not all fit (glyphserve.retrieve.MODES)
    context: str | None = None  # inline text the extractive backend searches (no document)
    context_pages: list[PageLayout] | None = None  # the pages ``context`` was rendered into, if it was
    pages_shown: list | None = None  # set with the pages: page numbers, or {"document", "page"} for a collection
    planned: object | None = None  # the request planned by the local engine ahead (``Engine.plan``), used once
    # max_tokens as the client sent it (None: not sent): what an extractive answer keeps to (a model's answer keeps
    # to the request's settings, which have a default)
    answer_tokens: int | None = None
    # The stored document whose warm-up prefix this question computes (all its pages, first in the prompt, caches
    # kept), set with the pages: answered, the document is warm.
    warms: str | None = None

    def for_engine(self):
        """What the engine's ``stream_batch`` takes for this job: its plan (once), else the request."""
        planned, self.planned = self.planned, None
        return planned if planned is not None else self.request

    @property
    def document_ids(self) -> list[str]:
        """The stored documents asked about (none for pages sent as images or inline text)."""
        return self.documents or ([self.document_id] if self.document_id is not None else [])


@dataclass
class Citation:
    page: int | None  # 1-based page where the passage starts; None for inline text without its pages
    document: str | None  # the stored document it comes from; None for inline text
    start: int  # [start, end) in the document's source text
    end: int
    text: str
    score: float
    rows: tuple[int, int] | None = None  # top and bottom pixel rows of the crop on that page


@dataclass
class Reply:
    """A finished answer: the engine's ``Answer`` (the extractive backend fills the same fields), the backend
    that gave it and, for extractive answers, the passages it cites."""

    answer: Answer
    backend: str  # "engine" | "openai" | "extractive"
    citations: list[Citation] = field(default_factory=list)
    # The pages in front of the model (engine), or holding the cited passages (extractive): page numbers for one
    # document, {"document", "page"} objects for a collection; None for pages sent as images or inline text
    # without its pages.
    pages_shown: list | None = None
    warm: bool = False  # a document's warm-up at upload, not a user's request (left out of the request metrics)


class Backend(Protocol):
    name: str

    def stream(self, job: ChatJob) -> Iterator[StreamEvent | Reply]: ...

    def stream_batch(
        self, jobs: list[ChatJob], admit: Callable[[int], list[ChatJob]] | None = None
    ) -> Iterator[tuple[int, StreamEvent | Reply | GlyphserveError]]: ...


class EngineBackend:
    """Answers with the vision-language model (``glyphserve.engine.Engine``)."""

    name = "engine"

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.name = getattr(engine, "kind", "engine")  # RemoteEngine: "openai"
        self._switch_interval: float | None = None  # the process's, while this backend's jobs run

    @property
    def admits(self) -> bool:
        """Whether stream_batch takes jobs into the running batch (the local engine's continuous batching)."""
        return hasattr(self.engine, "stream_batch")

    def prepare(self) -> None:
        """Ready the calling thread, the one that will run the jobs: the local engine's cuDNN attention plans are
        kept per thread (``Engine.plan_attention``). While it runs them, the whole process hands the GIL over every
        ``SWITCH_INTERVAL_S`` (until ``release``)."""
        plan = getattr(self.engine, "plan_attention", None)
        if plan is not None:
            plan()
        if self.admits and self._switch_interval is None:
            self._switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_INTERVAL_S)

    def release(self) -> None:
        """The thread that ran the jobs is done: the process's switch interval is what it was before ``prepare``."""
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None

    def stream(self, job: ChatJob) -> Iterator[StreamEvent | Reply]:
        events = self.engine.stream(job.request)
        try:
            for event in events:
                item = self._item(event, job)
                if item is not None:
                    yield item
        finally:
            events.close()  # stops the engine's generation when the consumer stops early

    def stream_batch(
        self, jobs: list[ChatJob], admit: Callable[[int], list[ChatJob]] | None = None
    ) -> Iterator[tuple[int, StreamEvent | Reply | GlyphserveError]]:
        jobs = list(jobs)  # admitted jobs are numbered after these

        def admitted(free: int) -> list:
            more = admit(free)
            jobs.extend(more)
            return [j.for_engine() for j in more]

        requests = [job.for_engine() for job in jobs]
        if admit is None:
            events = self.engine.stream_batch(requests)
        else:
            events = self.engine.stream_batch(requests, admit=admitted)
        try:
            for index, event in events:
                item = event.error if event.channel == "error" else self._item(event, jobs[index])
                if item is not None:
                    yield index, item
        finally:
            events.close()

    def _item(self, event: StreamEvent, job: ChatJob) -> StreamEvent | Reply | None:
        if event.channel == "done":
            # The pages the model read: the first of those handed over, where the engine kept only the pages that
            # fit its context (truncate_pages).
            shown = job.pages_shown[: event.result.pages_used] if job.pages_shown is not None else None
            return Reply(event.result, self.name, pages_shown=shown, warm=job.request.warm)
        return event if event.text or event.logprobs else None


@dataclass
class _Indexed:
    document_id: str | None  # None: inline text
    name: str | None
    text: str
    index: BM25Index
    pages: list[PageLayout]
    tokens: int  # text tokens of ``text``: what a model reading it as text would be prompted with


class ExtractiveBackend:
    """No model: the passages of the source text that best match the question (BM25); over a collection, the
    best passages of all its documents, ranked with the collection's statistics. Its answers count tokens as a
    model's would (the searched text, the conversation and the answer), by the renderer's documented estimate (no
    model, so no tokenizer)."""

    name = "extractive"
    notice = NO_MODEL_HINT

    def __init__(self, store: "DocumentStore | None", top_k: int = 3, cached_documents: int = 16):
        self.store = store
        self.top_k = top_k
        self._cache: OrderedDict[str, _Indexed] = OrderedDict()
        self._cached_documents = cached_documents
        self._lock = threading.Lock()  # forget() comes from the event loop, lookups from the worker

    def forget(self, document_id: str) -> None:
        with self._lock:
            self._cache.pop(document_id, None)

    def _tokens(self, text: str) -> int:
        return count_text_tokens(text)[0] if text else 0

    def _index(self, document_id: str | None, name: str | None, text: str, pages: list[PageLayout]) -> _Indexed:
        return _Indexed(document_id, name, text, BM25Index.from_text(text), pages, self._tokens(text))

    def _indexed(self, job: ChatJob) -> list[_Indexed]:
        if not job.document_ids:
            if not (job.context or "").strip():
                raise InvalidRequestError(
                    "the extractive backend needs text to search: send the document text as a text part before "
                    "the question's or in an earlier message, or ask about an uploaded document (document: ID). "
                    + NO_MODEL_HINT
                )
            return [self._index(None, None, job.context, job.context_pages or [])]
        return [self._document(document_id) for document_id in job.document_ids]

    def _document(self, document_id: str) -> _Indexed:
        with self._lock:
            hit = self._cache.get(document_id)
        if hit is None:
            hit = self._index(document_id, self.store.get(document_id).name, self.store.text(document_id),
                              self.store.layouts(document_id))
        with self._lock:
            self._cache[document_id] = hit
            self._cache.move_to_end(document_id)
            while len(self._cache) > self._cached_documents:
                self._cache.popitem(last=False)
        return hit

    def answer(self, job: ChatJob) -> Reply:
        start = time.perf_counter()
        request = job.request
        documents = self._indexed(job)
        weights = dict.fromkeys(tokenize(request.question), 1.0)
        corpus = Corpus([d.index for d in documents])
        best = sorted((-score, d, p) for d, document in enumerate(documents)
                      for p, score in document.index.scores(weights, corpus).items())[: self.top_k]
        citations, places = [], []  # places: (document, page) of each citation, or None
        for neg, d, p in best:
            document, passage = documents[d], documents[d].index.passages[p]
            page_numbers = pages_for_span(document.pages, passage.start, passage.end)
            page, rows = None, None
            if page_numbers:
                page = page_numbers[0]
                layout = document.pages[page - 1]
                rows = crop_rows(layout, document.text, passage.start, min(passage.end, layout.char_span[1]))
            places.append((d, page) if page_numbers else None)
            citations.append(Citation(page, document.document_id, passage.start, passage.end, passage.text,
                                      round(-neg, 4), rows))
        labels = [self._where(documents, c) for c in citations]
        text, kept, cut = self._clipped(labels, [c.text for c in citations], job.answer_tokens)
        finish = "length" if cut else "stop"
        citations, places = citations[:kept], {p for p in places[:kept] if p is not None}
        if not labels:
            text = "No passage of the document shares words with the question."
        conversation = "\n".join([m.content for m in request.history] + [request.question])
        elapsed = time.perf_counter() - start
        answer = Answer(
            text=text, thinking="", token_ids=[], finish_reason=finish,
            timings=StageTimings(time_to_first_token=elapsed, total=elapsed),
            prompt_tokens=sum(d.tokens for d in documents) + self._tokens(conversation),
            new_tokens=self._tokens(text), vision_tokens=0, pages_used=len(places), cache=CacheReport(),
        )
        shown = None
        if job.document_ids or job.context_pages:
            shown = [n for _, n in sorted(places)] if len(documents) == 1 else [
                {"document": documents[d].document_id, "page": n} for d, n in sorted(places)]
        return Reply(answer, self.name, citations, pages_shown=shown)

    def _clipped(self, labels: list[str], passages: list[str], limit: int | None) -> tuple[str, int, bool]:
        """The answer of ``passages``, each after its page label, how many of them it keeps, and whether it was
        cut: all of them, or as many as ``limit`` tokens hold (a client's max_tokens, by the estimate), the last cut
        at a word; one cut down to its label is left out (its citation too)."""
        pieces = [label + passage for label, passage in zip(labels, passages)]
        text = "\n\n".join(pieces)
        if limit is None or self._tokens(text) <= limit:
            return text, len(pieces), False
        kept: list[str] = []
        for label, piece in zip(labels, pieces):
            joined = "\n\n".join([*kept, piece])
            if self._tokens(joined) > limit:
                rest = clip_to_tokens(joined, limit)[len(joined) - len(piece):]
                if len(rest.rstrip()) > len(label.rstrip()):
                    kept.append(rest)
                break
            kept.append(piece)
        return "\n\n".join(kept), len(kept), True

    @staticmethod
    def _where(documents: list[_Indexed], citation: Citation) -> str:
        if citation.page is None:
            return ""
        if len(documents) == 1:
            return f"[page {citation.page}] "
        name = next(d.name for d in documents if d.document_id == citation.document) or UNNAMED
        return f"[{name}, page {citation.page}] "

    def stream_batch(
        self, jobs: list[ChatJob], admit: Callable[[int], list[ChatJob]] | None = None
    ) -> Iterator[tuple[int, StreamEvent | Reply]]:
        for index, job in enumerate(jobs):
            for item in self.stream(job):
                yield index, item

    def stream(self, job: ChatJob) -> Iterator[StreamEvent | Reply]:
        reply = self.answer(job)
        pieces = reply.answer.text.split("\n\n")
        for i, piece in enumerate(pieces):
            yield StreamEvent("answer", piece + ("\n\n" if i < len(pieces) - 1 else ""))
        yield reply
