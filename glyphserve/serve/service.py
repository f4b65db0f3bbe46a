"""The service behind both the HTTP API and the web UI: documents in, answers out."""

from __future__ import annotations

import asyncio
import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator

from PIL import Image

from glyphserve.engine.types import EncodedPage
from glyphserve.errors import FileTooLargeError, IngestTimeoutError, TooManyPagesError
from glyphserve.ingest import Document, clean_filename
from glyphserve.serve.backends import ChatJob, Delta, EngineBackend, ExtractiveBackend, Reply
from glyphserve.serve.config import ServeConfig
from glyphserve.serve.errors import NO_MODEL_HINT, InvalidRequestError
from glyphserve.serve.metrics import Metrics
from glyphserve.serve.scheduler import Scheduler, SchedulerHooks
from glyphserve.serve.store import DocumentRecord, DocumentStore

if TYPE_CHECKING:
    from glyphserve.engine import Engine
    from glyphserve.engine.remote import RemoteEngine

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


# Uploads read at once: each thread waits on a parser process (PDF, DOCX) or decodes text, so a few slow files
# never hold up a pasted text, and rendering has threads of its own.
INGEST_THREADS = 4
MAX_ORIGINAL_NAME = 4096  # characters of a raw upload name kept as metadata

# Engine counters in /health: requests, and decode occupancy (decode_rows / decode_steps rows per step).
ENGINE_COUNTERS = ("requests", "new_tokens", "decode_steps", "decode_rows", "prefill_passes")


