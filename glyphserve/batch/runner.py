"""The batch loop: prepared documents in, batched answers out, one durable line per item."""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from glyphserve.batch.inputs import BatchDocument
from glyphserve.batch.prefetch import ItemError, PreparedDocument, Prefetcher, RenderOptions
from glyphserve.batch.progress import Progress, format_duration
from glyphserve.batch.results import ResultLog
from glyphserve.errors import ConfigError, EngineOutOfMemoryError

# After this many good batches at a reduced size, try doubling it again (one huge
# document should not slow down the rest of an overnight run).
GROW_BACK_AFTER = 16
# This many questions in a row failing on the engine's side (server down, GPU gone) stops
# the run instead of recording every remaining question as failed; a rerun retries them.
STOP_AFTER_ENGINE_FAILURES = 16


class AnswerBackend(Protocol):
    """What the runner needs from an engine: ``glyphserve.engine.Engine`` or ``RemoteEngine``."""

    def answer_batch(self, requests: list) -> list: ...


@dataclass(frozen=True)
class BatchOptions:
    batch_size: int = 4
    max_new_tokens: int = 512
    workers: int = 1
    prefetch: int | None = None  # documents rendered ahead; default 2 x batch size + workers
    # The engine's vision/prefix caches: a document's questions then share one vision encode and prefix.
    use_cache: bool = True
    ignore_eos: bool = False  # benchmarks: every answer runs to max_new_tokens
    page_selection: str = "retrieve"  # which pages a document too long for the context shows (glyphserve.retrieve)
    render: RenderOptions = field(default_factory=RenderOptions)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be at least 1")
        if self.workers < 0:
            raise ConfigError("--workers must be 0 (render in-process) or more")


@dataclass
class BatchSummary:
    documents: int = 0  # documents with something left to do in this run
    done: int = 0  # questions answered in this run
    failed: int = 0  # questions recorded with an error in this run
    skipped: int = 0  # questions already in the results file
    documents_finished: int = 0
    elapsed_s: float = 0.0
    vision_tokens: int = 0  # the rendered pages of this run's documents
    text_tokens: int = 0  # what the same documents cost as text (render's count)
    prompt_tokens: int = 0  # engine totals over the answered questions
    new_tokens: int = 0
    batch_size: int = 0  # the batch size at the end (lower than asked after out-of-memory)
    interrupted: bool = False
    stopped: str | None = None  # why the run gave up early, if it did

    @property
    def documents_per_minute(self) -> float:
        return self.documents_finished / self.elapsed_s * 60 if self.elapsed_s > 0 else 0.0

    def text(self) -> str:
        state = "interrupted" if self.interrupted else f"stopped ({self.stopped})" if self.stopped else "finished"
        ratio = f" ({self.text_tokens / self.vision_tokens:.1f}x compression)" if self.vision_tokens else ""
        return (
            f"batch {state} in {format_duration(self.elapsed_s)}: {self.done} answered, {self.failed} failed, "
            f"{self.skipped} skipped (already done); {self.documents_finished}/{self.documents} documents, "
            f"{self.documents_per_minute:.2f} docs/min\n"
            f"tokens: {self.vision_tokens} vision for {self.text_tokens} text{ratio}; "
            f"engine: {self.prompt_tokens} prompt, {self.new_tokens} generated; batch size {self.batch_size}"
        )


class _StopRun(Exception):
    pass


@dataclass
class _Item:
    prepared: PreparedDocument
    question: str
    pages_shown: list[int] | None = None  # set when its request is made


