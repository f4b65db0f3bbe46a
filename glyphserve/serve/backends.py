"""What answers questions: the model engine, or the embedded extractive backend.

Both expose the same two calls, made only from the scheduler's worker thread:
``stream(job) -> Iterator[Delta | Reply]`` (the last item is the Reply) and
``stream_batch(jobs, admit) -> Iterator[tuple[int, Delta | Reply | GlyphserveError]]`` (the same,
for jobs answered together, each item tagged with its job's index). A backend with ``admits`` set
calls ``admit(free)`` while it runs for more jobs to take in, numbered after the ones before; one
of those that cannot run yields its error instead of a Reply.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from glyphserve.errors import GlyphserveError
from glyphserve.serve.errors import NO_MODEL_HINT, InvalidRequestError
from glyphserve.serve.retrieval import BM25Index, PageLayout, crop_rows, pages_for_span

if TYPE_CHECKING:
    from glyphserve.engine import Answer, Engine, Page, StreamEvent
    from glyphserve.serve.store import DocumentStore


@dataclass
class ChatSettings:
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    use_cache: bool = True
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class Turn:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class ChatJob:
    """One question: about a stored document, about given page images, or about inline text."""

    question: str
    history: list[Turn] = field(default_factory=list)
    settings: ChatSettings = field(default_factory=ChatSettings)
    document_id: str | None = None
    pages: list["Page"] = field(default_factory=list)  # what the engine reads
    page_keys: list[str] | None = None  # stable identity of each page (the engine's cache keys), when known
    context: str | None = None  # inline text the extractive backend searches (no document)
    # Polled by the engine every decode step: True stops this job (client gone, deadline passed).
    should_stop: Callable[[], bool] | None = field(default=None, compare=False, repr=False)


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
    text: str
    backend: str  # "engine" | "extractive"
    thinking: str = ""
    finish_reason: str = "stop"
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    cache: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    vision_tokens: int = 0
    citations: list[Citation] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Delta:
    channel: str  # "thinking" | "answer"
    text: str


class Backend(Protocol):
    name: str

    def stream(self, job: ChatJob) -> Iterator[Delta | Reply]: ...

    def stream_batch(
        self, jobs: list[ChatJob], admit: Callable[[int], list[ChatJob]] | None = None
    ) -> Iterator[tuple[int, Delta | Reply | GlyphserveError]]: ...


class EngineBackend:
    """Answers with the vision-language model (``glyphserve.engine.Engine``)."""

    name = "engine"

    def __init__(self, engine: "Engine", model_name: str):
        from glyphserve.engine import AnswerRequest, ChatMessage, GenerationSettings

        self.engine = engine
        self.model_name = model_name
        self._types = AnswerRequest, ChatMessage, GenerationSettings

    @property
    def admits(self) -> bool:
        """Whether stream_batch takes jobs into the running batch (the local engine's continuous batching)."""
        return hasattr(self.engine, "stream_batch")

    def _request(self, job: ChatJob):
        AnswerRequest, ChatMessage, GenerationSettings = self._types
        settings = GenerationSettings(
            max_tokens=job.settings.max_tokens,
            temperature=job.settings.temperature,
            top_p=job.settings.top_p,
            use_cache=job.settings.use_cache,
            seed=job.settings.seed,
            ignore_eos=job.settings.ignore_eos,
        )
        history = [ChatMessage(role=t.role, content=t.content) for t in job.history]
        return AnswerRequest(
            pages=job.pages, question=job.question, history=history,
            page_keys=job.page_keys, settings=settings, cancel=job.should_stop,
        )

    def stream(self, job: ChatJob) -> Iterator[Delta | Reply]:
        events = self.engine.stream(self._request(job))
        try:
            for event in events:
                item = self._item(event)
                if item is not None:
                    yield item
        finally:
            events.close()  # stops the engine's generation when the consumer stops early

    def stream_batch(
        self, jobs: list[ChatJob], admit: Callable[[int], list[ChatJob]] | None = None
    ) -> Iterator[tuple[int, Delta | Reply | GlyphserveError]]:
        requests = [self._request(job) for job in jobs]
        if admit is None:
            events = self.engine.stream_batch(requests)
        else:
            events = self.engine.stream_batch(requests, admit=lambda free: [self._request(j) for j in admit(free)])
        try:
            for index, event in events:
                item = event.error if event.channel == "error" else self._item(event)
                if item is not None:
                    yield index, item
        finally:
            events.close()

    def _item(self, event: "StreamEvent") -> Delta | Reply | None:
        if event.channel == "done":
            return self._reply(event.result)
        return Delta(event.channel, event.text) if event.text else None

    @staticmethod
    def _reply(answer: "Answer") -> Reply:
        t, c = answer.timings, answer.cache
        lookups = c.vision_hits + c.vision_misses
        return Reply(
            text=answer.text,
            thinking=answer.thinking,
            backend="engine",
            finish_reason=answer.finish_reason,
            timings={
                "render": t.render, "preprocess": t.preprocess, "vision": t.vision_encode,
                "prefill": t.prefill, "decode": t.decode, "ttft": t.time_to_first_token, "total": t.total,
            },
            cache={
                "vision_hits": c.vision_hits,
                "vision_misses": c.vision_misses,
                "vision_hit_ratio": c.vision_hits / lookups if lookups else 0.0,
                "prefix_reused_tokens": c.prefix_reused_tokens,
                "prefix_hit_ratio": c.prefix_reused_tokens / answer.prompt_tokens if answer.prompt_tokens else 0.0,
            },
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.new_tokens,
            vision_tokens=answer.vision_tokens,
        )


@dataclass
class _Indexed:
    text: str
    index: BM25Index
    pages: list[PageLayout]


class ExtractiveBackend:
    """No model: the passages of the source text that best match the question (BM25)."""

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

    def _indexed(self, job: ChatJob) -> _Indexed:
        if job.document_id is None:
            if not (job.context or "").strip():
                raise InvalidRequestError(
                    "the extractive backend needs text to search: send the document text before the question "
                    "or chat about an uploaded document. " + NO_MODEL_HINT
                )
            return _Indexed(job.context, BM25Index.from_text(job.context), [])
        with self._lock:
            hit = self._cache.get(job.document_id)
        if hit is None:
            text = self.store.text(job.document_id)
            hit = _Indexed(text, BM25Index.from_text(text), self.store.layouts(job.document_id))
        with self._lock:
            self._cache[job.document_id] = hit
            self._cache.move_to_end(job.document_id)
            while len(self._cache) > self._cached_documents:
                self._cache.popitem(last=False)
        return hit

    def answer(self, job: ChatJob) -> Reply:
        start = time.perf_counter()
        indexed = self._indexed(job)
        citations = []
        for passage, score in indexed.index.search(job.question, self.top_k):
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
        elapsed = time.perf_counter() - start
        return Reply(
            text=text, backend=self.name, timings={"retrieve": elapsed, "total": elapsed},
            completion_tokens=0, citations=citations,
        )

    def stream_batch(
        self, jobs: list[ChatJob], admit: Callable[[int], list[ChatJob]] | None = None
    ) -> Iterator[tuple[int, Delta | Reply]]:
        for index, job in enumerate(jobs):
            for item in self.stream(job):
                yield index, item

    def stream(self, job: ChatJob) -> Iterator[Delta | Reply]:
        reply = self.answer(job)
        pieces = reply.text.split("\n\n")
        for i, piece in enumerate(pieces):
            yield Delta("answer", piece + ("\n\n" if i < len(pieces) - 1 else ""))
        yield reply
