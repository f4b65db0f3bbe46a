"""The fast renderer: text -> page images in memory, matching Glyph's official pipeline.

Layout runs in the calling process (it is sequential by nature: every page starts where
the previous one ended) and is cheap; painting pages is the numpy-heavy part and is shared
with worker processes (``workers``) when the document is long enough to repay it.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from glyphserve.errors import EmptyDocumentError
from glyphserve.glm4v import vision_tokens
from glyphserve.render.config import MARKER_MARKUP, RenderConfig, has_cjk
from glyphserve.render.document import ENCODER_THREADS, PageLine, RenderedDocument, RenderedPage, RenderStats
from glyphserve.render.fonts import CharTable, FontFace, ResolvedFont, WidthMap, resolve_font
from glyphserve.render.layout import PageLayout, fills_pages, paginate
from glyphserve.render.lines import LayoutContext
from glyphserve.render.png import encode_png
from glyphserve.render.raster import DrawList, GlyphAtlas, RasterContext, draw_list, page_pixels, paint
from glyphserve.render.scan import scan_page
from glyphserve.render.text import LINES_PER_PARAGRAPH, WHITESPACE, PreparedText, prepare
from glyphserve.render.tokens import count_text_tokens
from glyphserve.render.workers import BLOCKS, attached, worker_pool

# A page costs ~1 ms of layout and ~3 ms of painting (+1 ms PNG) on the 2-core CI VM; a worker
# process costs ~20 ms to start and ~0.3 ms per page to hand pages over. Below this many pages,
# or without an idle core to run it, a worker loses to this process alone (bench render shows both).
PARALLEL_MIN_PAGES = 12
_BATCH = 3  # pages per task sent to a worker: fewer round trips, each a wake-up on a busy machine


@lru_cache(maxsize=8)
def _char_table(face: FontFace, fallback: bool) -> CharTable:
    return CharTable(face, fallback)


@lru_cache(maxsize=16)
def _atlas(face: FontFace, fallback: bool, size_px: float) -> GlyphAtlas:
    return GlyphAtlas(_char_table(face, fallback), size_px)


@lru_cache(maxsize=16)
def _raster_context(config: RenderConfig, face: FontFace) -> RasterContext:
    fallback = config.fallback_fonts
    return RasterContext(config, _char_table(face, fallback), _atlas(face, fallback, config.font_size * config.scale))


@dataclass
class _Setup:
    config: RenderConfig
    font: ResolvedFont
    layout: LayoutContext
    raster: RasterContext


def _setup(text: str, config: RenderConfig) -> _Setup:
    font = resolve_font(config.font_path)
    return _Setup(config, font, _layout_context(text, config, font), _raster_context(config, font.face))


def _layout_context(text: str, config: RenderConfig, font: ResolvedFont) -> LayoutContext:
    return LayoutContext(config, WidthMap(_char_table(font.face, config.fallback_fonts)), has_cjk(text))


def _page_layouts(prepared: PreparedText, setup: _Setup) -> Iterator[tuple[PageLayout, bool]]:
    """Pages with a flag telling whether each is the last one (the crop treats it apart)."""
    pending: PageLayout | None = None
    for page in paginate(prepared, setup.layout):
        if pending is not None:
            yield pending, False
        pending = page
    if pending is not None:
        yield pending, True


def _paint_batch(config: RenderConfig, face: FontFace, jobs: list[tuple[DrawList, bool]], shm_name: str | None,
                 slot: int) -> list[tuple[int, ...]] | list[bytes]:
    """Worker task: paint and crop a few pages, either into the caller's shared memory
    (``slot`` bytes apart; returns their shapes) or, without one, as PNG files (returns them)."""
    rc = _raster_context(config, face)
    if shm_name is None:
        return [encode_png(paint(dl, rc, last=last)) for dl, last in jobs]
    shm = attached(shm_name)
    shapes = []
    for i, (dl, last) in enumerate(jobs):
        def alloc(shape, dtype, offset=i * slot):
            return np.ndarray(shape, dtype=dtype, buffer=shm.buf, offset=offset)

        shapes.append(paint(dl, rc, last=last, alloc=alloc).shape)
    return shapes


class _SharedBatch:
    """One batch of pages a worker paints into a shared block (or, for files, encodes)."""

    def __init__(self, numbers: list[int], config: RenderConfig, encode: bool):
        w, h = page_pixels(config)
        self.numbers = numbers
        self.slot = h * math.ceil(w * max(1.0, config.horizontal_scale)) * 3
        self.shm = None if encode else BLOCKS.take(len(numbers) * self.slot)

    def pages(self, reply: list) -> list[np.ndarray | bytes]:
        """The painted pixels (copied out of the block) or the PNG files."""
        if self.shm is None:
            return reply
        return [np.ndarray(shape, dtype=np.uint8, buffer=self.shm.buf, offset=i * self.slot).copy()
                for i, shape in enumerate(reply)]

    def release(self) -> None:
        if self.shm is not None:
            BLOCKS.give(self.shm)


class _Spans:
    """Page char spans: consecutive, covering the whole text; each page ends after its last line."""

    def __init__(self, prepared: PreparedText, base: int):
        self.prepared = prepared
        self.base = base
        self.end = 0

    def next(self, page: PageLayout, last: bool) -> tuple[int, int]:
        start = self.end
        if last:
            end = self.prepared.original_length
        else:
            end = start
            for para in reversed(page.paragraphs):  # the last line that drew source text
                hi = next((e for e in (ln.source_end() for ln in reversed(para.lines)) if e >= 0), -1)
                if hi >= 0:
                    end = self.prepared.to_original(hi)
                    break
        self.end = max(end, start)
        return start + self.base, self.end + self.base


def _page_lines(page: PageLayout, dl: DrawList) -> list[PageLine]:
    return [PageLine(line.text.rstrip(" "), y) for (_p, _i, line), y in zip(page.lines, dl.line_y)]


class _Lacking:
    """The characters of a text drawn as missing-glyph boxes (no font it is drawn from has them), counted page by
    page."""

    def __init__(self, prepared: PreparedText, table: CharTable):
        self.chars = frozenset(ch for ch in set(prepared.text) if ch not in WHITESPACE and table.lacks(ch))

    def count(self, lines: list[PageLine]) -> int:
        if not self.chars:
            return 0
        chars = self.chars
        return sum(1 for line in lines for ch in line.text if ch in chars)


def iter_pages(text: str, config: RenderConfig, *, first_number: int = 1, offset: int = 0) -> Iterator[RenderedPage]:
    """Render page by page in this process, holding one page at a time (for long texts).

    ``offset`` is added to the char spans (for text that is part of a larger document).
    """
    if not _has_text(text):
        raise EmptyDocumentError("there is no text to render")
    setup = _setup(text, config)
    prepared = prepare(text)
    spans = _Spans(prepared, offset)
    lacking = _Lacking(prepared, setup.raster.table)
    rc = setup.raster
    for number, (page, last) in enumerate(_page_layouts(prepared, setup), first_number):
        dl = draw_list(page, rc)
        lines = _page_lines(page, dl)
        yield _page(number, paint(dl, rc, last=last), spans.next(page, last), lines, lacking)


def _has_text(text: str) -> bool:
    """Whether ``text`` is more than whitespace (``text.strip()`` copied 40 MB of a text ending in a space)."""
    return bool(text) and not text.isspace()


def _page(number: int, painted: np.ndarray | bytes, span: tuple[int, int], lines: list[PageLine],
          lacking: _Lacking) -> RenderedPage:
    """A text page from its pixels or its PNG file."""
    page = RenderedPage(number, None, span, lines, 0, missing_chars=lacking.count(lines))
    if isinstance(painted, bytes):
        page.encoded = painted
    else:
        page.pixels = painted
    page.vision_tokens = vision_tokens(page.size[1], page.size[0])
    return page


def _encoding(pages: Iterator[RenderedPage]) -> Iterator[RenderedPage]:
    """The pages with their PNG files, made in threads while later pages render (the encoder
    releases the GIL); each page keeps only its file."""
    with ThreadPoolExecutor(max_workers=ENCODER_THREADS, thread_name_prefix="glyphserve-png") as pool:
        pending: deque[tuple[RenderedPage, Future]] = deque()

        def done(page: RenderedPage, future: Future) -> RenderedPage:
            page.encoded, page.pixels = future.result(), None
            return page

        for page in pages:
            pending.append((page, pool.submit(encode_png, page.pixels)))
            while pending and (pending[0][1].done() or len(pending) > 2 * ENCODER_THREADS):
                yield done(*pending.popleft())
        while pending:
            yield done(*pending.popleft())


def render_text(
    text: str,
    config: RenderConfig,
    *,
    workers: int | None = None,
    tokenizer: Any = None,
    progress: Callable[[int], None] | None = None,
    encode: bool = False,
) -> RenderedDocument:
    """Render ``text`` into pages exactly like Glyph's official renderer, fast.

    ``workers``: processes used to paint pages (None: chosen from the text's length and the
    cores, 1: this process only). ``progress`` is called with the number of pages done.
    ``encode``: make each page's PNG file as it is rendered and keep only that (what writing
    files or a store wants).
    """
    t0 = time.perf_counter()
    pages = list(_render_pages(text, config, workers, progress, first_number=1, offset=0, encode=encode))
    return _document(text, config, pages, tokenizer, time.perf_counter() - t0)


def _render_pages(text: str, config: RenderConfig, workers: int | None, progress, *, first_number: int,
                  offset: int, encode: bool) -> Iterator[RenderedPage]:
    if not _has_text(text):
        raise EmptyDocumentError("there is no text to render")
    n_workers = _worker_count(workers, text, config)
    if n_workers > 1:
        pages = _render_pooled(text, config, n_workers, first_number, offset, encode)
    else:
        pages = _render_here(text, config, first_number, offset, encode)
    for done, page in enumerate(pages, 1):
        yield page
        if progress:
            progress(done)


def _render_here(text: str, config: RenderConfig, first_number: int, offset: int,
                 encode: bool) -> Iterator[RenderedPage]:
    pages = iter_pages(text, config, first_number=first_number, offset=offset)
    return _encoding(pages) if encode else pages


def _render_pooled(text: str, config: RenderConfig, n_workers: int, first_number: int, offset: int,
                   encode: bool) -> Iterator[RenderedPage]:
    """Lay out here; the workers paint (and encode) while this process lays out, and this
    process paints too whenever every worker already has two pages queued, so all cores stay
    busy."""
    pool = worker_pool(n_workers - 1)
    if not pool.lock.acquire(blocking=False):  # another render has the pool: do this one here
        yield from _render_here(text, config, first_number, offset, encode)
        return
    queued: list[deque[_SharedBatch]] = [deque() for _ in range(len(pool))]
    try:
        setup = _setup(text, config)
        prepared = prepare(text)
        spans = _Spans(prepared, offset)
        lacking = _Lacking(prepared, setup.raster.table)
        rc = setup.raster
        painted: dict[int, np.ndarray | bytes] = {}
        meta: dict[int, tuple[tuple[int, int], list[PageLine]]] = {}
        batch: list[tuple[DrawList, bool]] = []
        numbers: list[int] = []
        next_out = first_number

        def collect(block: bool) -> None:
            for worker, waiting in enumerate(queued):
                while waiting and (block or pool.ready(worker)):
                    shared = waiting.popleft()
                    try:
                        painted.update(zip(shared.numbers, shared.pages(pool.receive(worker))))
                    finally:
                        shared.release()

        def finished() -> Iterator[RenderedPage]:
            nonlocal next_out
            while next_out in painted:
                yield _page(next_out, painted.pop(next_out), *meta.pop(next_out), lacking)
                next_out += 1

        def here(dl: DrawList, last: bool) -> np.ndarray | bytes:
            pixels = paint(dl, rc, last=last)
            return encode_png(pixels) if encode else pixels

        for number, (page, last) in enumerate(_page_layouts(prepared, setup), first_number):
            dl = draw_list(page, rc)
            meta[number] = (spans.next(page, last), _page_lines(page, dl))
            batch.append((dl, last))
            numbers.append(number)
            if len(batch) == _BATCH or last:
                worker = min(range(len(pool)), key=lambda w: len(queued[w]))
                if len(queued[worker]) < 2:
                    shared = _SharedBatch(numbers, config, encode)
                    queued[worker].append(shared)
                    pool.send(worker, _paint_batch, config, setup.font.face, batch,
                              shared.shm.name if shared.shm else None, shared.slot)
                else:
                    painted.update(zip(numbers, (here(d, lst) for d, lst in batch)))
                batch, numbers = [], []
                collect(block=False)
                yield from finished()
        collect(block=True)
        yield from finished()
    finally:
        pool.drain()  # replies still owed after an error or an abandoned iteration
        for waiting in queued:
            for shared in waiting:
                shared.release()
        pool.lock.release()


def _document(text: str, config: RenderConfig, pages: list[RenderedPage], tokenizer, seconds: float) -> RenderedDocument:
    tokens, method = count_text_tokens(text, tokenizer)
    font = resolve_font(config.font_path)
    missing = sum(p.missing_chars for p in pages)
    stats = RenderStats(len(text), tokens, method, sum(p.vision_tokens for p in pages), seconds, missing,
                        _most_missing(text, _char_table(font.face, config.fallback_fonts)) if missing else ())
    return RenderedDocument(config, pages, stats, font)


def _most_missing(text: str, table: CharTable, n: int = 8) -> tuple[str, ...]:
    """The characters drawn as missing-glyph boxes that the text uses most."""
    counts = Counter(ch for ch in text if ch not in WHITESPACE and table.lacks(ch))
    return tuple(ch for ch, _ in counts.most_common(n))


def render_document(doc: Any, config: RenderConfig, *, workers: int | None = None, tokenizer: Any = None,
                    progress: Callable[[int], None] | None = None, encode: bool = False) -> RenderedDocument:
    """Render a ``glyphserve.ingest.Document``: text parts become pages, image parts (pages
    without a text layer) pass through as ``scan`` pages scaled to fit the page size (``scan_page``).

    Char spans index ``doc.text`` (text parts joined with a blank line). ``workers``,
    ``progress`` and ``encode`` as for :func:`render_text` (``encode`` for the text pages: scan pages keep their
    pixels, or the PNG files they were made into as they were read, ``fit_scans``; ``RenderedPage.png()`` gives any
    page's PNG).
    """
    from glyphserve.ingest.document import PART_SEPARATOR

    t0 = time.perf_counter()
    pages: list[RenderedPage] = []
    offset = 0
    first_text = True
    for part in doc.parts:
        if hasattr(part, "text"):
            if not first_text:
                offset += len(PART_SEPARATOR)  # Document.text joins text parts with it
            first_text = False
            if _has_text(part.text):
                done = len(pages)
                part_progress = (lambda n, done=done: progress(done + n)) if progress else None
                pages.extend(_render_pages(part.text, config, workers, part_progress, first_number=done + 1,
                                           offset=offset, encode=encode))
            offset += len(part.text)
        else:
            pages.append(scan_page(part, config, len(pages) + 1, offset))
    if not pages:
        raise EmptyDocumentError("the document has no text or page images to render")
    text = doc.text
    result = _document(text, config, pages, tokenizer, time.perf_counter() - t0)
    result.source_name = getattr(doc, "source_name", None)
    return result


def count_pages(doc: Any, config: RenderConfig, stop_after: int,
                check: Callable[[], None] | None = None) -> int:
    """The pages ``render_document`` makes of ``doc``, from the line layout alone (no pixels: ~8x faster than
    rendering), counted no further than one past ``stop_after``: a server refuses a document over its page
    limit in a second, not after rendering the limit's pages. ``check`` is called after each page (a server's
    deadline: CJK text with fragments is laid out again on every page it continues to, and 750 pages of it took
    406 s to count)."""
    font = resolve_font(config.font_path)
    count = 0
    for part in doc.parts:
        if not hasattr(part, "text"):
            count += 1
        elif _has_text(part.text):
            layout = _layout_context(part.text, config, font)
            prepared = prepare(part.text)
            if layout.cjk and fills_pages(prepared, layout, stop_after + 1 - count):
                count = stop_after + 1
            else:
                for _ in zip(paginate(prepared, layout), range(stop_after + 1 - count)):
                    count += 1
                    if check:
                        check()
        if count > stop_after:
            break
    return count


def estimated_pages(doc: Any, config: RenderConfig) -> float:
    """A guess at the pages of ``doc`` from its source lines and the frame's size (Latin text's average width):
    each line takes its length over a full line's characters, one line at least (short lines fill pages too); with
    the newline marker, lines run on (the marker in them) up to each paragraph of ``LINES_PER_PARAGRAPH``."""
    per_line, lines_per_page = _frame(config)
    width = max(1, int(per_line))
    if config.newline_markup == MARKER_MARKUP:  # (40,000 lines of "ab": 34 pages, guessed 494 line by line)
        lines = 0.0
        for part in doc.parts:
            if hasattr(part, "text"):
                newlines = part.text.count("\n")
                # " \n " for each newline; each paragraph's last line half full
                lines += (len(part.text) + 2 * newlines) / width + (newlines // LINES_PER_PARAGRAPH + 1) / 2
        return lines / lines_per_page + sum(not hasattr(part, "text") for part in doc.parts)
    # lines longer than a full one, tried at line starts only (tried at every character, a line one short of it
    # cost its length squared: 0.4 s for 8 MiB of such lines)
    longer = re.compile(f"^[^\n]{{{width + 1},}}", re.MULTILINE)
    lines = 0
    for part in doc.parts:
        if hasattr(part, "text"):
            # one per line, and what lines longer than a full one add (not a list of every line's length:
            # 40M empty lines took 0.6 GB)
            lines += part.text.count("\n") + 1
            lines += sum(-(-(m.end() - m.start()) // width) - 1 for m in longer.finditer(part.text))
    return lines / lines_per_page + sum(not hasattr(part, "text") for part in doc.parts)


def _worker_count(workers: int | None, text: str, config: RenderConfig) -> int:
    """``workers`` if given, at most one per core and per page (more only wait: 100,000 asked for one page
    started that many processes); else 1 for short texts or a busy machine, else one process per core that is idle
    (from the load average, this process counted in it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    est_pages = len(text) / max(1.0, _chars_per_page(config))  # from the frame size
    if workers is not None:
        return max(1, min(int(workers), cores, math.ceil(est_pages)))
    if cores <= 1 or est_pages < PARALLEL_MIN_PAGES:
        return 1
    idle = cores - os.getloadavg()[0] + 1
    return max(1, min(cores, int(idle)))


def _frame(config: RenderConfig) -> tuple[float, float]:
    """(characters a line holds at Latin text's average width, lines a page holds)."""
    lines = (config.page_size[1] - 2 * config.margin_y - 12) / config.line_height
    per_line = (config.page_size[0] - 2 * config.margin_x - 12) / (0.5 * config.font_size)
    return per_line, max(1.0, lines)


def _chars_per_page(config: RenderConfig) -> float:
    per_line, lines = _frame(config)
    return lines * per_line

