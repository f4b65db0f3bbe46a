"""What answers questions: the model engine, or the embedded extractive backend.

Both expose the same two calls, made only from the scheduler's worker thread:
``stream(job) -> Iterator[StreamEvent | Reply]`` (the engine's text deltas, then the Reply) and
``stream_batch(jobs, admit) -> Iterator[tuple[int, StreamEvent | Reply | GlyphserveError]]`` (the same,
for jobs answered together, each item tagged with its job's index). A backend with ``admits`` set
calls ``admit(free)`` while it runs for more jobs to take in, numbered after the ones before; one
of those that cannot run yields its error instead of a Reply.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from glyphserve.engine.types import Answer, AnswerRequest, CacheReport, StageTimings, StreamEvent
from glyphserve.errors import GlyphserveError
from glyphserve.render import count_text_tokens
from glyphserve.serve.errors import NO_MODEL_HINT, InvalidRequestError
from glyphserve.serve.retrieval import BM25Index, PageLayout, crop_rows, pages_for_span

if TYPE_CHECKING:
    from glyphserve.engine import Engine
    from glyphserve.serve.store import DocumentStore


@dataclass
class ChatJob:
    """One question on its way to a backend: the engine's own request (question, history, settings; the service
    fills its pages from a stored document, the scheduler its ``cancel``), and what serve needs beside it."""

    request: AnswerRequest
    document_id: str | None = None
    context: str | None = None  # inline text the extractive backend searches (no document)


@dataclass
class Citation:
    page: int | None  # 1-based page where the passage starts; None for inline text
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
        self.name = "openai" if getattr(engine, "router", None) is not None else "engine"

    @property
    def admits(self) -> bool:
        """Whether stream_batch takes jobs into the running batch (the local engine's continuous batching)."""
        return hasattr(self.engine, "stream_batch")

    def stream(self, job: ChatJob) -> Iterator[StreamEvent | Reply]:
        events = self.engine.stream(job.request)
        try:
            for event in events:
                item = self._item(event)
                if item is not None:
                    yield item
        finally:
            events.close()  # stops the engine's generation when the consumer stops early

    def stream_batch(
        self, jobs: list[ChatJob], admit: Callable[[int], list[ChatJob]] | None = None
    ) -> Iterator[tuple[int, StreamEvent | Reply | GlyphserveError]]:
        requests = [job.request for job in jobs]
        if admit is None:
            events = self.engine.stream_batch(requests)
        else:
            events = self.engine.stream_batch(requests, admit=lambda free: [j.request for j in admit(free)])
        try:
            for index, event in events:
                item = event.error if event.channel == "error" else self._item(event)
                if item is not None:
                    yield index, item
        finally:
            events.close()

    def _item(self, event: StreamEvent) -> StreamEvent | Reply | None:
        if event.channel == "done":
            return Reply(event.result, self.name)
        return event if event.text or event.logprobs else None


@dataclass
class _Indexed:
    text: str
    index: BM25Index
    pages: list[PageLayout]
    tokens: int  # text tokens of ``text``: what a model reading it as text would be prompted with


class ExtractiveBackend:
    """No model: the passages of the source text that best match the question (BM25). Its answers count tokens
    as a model's would (the searched text, the conversation and the answer), with ``tokenizer`` when given, else
    with the renderer's documented estimate."""

    name = "extractive"
    notice = NO_MODEL_HINT

    def __init__(self, store: "DocumentStore | None", top_k: int = 3, cached_documents: int = 16,
                 tokenizer: object | None = None):
        self.store = store
        self.top_k = top_k
        self.tokenizer = tokenizer
        self._cache: OrderedDict[str, _Indexed] = OrderedDict()
        self._cached_documents = cached_documents
        self._lock = threading.Lock()  # forget() comes from the event loop, lookups from the worker

    def forget(self, document_id: str) -> None:
        with self._lock:
            self._cache.pop(document_id, None)

    def _tokens(self, text: str) -> int:
        return count_text_tokens(text, self.tokenizer)[0] if text else 0

    def _index(self, text: str, pages: list[PageLayout]) -> _Indexed:
        return _Indexed(text, BM25Index.from_text(text), pages, self._tokens(text))

    def _indexed(self, job: ChatJob) -> _Indexed:
        if job.document_id is None:
            if not (job.context or "").strip():
                raise InvalidRequestError(
                    "the extractive backend needs text to search: send the document text before the question "
                    "or chat about an uploaded document. " + NO_MODEL_HINT
                )
            return self._index(job.context, [])
        with self._lock:
            hit = self._cache.get(job.document_id)
        if hit is None:
            hit = self._index(self.store.text(job.document_id), self.store.layouts(job.document_id))
        with self._lock:
            self._cache[job.document_id] = hit
            self._cache.move_to_end(job.document_id)
            while len(self._cache) > self._cached_documents:
                self._cache.popitem(last=False)
        return hit

    def answer(self, job: ChatJob) -> Reply:
        start = time.perf_counter()
        request = job.request
        indexed = self._indexed(job)
        citations = []
        for passage, score in indexed.index.search(request.question, self.top_k):
            page_numbers = pages_for_span(indexed.pages, passage.start, passage.end)
            page, rows = None, None
            if page_numbers:
                page = page_numbers[0]
                layout = indexed.pages[page - 1]
                rows = crop_rows(layout, indexed.text, passage.start, min(passage.end, layout.char_span[1]))
            citations.append(Citation(page, passage.start, passage.end, passage.text, round(score, 4), rows))
        if citations:
            text = "\n\n".join(
                (f"[page {c.page}] " if c.page is not None else "") + c.text for c in citations
            )
        else:
            text = "No passage of the document shares words with the question."
        conversation = "\n".join([m.content for m in request.history] + [request.question])
        elapsed = time.perf_counter() - start
        answer = Answer(
            text=text, thinking="", token_ids=[], finish_reason="stop",
            timings=StageTimings(time_to_first_token=elapsed, total=elapsed),
            prompt_tokens=indexed.tokens + self._tokens(conversation), new_tokens=self._tokens(text),
            vision_tokens=0, pages_used=len({c.page for c in citations if c.page is not None}), cache=CacheReport(),
        )
        return Reply(answer, self.name, citations)

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
