"""The batch loop: prepared documents in, batched answers out, one durable line per item."""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from glyphserve.batch.extractive import ExtractiveAnswers
from glyphserve.batch.inputs import BatchDocument
from glyphserve.batch.prefetch import Item, ItemError, Prefetcher, RenderOptions
from glyphserve.batch.progress import Progress, format_duration
from glyphserve.batch.results import ResultLog, item_record
from glyphserve.engine.commands import in_cli_words
from glyphserve.errors import ConfigError, EngineOutOfMemoryError

# After this many good batches at a reduced size, try doubling it again (one huge
# document should not slow down the rest of an overnight run).
GROW_BACK_AFTER = 16
# This many questions in a row failing on the engine's side (server down, GPU gone) stops
# the run instead of recording every remaining question as failed; a rerun retries them.
STOP_AFTER_ENGINE_FAILURES = 16


class AnswerBackend(Protocol):
    """What the runner needs from an engine: ``glyphserve.engine.Engine`` or ``RemoteEngine`` (or, answering from
    the items' text instead of their pages, ``answer_items``: ``glyphserve.batch.extractive.ExtractiveAnswers``)."""

    def answer_batch(self, requests: list) -> list: ...


@dataclass(frozen=True)
class BatchOptions:
    batch_size: int = 4
    max_new_tokens: int = 512
    # Sampling, as GenerationSettings takes it (checked by the command line: glyphserve.engine.commands.check_sampling).
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
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
    extractive: bool = False  # no model answered: passages of the text (the rows' token counts are estimates)
    interrupted: bool = False
    stopped: str | None = None  # why the run gave up early, if it did

    @property
    def documents_per_minute(self) -> float:
        return self.documents_finished / self.elapsed_s * 60 if self.elapsed_s > 0 else 0.0

    def text(self) -> str:
        state = "interrupted" if self.interrupted else f"stopped ({self.stopped})" if self.stopped else "finished"
        ratio = f" ({self.text_tokens / self.vision_tokens:.1f}x compression)" if self.vision_tokens else ""
        if self.extractive:
            engine = "no model ran: the answers are passages of the documents' text (extractive)"
        else:
            engine = f"engine: {self.prompt_tokens} prompt, {self.new_tokens} generated; batch size {self.batch_size}"
        return (
            f"batch {state} in {format_duration(self.elapsed_s)}: {self.done} answered, {self.failed} failed, "
            f"{self.skipped} skipped (already done); {self.documents_finished}/{self.documents} documents, "
            f"{self.documents_per_minute:.2f} docs/min\n"
            f"tokens: {self.vision_tokens} vision for {self.text_tokens} text{ratio}; {engine}"
        )


class StopRun(Exception):
    """Too many questions in a row failed on the engine's side: the run gives up (a rerun retries them)."""


def pending(documents: list[BatchDocument], log: ResultLog) -> tuple[list[BatchDocument], int]:
    """The documents with questions not yet in ``log`` (only those questions), and how many were skipped."""
    todo, skipped = [], 0
    for document in documents:
        left = [q for q in document.questions if (document.id, q) not in log.done]
        skipped += len(document.questions) - len(left)
        if left:
            todo.append(dataclasses.replace(document, questions=tuple(left)))
    return todo, skipped


class Tally:
    """Writes records to the results file and keeps the run's summary and progress.

    A record whose item is already written in this run (a retried task that had finished elsewhere) is
    dropped, so every item appears once; too many engine failures in a row raise ``StopRun``.
    """

    def __init__(self, log: ResultLog, todo: list[BatchDocument], skipped: int, batch_size: int,
                 *, progress_stream=None):
        self.log = log
        self.summary = BatchSummary(documents=len(todo), skipped=skipped, batch_size=batch_size)
        self._left = {document.id: len(document.questions) for document in todo}
        self._seen: set[str] = set()
        self._written: set[tuple[str, str]] = set()
        self._engine_failures = 0
        self.progress = Progress(len(todo), sum(self._left.values()), stream=progress_stream)

    def add(self, record: dict[str, Any], *, engine_error: bool = False) -> None:
        key = (record["id"], record["question"])
        if key in self._written:
            return
        self._written.add(key)
        self.log.append(record)
        if record["id"] not in self._seen:  # a document's tokens count once
            self._seen.add(record["id"])
            self.summary.vision_tokens += record["vision_tokens"]
            self.summary.text_tokens += record["text_tokens"]
        if record["error"] is None:
            self.summary.done += 1
            self.summary.prompt_tokens += record["prompt_tokens"]
            self.summary.new_tokens += record["new_tokens"]
        else:
            self.summary.failed += 1
        self.progress.item_done(failed=record["error"] is not None)
        self._left[record["id"]] -= 1
        if not self._left[record["id"]]:
            self.summary.documents_finished += 1
            self.progress.document_done()
        if engine_error:
            self._engine_failures = self._engine_failures + 1 if record["error"]["retryable"] else 0
            if self._engine_failures >= STOP_AFTER_ENGINE_FAILURES:
                raise StopRun(
                    f"{self._engine_failures} questions in a row failed on the engine's side "
                    f"(last: {record['error']['message']}); rerun the same command to retry them"
                )
        elif record["error"] is None:
            self._engine_failures = 0


