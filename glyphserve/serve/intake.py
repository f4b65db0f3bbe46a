"""Documents coming in: a file or pasted text read, rendered into pages and stored, once for the same content, within
the upload's budget and limits, on threads shared fairly among the clients sending them (``UploadQueue``)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glyphserve.errors import FileTooLargeError, GlyphserveError, IngestTimeoutError, TooManyPagesError
from glyphserve.ingest import MAX_NAME_CHARS, Document, clean_filename, clean_name
from glyphserve.serve.config import ServeConfig
from glyphserve.serve.errors import InvalidRequestError, RetryLaterError
from glyphserve.serve.metrics import Metrics
from glyphserve.serve.store import UNNAMED, DocumentFiles, DocumentRecord, DocumentStore
from glyphserve.serve.upload_queue import QueueLimits, UploadQueue

if TYPE_CHECKING:
    from glyphserve.render import RenderConfig

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


def check_upload_size(size: int, config: ServeConfig) -> None:
    """Refuse an upload of ``size`` bytes over ``--max-upload-mb`` (``FileTooLargeError``). (The web UI's page refuses
    such a file before sending it, and the UI says why with this.)"""
    if size > config.max_upload_bytes:
        raise FileTooLargeError(
            f"the upload is {size:,} bytes ({size / 2**20:.2f} MiB); this server accepts at most "
            f"{config.max_upload_bytes:,} bytes ({config.max_upload_mb:g} MiB, --max-upload-mb)"
        )


# Files are read, and uploads rendered, on UploadQueues' threads, shared fairly among clients. Pasted text is read by
# threads of its own (4 PDFs that took the whole --ingest-timeout held a pasted text back 58 s).
TEXT_THREADS = 2
RENDER_THREADS = 2
MAX_ORIGINAL_NAME = 4096  # characters of a raw upload name kept as metadata


class DocumentIntake:
    """Reads, renders and stores uploads for a server: its ``store``, under ``config``'s limits, counting in
    ``metrics``; text tokens counted with ``tokenizer`` where a model is loaded (else the estimate)."""

    def __init__(self, config: ServeConfig, store: DocumentStore, metrics: Metrics, tokenizer: Any = None):
        self.config, self.store, self.metrics, self.tokenizer = config, store, metrics, tokenizer
        self.parses = UploadQueue(QueueLimits(budget=config.ingest_timeout))
        # Rendering too is shared by turns, one thread a client: 2 slow texts of one client (single lines of CJK with
        # Latin fragments, 60 s each) held every other client's upload until its budget ran out, first come first
        # served on 2 threads (a new user's trial).
        self.renders = UploadQueue(QueueLimits(budget=config.ingest_timeout, threads=RENDER_THREADS, per_client=1,
                                               stage="rendered"))
        self._text_pool = ThreadPoolExecutor(max_workers=TEXT_THREADS, thread_name_prefix="glyphserve-text")
        # Uploads being rendered and stored, by content key: the same content sent again meanwhile waits for that
        # one (12 uploads of one file at once stored 12 documents). The record, or None when that one failed.
        self._adding: dict[str, Future] = {}

    def close(self) -> None:
        self.parses.close()
        self.renders.close()
        self._text_pool.shutdown(wait=False, cancel_futures=True)

    async def add(self, *, data: bytes | None = None, path: Path | None = None, filename: str | None = None,
                  text: str | None = None, name: str | None = None, options: RenderOptions | None = None,
                  client: str = "") -> tuple[DocumentRecord, bool]:
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
        check_upload_size(size, self.config)
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
                return existing, True
            adding = self._adding.get(digest)
            if adding is None:
                break
            # (shielded: this request going away must not cancel the other's)
            stored = await asyncio.shield(asyncio.wrap_future(adding))
            if isinstance(stored, GlyphserveError):  # what is wrong with the content is wrong for this one too
                raise stored
            if stored is not None:
                return stored, True
            # that upload was cancelled or failed on the server's side: this one tries itself
        # A file's own name loses its folders; a name typed for it (the name field, pasted text's) is kept as typed;
        # pasted text without one is "pasted text", as the web UI always called it (the API said null).
        shown = (clean_filename(name) if name == filename else clean_name(name or "", MAX_NAME_CHARS)) or \
            document.source_name or UNNAMED
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
        return await asyncio.shield(work), False

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
        rendered = render_document(document, config, tokenizer=self.tokenizer,
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
