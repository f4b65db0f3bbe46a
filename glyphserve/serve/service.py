"""The service behind both the HTTP API and the web UI: documents in, answers out."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable

from PIL import Image

from glyphserve.engine.types import AnswerRequest, StreamEvent
from glyphserve.errors import FileTooLargeError, GlyphserveError, IngestTimeoutError, NotFoundError, TooManyPagesError
from glyphserve.ingest import MAX_NAME_CHARS, Document, clean_filename, clean_name
from glyphserve.serve.backends import ChatJob, EngineBackend, ExtractiveBackend, Reply
from glyphserve.serve.config import ServeConfig
from glyphserve.serve.errors import (NO_MODEL_HINT, InvalidRequestError, ModelNotFoundError, RetryLaterError,
                                     StorageUnavailableError)
from glyphserve.serve.metrics import Metrics
from glyphserve.serve.upload_queue import QueueLimits, UploadQueue
from glyphserve.serve.scheduler import ConcurrentScheduler, Scheduler, SchedulerHooks
from glyphserve.serve.store import DocumentFiles, DocumentRecord, DocumentStore
from glyphserve.serve.stored_pages import StoredPages

if TYPE_CHECKING:
    from glyphserve.engine import Engine
    from glyphserve.engine.remote import RemoteEngine
    from glyphserve.render import RenderConfig

EXTRACTIVE_MODEL_NAME = "glyphserve-extractive"
PRESETS = ("auto", "glyph-en", "glyph-zh")
DPIS = (72, 96)
NEWLINES = ("br", "marker")


@dataclass
class RenderOptions:
    preset: str = "auto"
    dpi: int | None = None  # None: the preset's
    newline: str | None = None  # None: the preset's

    def check(self) -> "RenderOptions":
        if self.preset not in PRESETS:
            raise InvalidRequestError(f"preset must be one of {', '.join(PRESETS)}, not {self.preset!r}")
        if self.dpi is not None and self.dpi not in DPIS:
            raise InvalidRequestError(f"dpi must be 72 or 96, not {self.dpi!r}")
        if self.newline is not None and self.newline not in NEWLINES:
            raise InvalidRequestError(f"newline must be br or marker, not {self.newline!r}")
        return self


# Files are read, and uploads rendered, on UploadQueues' threads, shared fairly among clients. Pasted text is read by
# threads of its own (4 PDFs that took the whole --ingest-timeout held a pasted text back 58 s), and so is the choice
# of a question's pages (two uploads rendering held every question back 22 s).
TEXT_THREADS = 2
RENDER_THREADS = 2
PAGE_THREADS = 4
log = logging.getLogger("glyphserve.serve")

MAX_ORIGINAL_NAME = 4096  # characters of a raw upload name kept as metadata

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
        self.parses = UploadQueue(QueueLimits(budget=config.ingest_timeout))
        # Rendering too is shared by turns, one thread a client: 2 slow texts of one client (single lines of CJK with
        # Latin fragments, 60 s each) held every other client's upload until its budget ran out, first come first
        # served on 2 threads (a new user's trial).
        self.renders = UploadQueue(QueueLimits(budget=config.ingest_timeout, threads=RENDER_THREADS, per_client=1,
                                               stage="rendered"))
        self.metrics.watch_files(reading=lambda: self.parses.reading, rendering=lambda: self.renders.reading,
                                 waiting=lambda: self.parses.waiting + self.renders.waiting)
        self._text_pool = ThreadPoolExecutor(max_workers=TEXT_THREADS, thread_name_prefix="glyphserve-text")
        self.metrics.watch(running=lambda: self.scheduler.running, waiting=lambda: self.scheduler.depth)
        if isinstance(self.backend, EngineBackend) and not self.remote and make_scheduler is None:
            self.metrics.watch_engine(engine.counters)
        self._page_pool = ThreadPoolExecutor(max_workers=PAGE_THREADS, thread_name_prefix="glyphserve-pages")
        # Ready at upload: documents being warmed (their task) and warmed ones (see ``warmth``).
        self._warming: dict[str, asyncio.Task] = {}
        # Uploads being rendered and stored, by content key: the same content sent again meanwhile waits for that
        # one (12 uploads of one file at once stored 12 documents). The record, or None when that one failed.
        self._adding: dict[str, Future] = {}
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
        max_len = None
        if self.has_model:  # a front reports the least its replicas hold (None unless each says)
            max_len = self.engine.max_context if self.remote else self.engine.stats().get("max_context")
        return [{"id": name, "object": "model", "created": self.created, "owned_by": "glyphserve", "root": root,
                 "parent": None, "max_model_len": max_len, "backend": info["backend"]} for name in self.model_names]

    def close(self) -> None:
        from glyphserve.ingest import shutdown_parsers
        from glyphserve.render import shutdown_pool

        self.scheduler.close()
        if self.remote:
            self.engine.close()
        self.parses.close()
        self.renders.close()
        for pool in (self._text_pool, self._page_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        shutdown_parsers()
        shutdown_pool()
        self.store.close()

    # -- documents ------------------------------------------------------------------------

    async def add_document(self, *, data: bytes | None = None, path: Path | None = None, filename: str | None = None,
                           text: str | None = None, name: str | None = None,
                           options: RenderOptions | None = None, client: str = "") -> tuple[DocumentRecord, bool]:
        """Ingest, render and store a file (``data``, or the file at ``path``, read from disk when its reading
        begins: a file waiting for its turn holds no memory; read and rendered in ``client``'s turns, see
        ``UploadQueue``) or pasted ``text`` (rendered in its turn), within the upload budget (``--ingest-timeout``,
        from when its reading begins); the record and whether it was stored before (the same content with the same
        render settings is stored once). The shown name is cleaned (``clean_filename``); a raw file name that
        differs is kept in the record's summary as ``original_name``."""
        from glyphserve.ingest import ingest_bytes, ingest_text

        options = (options or RenderOptions()).check()
        is_file = data is not None or path is not None
        size = (len(data) if data is not None else path.stat().st_size if path is not None
                else len((text or "").encode("utf-8")))
        if size > self.config.max_upload_bytes:
            raise FileTooLargeError(
                f"the upload is {size:,} bytes ({size / 2**20:.2f} MiB); this server accepts at most "
                f"{self.config.max_upload_bytes:,} bytes ({self.config.max_upload_mb:g} MiB, --max-upload-mb)"
            )
        from glyphserve.render import fit_scans, resolve_config

        limits = self.config.ingest_limits
        def read() -> tuple[Document, RenderConfig, str, str, float]:
            """Off the event loop: the document, its settings as applied, its keys (new, and as sent) and when its
            budget runs out, counted from here (counted from its arrival, a text file queued behind 8 slow PDFs was
            refused ingest_timeout after 9 s of a 5 s budget, none of it spent on its own reading)."""
            deadline = time.monotonic() + self.config.ingest_timeout
            # Each scan becomes the page file stored for it as it is read: 100 scans drawn 2000 px square, all held as
            # pixels until rendered, peaked at 1.4 GiB here and 1.2 GiB in the parser (now 0.2 and 0.1).
            keep = fit_scans(options.preset, options.dpi)
            raw = path.read_bytes() if path is not None else data
            document = (ingest_bytes(raw, filename, limits=limits, keep=keep) if is_file
                        else ingest_text(text or "", limits=limits))
            # The settings as applied (``auto`` and an unset dpi or newline resolved for this text) decide what is
            # the same document, so the file sent with the settings it would get anyway is found too.
            config = resolve_config(document.text, preset=options.preset, dpi=options.dpi, newline=options.newline)
            source = b"file\x00" + raw if is_file else b"text\x00" + (text or "").encode("utf-8")
            return document, config, content_hash(source, config), sent_settings_hash(source, options), deadline

        loop = asyncio.get_running_loop()
        document, config, digest, sent_digest, deadline = await (
            self.parses.run(client, read) if is_file else loop.run_in_executor(self._text_pool, read))
        while True:
            existing = self.store.find(digest) or self.store.find(sent_digest)
            if existing is not None:
                self._start_warming(existing.id)  # sent again: a question is likely to follow
                return existing, True
            adding = self._adding.get(digest)
            if adding is None:
                break
            # (shielded: this request going away must not cancel the other's)
            stored = await asyncio.shield(asyncio.wrap_future(adding))
            if isinstance(stored, GlyphserveError):  # what is wrong with the content is wrong for this one too
                raise stored
            if stored is not None:
                self._start_warming(stored.id)  # (its own warming may not have started: its client left)
                return stored, True
            # that upload was cancelled or failed on the server's side: this one tries itself
        # A file's own name loses its folders; a name typed for it (the name field, pasted text's) is kept as typed.
        shown = (clean_filename(name) if name == filename else clean_name(name or "", MAX_NAME_CHARS)) or \
            document.source_name
        original = name if name and name != shown else None
        # (a task: this request going away must not cancel the rendering others may wait for)
        work = asyncio.ensure_future(self.renders.run(client, functools.partial(
            self._render_and_store, document, shown, original, options.preset, config, deadline, digest)))
        adding = self._adding[digest] = Future()

        def settle(done: asyncio.Future) -> None:
            """When the work ends, whether or not this request still waits for it: the record, the content's
            own error, or None for the next upload of it to try itself (also after a refusal for want of a
            thread: that was this client's turn, not the content)."""
            if self._adding.get(digest) is adding:
                del self._adding[digest]
            error = None if done.cancelled() else done.exception()
            own = isinstance(error, GlyphserveError) and not isinstance(error, RetryLaterError)
            adding.set_result(done.result() if not done.cancelled() and error is None else error if own else None)

        work.add_done_callback(settle)
        record = await asyncio.shield(work)
        self._start_warming(record.id)
        return record, False

    def _render_and_store(self, document: Document, name: str | None, original: str | None, preset: str,
                          config: RenderConfig, deadline: float, digest: str) -> DocumentRecord:
        from glyphserve.render import count_pages, estimated_pages, render_document

        # A document that may be over the page limit (its lines say a quarter of it or more) is counted from its
        # layout first (a 10.9 MB text took 20 s to refuse after rendering 500 pages on a busy 2-core machine; its
        # layout counts them in well under one).
        limit = self.config.max_pages
        estimate = estimated_pages(document, config)
        if estimate > limit / 4 and count_pages(
                document, config, limit, check=functools.partial(self._in_budget, deadline)) > limit:
            raise self._too_many_pages(estimate)
        # With a model, the compression figure counts text tokens with its tokenizer, not the estimate.
        tokenizer = getattr(self.engine, "tokenizer", None)
        rendered = render_document(document, config, tokenizer=tokenizer,
                                   progress=self._page_counter(deadline, estimate), encode=True)
        self.metrics.c.stages.labels("render").observe(rendered.stats.seconds)
        summary = compression_summary(rendered, preset)
        if original is not None:
            summary["original_name"] = original[:MAX_ORIGINAL_NAME]
        # answered once the pages exist in memory; the store writes their files off this path
        files = DocumentFiles(rendered.manifest(), document.text, [page.png() for page in rendered.pages])
        return self.store.add(name=name, kind=document.kind, summary=summary, files=files, content_hash=digest)

    def _too_many_pages(self, estimate: float) -> TooManyPagesError:
        """The refusal of a document over ``--max-pages``, with about how many parts it would take by ``estimate``
        (its pages guessed from its lines) where that guess is over the limit too (a size limit in bytes says
        nothing of pages: 4.3 MB of plain text fill the default 500)."""
        limit = self.config.max_pages
        parts = math.ceil(estimate / limit)
        split = "split it into smaller documents" + (
            f" (about {parts}: it fills about {estimate:,.0f} pages, by a guess from its lines)" if parts > 1 else "")
        return TooManyPagesError(f"the document renders to more than {limit} pages, this server's limit "
                                 f"(--max-pages): {split}")

    def _page_counter(self, deadline: float, estimate: float):
        """A render progress callback that stops rendering once past ``--max-pages`` or the upload's budget."""
        done = 0

        def count(_):
            nonlocal done
            done += 1
            self.metrics.c.pages_rendered.inc()
            if done > self.config.max_pages:
                raise self._too_many_pages(estimate)
            self._in_budget(deadline)

        return count

    def _in_budget(self, deadline: float) -> None:
        """Raise ``IngestTimeoutError`` once past the upload's ``deadline``."""
        if time.monotonic() > deadline:
            raise IngestTimeoutError(
                f"reading and rendering the upload took longer than this server's {self.config.ingest_timeout:g} s "
                "budget (--ingest-timeout)"
            )

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
            titles=[r.name or "pasted text" for r in records] if len(records) > 1 else None,
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