def item_error(exc: BaseException) -> ItemError:
    """The results' error for ``exc``, its advice naming batch's flags."""
    error = ItemError.from_exception(exc)
    return dataclasses.replace(error, message=in_cli_words(error.message))


class ItemAnswerer:
    """Answers items in batches of the current batch size: halved on out-of-memory (and grown back after
    ``GROW_BACK_AFTER`` good batches); a batch that fails otherwise is answered item by item, so one bad item
    never fails its neighbours. Never raises for an item: each comes back with its Answer or its error."""

    def __init__(self, engine: AnswerBackend, options: BatchOptions, note: Callable[[str], None] = lambda m: None):
        self.engine = engine
        self.options = options
        self.batch_size = options.batch_size
        self.note = note
        self._good_batches = 0

    def answer(self, items: list[Item]) -> Iterator[tuple[Item, Any, ItemError | None]]:
        """(item, answer, None) or (item, None, error) for every item, a chunk at a time."""
        start = 0
        while start < len(items):
            chunk = items[start : start + self.batch_size]
            try:
                answers = self._answers(chunk)
            except EngineOutOfMemoryError as exc:
                if len(chunk) == 1:
                    yield chunk[0], None, item_error(exc)
                    start += 1
                    continue
                self.batch_size = max(1, len(chunk) // 2)
                self._good_batches = 0
                self.note(f"batch: out of GPU memory at batch size {len(chunk)}; retrying at {self.batch_size}")
                continue
            except Exception as exc:  # noqa: BLE001 (one bad item must not fail its neighbours)
                if len(chunk) == 1:
                    yield chunk[0], None, item_error(exc)
                else:
                    for item in chunk:
                        yield self._alone(item)
                start += len(chunk)
                continue
            yield from ((item, answer, None) for item, answer in zip(chunk, answers, strict=True))
            start += len(chunk)
            self._maybe_grow(len(chunk))

    def _alone(self, item: Item) -> tuple[Item, Any, ItemError | None]:
        try:
            [answer] = self._answers([item])
        except Exception as exc:  # noqa: BLE001 (recorded in the results; the run goes on)
            return item, None, item_error(exc)
        return item, answer, None

    def _answers(self, items: list[Item]) -> list:
        answer_items = getattr(self.engine, "answer_items", None)  # (extractive: the items' text, not pages)
        if answer_items is not None:
            return answer_items(items)
        return self.engine.answer_batch([self.request(item) for item in items])

    def _maybe_grow(self, size: int) -> None:
        if self.batch_size >= self.options.batch_size or size < self.batch_size:
            return
        self._good_batches += 1
        if self._good_batches >= GROW_BACK_AFTER:
            self._good_batches = 0
            self.batch_size = min(self.options.batch_size, self.batch_size * 2)
            self.note(f"batch: trying batch size {self.batch_size} again")

    def request(self, item: Item):
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
                temperature=self.options.temperature,
                top_p=self.options.top_p,
                seed=self.options.seed,
                use_cache=self.options.use_cache,
                ignore_eos=self.options.ignore_eos,
            ),
        )


class BatchRunner:
    """Answers every (document, question) not yet in ``log``, in this process.

    ``load_engine`` is called once rendering has started, so the first pages are being
    prepared while the model loads.
    """

    def __init__(
        self, load_engine: Callable[[], AnswerBackend], log: ResultLog, options: BatchOptions, *, progress_stream=None
    ):
        self.load_engine = load_engine
        self.log = log
        self.options = options
        self._progress_stream = progress_stream

    def run(self, documents: list[BatchDocument]) -> BatchSummary:
        todo, skipped = pending(documents, self.log)
        tally = Tally(self.log, todo, skipped, self.options.batch_size, progress_stream=self._progress_stream)
        summary = tally.summary
        if not todo:
            return summary
        window = self.options.prefetch or 2 * self.options.batch_size + self.options.workers
        prefetcher = Prefetcher(todo, self.options.render, workers=self.options.workers, window=window)
        start = time.monotonic()
        queue: deque[Item] = deque()
        answerer = None
        try:
            prefetcher.start()
            engine = self.load_engine()
            summary.extractive = isinstance(engine, ExtractiveAnswers)
            answerer = ItemAnswerer(engine, self.options, tally.progress.note)
            for prepared in prefetcher:
                if prepared.error is not None:
                    for question in prepared.document.questions:
                        tally.add(item_record(Item(prepared, question), None, prepared.error))
                    continue
                queue.extend(Item(prepared, q) for q in prepared.document.questions)
                while len(queue) >= answerer.batch_size:
                    self._answer(answerer, tally, [queue.popleft() for _ in range(answerer.batch_size)])
            while queue:
                self._answer(answerer, tally, [queue.popleft() for _ in range(min(answerer.batch_size, len(queue)))])
        except KeyboardInterrupt:
            summary.interrupted = True
        except StopRun as stop:
            summary.stopped = str(stop)
        finally:
            prefetcher.close()
            summary.elapsed_s = time.monotonic() - start
            summary.batch_size = answerer.batch_size if answerer is not None else self.options.batch_size
            tally.progress.finish()
        return summary

    @staticmethod
    def _answer(answerer: ItemAnswerer, tally: Tally, items: list[Item]) -> None:
        for item, answer, error in answerer.answer(items):
            tally.add(item_record(item, answer, error), engine_error=error is not None)
