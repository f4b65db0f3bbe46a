"""The service behind both the HTTP API and the web UI: documents in, answers out."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable

from PIL import Image

from glyphserve.engine.types import AnswerRequest, StreamEvent
from glyphserve.errors import GlyphserveError, NotFoundError
from glyphserve.ingest import MAX_NAME_CHARS, clean_name
from glyphserve.serve.backends import ChatJob, EngineBackend, ExtractiveBackend, Reply
from glyphserve.serve.config import ServeConfig
from glyphserve.serve.intake import DocumentIntake
from glyphserve.serve.errors import NO_MODEL_HINT, InvalidRequestError, ModelNotFoundError, StorageUnavailableError
from glyphserve.serve.metrics import Metrics
from glyphserve.serve.scheduler import ConcurrentScheduler, Scheduler, SchedulerHooks
from glyphserve.serve.store import DocumentRecord, DocumentStore
from glyphserve.serve.stored_pages import StoredPages

if TYPE_CHECKING:
    from glyphserve.engine import Engine
    from glyphserve.engine.remote import RemoteEngine

EXTRACTIVE_MODEL_NAME = "glyphserve-extractive"
# The choice of a question's pages has threads of its own (two uploads rendering held every question back 22 s).
PAGE_THREADS = 4
log = logging.getLogger("glyphserve.serve")

# Engine counters in /health: requests, decode occupancy (decode_rows / decode_steps rows per step), prefill passes
# (prompt chunks as graph rows, passes replayed from graphs), and where the engine's thread spends its time (seconds).
ENGINE_COUNTERS = ("requests", "new_tokens", "steps", "decode_steps", "decode_rows", "prefill_passes", "row_chunks",
                   "graph_passes", "step_s", "gpu_wait_s", "plan_s", "planned_ahead", "decode_step_s",
                   "timed_decode_steps")


class GlyphService:
    def __init__(self, config: ServeConfig, engine: "Engine | RemoteEngine | None" = None,
                 model_name: str | None = None):
        self.config = config
        self.engine = engine
        self.store = DocumentStore(config.data_dir)
        # The names the API answers to (--served-model-name); replies carry the first.
        self.model_names = list(config.served_model_name) or [
            model_name or ("glyph" if engine is not None else EXTRACTIVE_MODEL_NAME)]
        self.model_name = self.model_names[0]
        self.backend = ExtractiveBackend(self.store) if engine is None else EngineBackend(engine)
        self.created = int(time.time())
        self.metrics = Metrics(self.model_name, documents=self.store.count)
        hooks = SchedulerHooks(
            batch=self.metrics.c.batch_size.observe,
            reply=self._replied,
            cancelled=self.metrics.cancelled,
            joined=self.metrics.c.joined.inc,
        )
        make_scheduler = getattr(engine, "make_scheduler", None)  # engine replicas with a scheduler of their own
        if make_scheduler is not None:
            self.scheduler = make_scheduler(hooks)
        elif self.remote:
            self.scheduler = ConcurrentScheduler(
                self.backend, concurrency=len(config.endpoints) * config.concurrency_per_replica,
                queue_size=config.queue_size, timeout=config.request_timeout, hooks=hooks)
        else:
            self.scheduler = Scheduler(self.backend, queue_size=config.queue_size, max_batch=config.max_num_seqs,
                                       timeout=config.request_timeout, hooks=hooks)
        self.intake = DocumentIntake(config, self.store, self.metrics, getattr(engine, "tokenizer", None))
        self.metrics.watch_files(reading=lambda: self.intake.parses.reading,
                                 rendering=lambda: self.intake.renders.reading,
                                 waiting=lambda: self.intake.parses.waiting + self.intake.renders.waiting)
        self.metrics.watch(running=lambda: self.scheduler.running, waiting=lambda: self.scheduler.depth)
        if isinstance(self.backend, EngineBackend) and not self.remote and make_scheduler is None:
            self.metrics.watch_engine(engine.counters)
        self._page_pool = ThreadPoolExecutor(max_workers=PAGE_THREADS, thread_name_prefix="glyphserve-pages")
        # Ready at upload: documents being warmed (their task) and warmed ones (see ``warmth``).
        self._warming: dict[str, asyncio.Task] = {}
        # Others holding copies of documents' files (the UI framework caches what it shows): each is called with a
        # document's folder before the folder goes, and returns the paths it could not remove.
        self.copy_holders: list[Callable[[Path], list[str]]] = []
        self._warm: set[str] = set()
        self.pages = StoredPages(self.store)

    @property
    def has_model(self) -> bool:
        return isinstance(self.backend, EngineBackend)

    @property
    def remote(self) -> bool:
        """Answers come from OpenAI-compatible servers (``RemoteEngine``)."""
        return self.backend.name == "openai"

    @property
    def notice(self) -> str | None:
        """What users should know about the answers (without a model: that they are extractive)."""
        return None if self.has_model else NO_MODEL_HINT

    def describe(self) -> dict:
        """What answers questions, for /health, /v1/models and the UI."""
        if self.remote:
            stats = self.engine.stats()
            return {"backend": "openai", "model": self.model_name, "notice": self.notice,
                    "capacity": self.scheduler.concurrency, "endpoints": stats["endpoints"],
                    "retries": stats["retries"], "resumed": stats["resumed"]}
        if hasattr(self.engine, "describe"):  # engine replicas on Ray Serve
            return {"model": self.model_name, "notice": self.notice, **self.engine.describe()}
        if self.has_model:
            counters = self.engine.counters()  # read while the engine runs on the scheduler's thread
            return {"backend": "engine", "model": self.model_name, "notice": self.notice,
                    "dtype": str(self.engine.dtype).removeprefix("torch."), "quantize": self.engine.config.quantize,
                    "engine": {k: counters[k] for k in ENGINE_COUNTERS}}
        return {"backend": "extractive", "model": self.model_name, "notice": self.notice}

    def step_trace(self) -> list:
        """The local engine's records of its last steps (``StepRecord``; ``--step-trace``)."""
        trace = getattr(self.engine, "step_trace", None)
        if trace is None or not self.config.step_trace:
            raise NotFoundError("this server keeps no step records: start it with --step-trace N (a local engine)")
        return trace()

    def check_model(self, name: str | None) -> None:
        """Requests may name the model (one of the served names) or leave it out, as vLLM allows."""
        if name is not None and name not in self.model_names:
            raise ModelNotFoundError(f"The model `{name}` does not exist. This server serves "
                                     f"{', '.join(f'`{n}`' for n in self.model_names)} (--served-model-name).",
                                     param="model")

    def model_cards(self) -> list[dict]:
        """``/v1/models`` entries, one per served name (vLLM's fields)."""
        info = self.describe()
        root = self.config.model or self.config.random_weights or info["model"]
        max_len = self.max_context()  # (once: engine replicas may be asked for it)
        return [{"id": name, "object": "model", "created": self.created, "owned_by": "glyphserve", "root": root,
                 "parent": None, "max_model_len": max_len, "backend": info["backend"]} for name in self.model_names]

    def max_context(self) -> int | None:
        """The model's context (prompt + answer tokens); None without a model or while unknown. A front reports the
        least its servers hold (None unless each says); engine replicas are asked (blocking: call it off the loop)."""
        if not self.has_model:
            return None
        return self.engine.max_context if self.remote else self.engine.stats().get("max_context")

    def close(self) -> None:
        from glyphserve.ingest import shutdown_parsers
        from glyphserve.render import shutdown_pool

        self.scheduler.close()
        if self.remote:
            self.engine.close()
        self.intake.close()
        self._page_pool.shutdown(wait=False, cancel_futures=True)
        shutdown_parsers()
        shutdown_pool()
        self.store.close()

    # -- documents ------------------------------------------------------------------------

    async def add_document(self, **upload) -> tuple[DocumentRecord, bool]:
        """``DocumentIntake.add``; the document then warms (a question is likely to follow: sent again, too)."""
        record, duplicate = await self.intake.add(**upload)
        self._start_warming(record.id)
        return record, duplicate

    def rename_document(self, document_id: str, name: str) -> DocumentRecord:
        shown = clean_name(name)
        if not shown:
            raise InvalidRequestError("a document name needs a visible character", param="name")
        if len(shown) > MAX_NAME_CHARS:
            raise InvalidRequestError(f"a document name has at most {MAX_NAME_CHARS} characters, this one "
                                      f"{len(shown)}", param="name")
        return self.store.rename(document_id, shown)

    def delete_document(self, document_id: str) -> None:
        """Remove every copy of the document the server holds; if some file stays, say which."""
        folder = self.store.folder(document_id)
        leftovers = [path for holder in self.copy_holders for path in holder(folder)]
        leftovers += self.store.delete(document_id)
        self._warm.discard(document_id)
        task = self._warming.pop(document_id, None)
        if task is not None:
            task.cancel()  # the engine drops the warming at its next step and frees its blocks
        self.pages.forget(document_id)
        if isinstance(self.backend, ExtractiveBackend):
            self.backend.forget(document_id)
        if leftovers:
            shown = ", ".join(leftovers[:5]) + (f" and {len(leftovers) - 5} more" if len(leftovers) > 5 else "")
            raise StorageUnavailableError(
                f"document {document_id} is deleted, but {len(leftovers)} of its files could not be removed: "
                f"{shown} (the server tries again when it next starts)"
            )

    def page_png(self, document_id: str, number: int, rows: tuple[int, int] | None = None) -> bytes | Path:
        """The page file, or PNG bytes of the band of pixel ``rows`` (top, bottom) of it."""
        if rows is None:
            return self.store.page_path(document_id, number)
        top, bottom = rows
        with Image.open(io.BytesIO(self.store.page_bytes(document_id, number))) as image:
            if not 0 <= top < bottom <= image.height:
                raise InvalidRequestError(f"top and bottom must satisfy 0 <= top < bottom <= {image.height}")
            band = image.crop((0, top, image.width, bottom))
            out = io.BytesIO()
            band.save(out, format="PNG")
        return out.getvalue()

    # -- ready at upload -------------------------------------------------------------------

    def warmth(self, document_id: str) -> str:
        """"warm" (its vision features and prefix blocks were computed, by its warm-up or a question about all its
        pages; memory pressure may evict them later), "warming", or "cold" (no local model, not computed since the
        server started, the engine was busy past the request timeout, or warming failed)."""
        if document_id in self._warm:
            return "warm"
        return "warming" if document_id in self._warming else "cold"

    def _replied(self, job: ChatJob, reply: Reply, seconds: float) -> None:
        """A finished answer (on the scheduler's thread: nothing here waits): its metrics; a question that computed
        a document's warm-up prefix left it warm (a document stored before the server started said "cold" for
        good)."""
        self.metrics.observe_reply(reply, seconds)
        if job.warms is not None and reply.backend == "engine" and not reply.warm:
            self._warm.add(job.warms)

    def _start_warming(self, document_id: str) -> None:
        """Compute a new document's vision features and prefix KV in the background: the engine does it only while
        no question waits or runs, so the first question is answered like a follow-up."""
        if not self.has_model or self.remote or document_id in self._warm or document_id in self._warming:
            return  # (OpenAI-compatible servers have no warm requests)
        self._warming[document_id] = asyncio.get_running_loop().create_task(self._warm_up(document_id))

    async def _warm_up(self, document_id: str) -> None:
        job = ChatJob(request=AnswerRequest(pages=[], question="", warm=True), document_id=document_id)
        try:
            await self.answer(job)
        except asyncio.CancelledError:
            return  # deleted meanwhile
        except Exception as exc:  # a cold first question is the only cost
            log.info("warming document %s failed: %s", document_id, exc)
        else:
            if self._warming.get(document_id) is not None:
                self._warm.add(document_id)
        finally:
            self._warming.pop(document_id, None)

    # -- answers --------------------------------------------------------------------------

    async def prepare(self, job: ChatJob) -> ChatJob:
        """Check the documents exist and, for the model, choose the pages it sees and load them (off the event
        loop)."""
        if not job.document_ids:
            return job
        records = [self.store.get(document_id) for document_id in job.document_ids]
        pages = sum(r.pages for r in records)
        if len(records) > 1 and pages > self.config.max_pages:
            raise InvalidRequestError(
                f"the documents have {pages} pages in all; this server reads at most {self.config.max_pages} "
                "per question (--max-pages): ask about fewer documents", param="documents")
        if self.has_model:
            await asyncio.get_running_loop().run_in_executor(self._page_pool, self._choose_pages, job, records)
        return job

    def _choose_pages(self, job: ChatJob, records: list[DocumentRecord]) -> None:
        """The pages the model sees (glyphserve.retrieve), as their stored files: the engine keys each by its bytes
        (a page seen before, in any selection, is not encoded again) and decodes it only on a vision-cache miss;
        a front sends them on without decoding them at all."""
        from glyphserve.engine.prompt import page_budget
        from glyphserve.retrieve import select_pages

        request = job.request
        budget = page_budget(self.engine, request.history, request.question, request.settings.max_tokens)
        # Without a tokenizer here (replicas behind a front) the pages are chosen against an upper bound of the
        # prompt when the replicas report their context length, else every page goes and a replica refuses what
        # does not fit.
        selection = select_pages(
            [self.pages.selectable(r.id) for r in records], mode=job.page_selection if budget else "all",
            question=request.question, history=[m.content for m in request.history], budget=budget,
            titles=[r.title for r in records] if len(records) > 1 else None,
        )
        files = self.pages.files([(records[p.document].id, p.number) for p in selection.pages],
                                 request.settings.use_cache)
        pages, keys = [], []
        for p, page in zip(selection.pages, files):
            pages.append(page)
            keys.append(self.pages.key(records[p.document].id, p.number, page))
        request.pages, request.page_keys = pages, keys
        request.page_labels = selection.labels
        job.pages_shown = selection.shown([r.id for r in records])
        # Its warm-up's prefix: one document's every page, in order, before any text, into the caches.
        if (len(records) == 1 and job.pages_shown == list(range(1, records[0].pages + 1))
                and request.settings.use_cache and (not request.history or request.history[0].role == "user")):
            job.warms = records[0].id
        plan = getattr(self.engine, "plan", None)  # the local engine: planned here, not on its stepping thread
        if plan is not None:
            try:
                job.planned = plan(request)
            except GlyphserveError:
                pass  # the engine refuses it again where it would have, with the same error

    async def answer(self, job: ChatJob) -> Reply:
        return await self.scheduler.answer(await self.prepare(job))

    async def stream(self, job: ChatJob, keepalive: float | None = None) -> AsyncIterator[StreamEvent | Reply | None]:
        """The job's deltas, then its Reply; with ``keepalive``, None every that many seconds until the first
        item (see ``Scheduler.stream``)."""
        return await self.scheduler.stream(await self.prepare(job), keepalive)