class BatchRunner:
    """Answers every (document, question) not yet in ``log``.

    ``load_engine`` is called once rendering has started, so the first pages are being
    prepared while the model loads.
    """

    def __init__(
        self, load_engine: Callable[[], AnswerBackend], log: ResultLog, options: BatchOptions, *, progress_stream=None
    ):
        self.load_engine = load_engine
        self.log = log
        self.options = options
        self.batch_size = options.batch_size
        self._progress_stream = progress_stream
        self._good_batches = 0
        self._engine_failures = 0
        self._left: dict[str, int] = {}

    def run(self, documents: list[BatchDocument]) -> BatchSummary:
        summary = self.summary = BatchSummary(batch_size=self.batch_size)
        todo = []
        for document in documents:
            left = [q for q in document.questions if (document.id, q) not in self.log.done]
            summary.skipped += len(document.questions) - len(left)
            if left:
                todo.append(dataclasses.replace(document, questions=tuple(left)))
                self._left[document.id] = len(left)
        summary.documents = len(todo)
        self.progress = Progress(len(todo), sum(self._left.values()), stream=self._progress_stream)
        if not todo:
            return summary
        window = self.options.prefetch or 2 * self.options.batch_size + self.options.workers
        prefetcher = Prefetcher(todo, self.options.render, workers=self.options.workers, window=window)
        start = time.monotonic()
        queue: deque[_Item] = deque()
        try:
            prefetcher.start()
            self.engine = self.load_engine()
            for prepared in prefetcher:
                if prepared.error is not None:
                    for question in prepared.document.questions:
                        self._record(_Item(prepared, question), None, prepared.error)
                    continue
                summary.vision_tokens += prepared.vision_tokens
                summary.text_tokens += prepared.text_tokens
                queue.extend(_Item(prepared, q) for q in prepared.document.questions)
                while len(queue) >= self.batch_size:
                    self._answer([queue.popleft() for _ in range(self.batch_size)])
            while queue:
                self._answer([queue.popleft() for _ in range(min(self.batch_size, len(queue)))])
        except KeyboardInterrupt:
            summary.interrupted = True
        except _StopRun as stop:
            summary.stopped = str(stop)
        finally:
            prefetcher.close()
            summary.elapsed_s = time.monotonic() - start
            summary.batch_size = self.batch_size
            self.progress.finish()
        return summary

    def _answer(self, items: list[_Item]) -> None:
        """Answer ``items`` in chunks of the current batch size, halving it on out-of-memory."""
        start = 0
        while start < len(items):
            chunk = items[start : start + self.batch_size]
            try:
                answers = self.engine.answer_batch([self._request(item) for item in chunk])
            except EngineOutOfMemoryError as exc:
                if len(chunk) == 1:
                    self._engine_failed(chunk[0], exc)
                    start += 1
                    continue
                self.batch_size = max(1, len(chunk) // 2)
                self._good_batches = 0
                self.progress.note(
                    f"batch: out of GPU memory at batch size {len(chunk)}; retrying at {self.batch_size}"
                )
                continue
            except Exception as exc:  # noqa: BLE001 (one bad item must not fail its neighbours)
                if len(chunk) == 1:
                    self._engine_failed(chunk[0], exc)
                else:
                    for item in chunk:
                        self._answer_alone(item)
                start += len(chunk)
                continue
            for item, answer in zip(chunk, answers, strict=True):
                self._record(item, answer, None)
            self._engine_failures = 0
            start += len(chunk)
            self._maybe_grow(len(chunk))

    def _answer_alone(self, item: _Item) -> None:
        try:
            [answer] = self.engine.answer_batch([self._request(item)])
        except Exception as exc:  # noqa: BLE001 (recorded in the results; the run goes on)
            self._engine_failed(item, exc)
        else:
            self._record(item, answer, None)
            self._engine_failures = 0

    def _engine_failed(self, item: _Item, exc: Exception) -> None:
        error = ItemError.from_exception(exc)
        self._record(item, None, error)
        self._engine_failures = self._engine_failures + 1 if error.retryable else 0
        if self._engine_failures >= STOP_AFTER_ENGINE_FAILURES:
            raise _StopRun(
                f"{self._engine_failures} questions in a row failed on the engine's side "
                f"(last: {error.message}); rerun the same command to retry them"
            )

    def _maybe_grow(self, size: int) -> None:
        if self.batch_size >= self.options.batch_size or size < self.batch_size:
            return
        self._good_batches += 1
        if self._good_batches >= GROW_BACK_AFTER:
            self._good_batches = 0
            self.batch_size = min(self.options.batch_size, self.batch_size * 2)
            self.progress.note(f"batch: trying batch size {self.batch_size} again")

    def _request(self, item: _Item):
        from glyphserve.engine import AnswerRequest, GenerationSettings
        from glyphserve.engine.prompt import page_budget
        from glyphserve.retrieve import select_pages

        prepared = item.prepared
        budget = page_budget(self.engine, [], item.question, self.options.max_new_tokens)
        # A remote engine's tokenizer is not here to count with: every page goes, and the server refuses what
        # does not fit.
        selection = select_pages([prepared.selectable], mode=self.options.page_selection if budget else "all",
                                 question=item.question, budget=budget)
        item.pages_shown = selection.shown()
        return AnswerRequest(
            pages=[prepared.pages[n - 1] for n in item.pages_shown],
            question=item.question,
            page_keys=[f"batch:{prepared.document.id}:{n}" for n in item.pages_shown],
            settings=GenerationSettings(
                max_tokens=self.options.max_new_tokens,
                use_cache=self.options.use_cache,
                ignore_eos=self.options.ignore_eos,
            ),
        )

    def _record(self, item: _Item, answer: Any, error: ItemError | None) -> None:
        prepared = item.prepared
        timings = {**(dataclasses.asdict(answer.timings) if answer is not None else {}), **prepared.timings}
        record: dict[str, Any] = {
            "id": prepared.document.id,
            "question": item.question,
            "answer": answer.text if answer is not None else None,
            "thinking": answer.thinking if answer is not None else None,
            "pages": len(prepared.pages),
            "pages_used": answer.pages_used if answer is not None else None,
            "pages_shown": item.pages_shown if answer is not None else None,
            "vision_tokens": prepared.vision_tokens,
            "text_tokens": prepared.text_tokens,
            "prompt_tokens": answer.prompt_tokens if answer is not None else None,
            "new_tokens": answer.new_tokens if answer is not None else None,
            "finish_reason": answer.finish_reason if answer is not None else None,
            "timings": {name: round(seconds, 4) for name, seconds in timings.items()},
            "kind": prepared.kind,
            "error": error.to_dict() if error is not None else None,
        }
        self.log.append(record)
        if answer is not None:
            self.summary.done += 1
            self.summary.prompt_tokens += answer.prompt_tokens
            self.summary.new_tokens += answer.new_tokens
        else:
            self.summary.failed += 1
        self.progress.item_done(failed=error is not None)
        doc_id = prepared.document.id
        self._left[doc_id] -= 1
        if not self._left[doc_id]:
            self.summary.documents_finished += 1
            self.progress.document_done()