def content_hash(data: bytes, config: RenderConfig) -> str:
    """What makes two uploads the same document: their source (file or pasted text) and bytes, and the render
    settings applied to them (numbers as floats: a dpi of 72 and of 72.0 render alike)."""
    def canonical(value):
        if isinstance(value, (list, tuple)):
            return [canonical(v) for v in value]
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    settings = {name: canonical(value) for name, value in dataclasses.asdict(config).items()}
    digest = hashlib.sha256(data)
    digest.update(b"\x00" + json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def sent_settings_hash(data: bytes, options: RenderOptions) -> str:
    """The key of documents stored before ``content_hash`` keyed the settings as applied: the settings as sent
    (such a record is found again when the same file comes with the same settings)."""
    digest = hashlib.sha256(data)
    digest.update(f"\x00{options.preset}\x00{options.dpi}\x00{options.newline}".encode())
    return digest.hexdigest()


def compression_summary(rendered, preset: str) -> dict:
    """Characters, text tokens, vision tokens and their ratio, plus the render settings used and
    a warning when many characters are not in the font."""
    from glyphserve.render import missing_glyphs_warning

    stats, config = rendered.stats, rendered.config
    font = rendered.font.manifest()["name"] if rendered.font else Path(config.font_path).name
    return {
        "characters": stats.characters,
        "text_tokens": stats.text_tokens,
        "text_token_method": stats.text_token_method,
        "vision_tokens": stats.vision_tokens,
        "compression_ratio": round(stats.compression_ratio, 3),
        "scan_pages": sum(1 for p in rendered.pages if p.kind == "scan"),
        "render_seconds": round(stats.seconds, 3),
        "render": {"preset": preset, "dpi": config.dpi, "newline": config.newline_mode, "font": font},
        "missing_chars": stats.missing_chars,
        "warning": missing_glyphs_warning(rendered, command_line=False),
    }