class GlyphService:
    def __init__(self, config: ServeConfig, engine: "Engine | RemoteEngine | None" = None,
                 model_name: str | None = None):
        self.config = config
        self.engine = engine
        self.router = getattr(engine, "router", None)  # a RemoteEngine routing over replicas
        self.store = DocumentStore(config.data_dir)
        self.metrics = Metrics(documents=self.store.count)
        if engine is None:
            self.backend = ExtractiveBackend(self.store)
            self.model_name = "glyphserve-extractive"
        else:
            self.backend = EngineBackend(engine, model_name or "glyph")
            self.model_name = model_name or "glyph"
        hooks = SchedulerHooks(
            queue_depth=self.metrics.queue_depth.set,
            batch=self.metrics.batch_size.observe,
            reply=self.metrics.observe_reply,
            cancelled=self.metrics.cancelled.inc,
            joined=self.metrics.joined.inc,
        )
        if self.router is not None:
            from glyphserve.serve.routing import RoutedScheduler

            self.scheduler = RoutedScheduler(self.backend, self.router, queue_size=config.queue_size,
                                             timeout=config.request_timeout, hooks=hooks)
        else:
            self.scheduler = Scheduler(self.backend, queue_size=config.queue_size, max_batch=config.max_num_seqs,
                                       timeout=config.request_timeout, hooks=hooks)
        self._ingest_pool = ThreadPoolExecutor(max_workers=INGEST_THREADS, thread_name_prefix="glyphserve-ingest")
        self._render_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="glyphserve-render")

    @property
    def has_model(self) -> bool:
        return isinstance(self.backend, EngineBackend)

    def describe(self) -> dict:
        """What answers questions, for /health, /v1/models and the UI."""
        if self.router is not None:
            stats = self.engine.stats()
            requests = {e["url"]: e for e in stats["endpoints"]}
            replicas = [{**r, **{k: requests[r["url"]][k] for k in ("requests", "in_flight", "failures")}}
                        for r in self.router.snapshot()]
            return {"backend": "openai", "model": self.model_name, "notice": None,
                    "capacity": self.router.capacity(), "replicas": replicas,
                    "retries": stats["retries"], "resumed": stats["resumed"]}
        if self.has_model:
            stats = self.engine.stats()
            return {"backend": "engine", "model": self.model_name, "notice": None,
                    "engine": {k: stats[k] for k in ENGINE_COUNTERS}}
        return {"backend": "extractive", "model": self.model_name, "notice": NO_MODEL_HINT}

    def close(self) -> None:
        from glyphserve.ingest import shutdown_parsers
        from glyphserve.render import shutdown_pool

        self.scheduler.close()
        if self.router is not None:
            self.router.close()
            self.engine.close()
        self._ingest_pool.shutdown(wait=False, cancel_futures=True)
        self._render_pool.shutdown(wait=False, cancel_futures=True)
        shutdown_parsers()
        shutdown_pool()
        self.store.close()

    # -- documents ------------------------------------------------------------------------

    async def add_document(self, *, data: bytes | None = None, filename: str | None = None,
                           text: str | None = None, name: str | None = None,
                           options: RenderOptions | None = None) -> DocumentRecord:
        """Ingest, render and store a file (``data``) or pasted ``text``, within the upload budget
        (``--ingest-timeout``). The shown name is cleaned (``clean_filename``); a raw file name that differs
        is kept in the record's summary as ``original_name``."""
        from glyphserve.ingest import ingest_bytes, ingest_text

        options = (options or RenderOptions()).check()
        size = len(data) if data is not None else len((text or "").encode("utf-8"))
        if size > self.config.max_upload_bytes:
            raise FileTooLargeError(
                f"the upload is {size / 2**20:.1f} MiB; this server accepts at most "
                f"{self.config.max_upload_mb:g} MiB (--max-upload-mb)"
            )
        deadline = time.monotonic() + self.config.ingest_timeout
        limits = self.config.ingest_limits
        loop = asyncio.get_running_loop()
        if data is not None:
            document = await loop.run_in_executor(self._ingest_pool, lambda: ingest_bytes(data, filename, limits=limits))
        else:
            document = await loop.run_in_executor(self._ingest_pool, lambda: ingest_text(text or "", limits=limits))
        shown = clean_filename(name) or document.source_name
        original = name if name and name != shown else None
        return await loop.run_in_executor(self._render_pool, self._render_and_store, document, shown, original,
                                          options, deadline)

    def _render_and_store(self, document: Document, name: str | None, original: str | None, options: RenderOptions,
                          deadline: float) -> DocumentRecord:
        from glyphserve.render import render_document, resolve_config, write_rendered

        config = resolve_config(document.text, preset=options.preset, dpi=options.dpi, newline=options.newline)
        rendered = render_document(document, config, progress=self._page_counter(deadline))
        self.metrics.stages.labels("render").observe(rendered.stats.seconds)
        summary = compression_summary(rendered, options.preset)
        if original is not None:
            summary["original_name"] = original[:MAX_ORIGINAL_NAME]
        return self.store.add(
            name=name, kind=document.kind, text=document.text, pages=len(rendered.pages),
            summary=summary, write_pages=lambda folder: write_rendered(rendered, folder),
        )

    def _page_counter(self, deadline: float):
        """A render progress callback that stops rendering once past ``--max-pages`` or the upload's budget."""
        done = 0

        def count(_):
            nonlocal done
            done += 1
            if done > self.config.max_pages:
                raise TooManyPagesError(
                    f"the document renders to more than {self.config.max_pages} pages, this server's limit "
                    "(--max-pages)"
                )
            if time.monotonic() > deadline:
                raise IngestTimeoutError(
                    f"reading and rendering the upload took longer than this server's {self.config.ingest_timeout:g} s "
                    "budget (--ingest-timeout)"
                )

        return count

    def delete_document(self, document_id: str) -> None:
        self.store.delete(document_id)
        if isinstance(self.backend, ExtractiveBackend):
            self.backend.forget(document_id)

    def page_png(self, document_id: str, number: int, rows: tuple[int, int] | None = None) -> bytes | Path:
        """The page file, or PNG bytes of the band of pixel ``rows`` (top, bottom) of it."""
        path = self.store.page_path(document_id, number)
        if rows is None:
            return path
        top, bottom = rows
        with Image.open(path) as image:
            if not 0 <= top < bottom <= image.height:
                raise InvalidRequestError(f"top and bottom must satisfy 0 <= top < bottom <= {image.height}")
            band = image.crop((0, top, image.width, bottom))
            out = io.BytesIO()
            band.save(out, format="PNG")
        return out.getvalue()

    def _stored_pages(self, document_id: str, pages: int) -> list[EncodedPage]:
        """The document's page files as they are: the engine decodes them only on a vision-cache miss, and a
        front sends them on without decoding them at all."""
        return [EncodedPage.from_bytes(self.store.page_path(document_id, number).read_bytes())
                for number in range(1, pages + 1)]

    # -- answers --------------------------------------------------------------------------

    async def prepare(self, job: ChatJob) -> ChatJob:
        """Check the document exists and, for the model, load its pages (off the event loop)."""
        if job.document_id is not None:
            record = self.store.get(job.document_id)
            if self.has_model:
                job.pages = await asyncio.get_running_loop().run_in_executor(
                    self._render_pool, self._stored_pages, job.document_id, record.pages)
        return job

    async def answer(self, job: ChatJob) -> Reply:
        return await self.scheduler.answer(await self.prepare(job))

    async def stream(self, job: ChatJob) -> AsyncIterator[Delta | Reply]:
        return await self.scheduler.stream(await self.prepare(job))


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
        "warning": missing_glyphs_warning(rendered),
    }
