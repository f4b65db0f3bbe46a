"""Paragraphs and pages, reproducing reportlab's Paragraph and Frame layout.

The official renderer lays text out with reportlab; the fast renderer must break every
line and every page in the same place. Every 30 source lines form one Paragraph, broken
into lines by ``western`` or ``cjk`` (CJK wrapping when the document has any character
in U+4E00..U+9FFF). Pages are SimpleDocTemplate frames of ``int(height / leading)`` lines,
without one-line orphans, and with reportlab's quirks when a paragraph continues on the
next page: it resumes at the ``<br/>`` ending the last kept line (an empty first line),
re-wraps the part it keeps (a word cut over lines may move), and re-wraps CJK remainders
with spaces added at former line ends. A paragraph's lines are laid out as the pages take them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

from glyphserve.render import cjk, western
from glyphserve.render.lines import FUZZ, LayoutContext, Line, fragment_count
from glyphserve.render.text import PreparedText, paragraph_ranges

# Longer paragraphs skip ``western.plain_lines``, which lays out a whole paragraph at once, for ``plain_line`` (one
# source line) or the general path, which lay out only the lines the pages take (a page holds ~4,000 characters).
PLAIN_MAX = 1 << 16
_FILL_CHUNK = 1 << 20  # characters ``fills_pages`` counts at a time
_SPACE_RE = re.compile(r"\s")


@dataclass
class Paragraph:
    """A paragraph (or the remainder of one continued on a later page) ready to place. Its lines are laid out as
    the pages need them: a paragraph can be one 40 MiB line (laid out whole, it took 23 s and 4.9 GB to count the
    pages of one a server refused after its 500th)."""

    more: Iterator[Line]  # the lines not laid out yet
    kind: int  # 0 simple / 1 fragments (reportlab's blPara.kind)
    red: bool  # the single fragment is the marker (kind 0 only)
    first_indent: float  # firstLineIndent (0 for continuations)
    continued: bool = False
    lines: list[Line] = field(default_factory=list)  # the lines laid out so far
    done: bool = False  # ``lines`` are all the lines
    spaced: bool = True  # CJK: it holds whitespace (without, reportlab's re-wrap of a remainder changes nothing)

    def lay_out(self, n: int | None = None) -> list[Line]:
        """Lay out the first ``n`` lines (all of them: None), fewer where the paragraph ends; returns the lines
        laid out so far."""
        if not self.done and (n is None or len(self.lines) < n):
            self.lines.extend(self.more if n is None else islice(self.more, n - len(self.lines)))
            self.done = n is None or len(self.lines) < n
        return self.lines

    def split(self, keep: int, ctx: LayoutContext) -> tuple[list[Line], Paragraph]:
        """Split after ``keep`` lines (laid out, with one more at least) as reportlab does: the lines drawn on
        this page and the remainder for the next one, re-wrapped the way reportlab re-wraps it."""
        head, rest = self.lines[:keep], self.lines[keep:]
        if ctx.cjk:
            more = cjk.carry_over(self.more, rest, self.kind, self.red, self.spaced, ctx)
            return head, Paragraph(more, self.kind, self.red, 0.0, True, spaced=self.spaced)
        head = western.rewrap_kept(head, self.kind, self.red, self.continued, ctx)
        if self.kind == 1 and head[-1].hard_break:
            # reportlab resumes at the <br/> that ended the last kept line, so the
            # remainder opens with an empty line; a kept line that held nothing but
            # that <br/> disappears when the first part is re-wrapped.
            if not head[-1].text:
                head = head[:-1]
            rest = [Line("", ctx.later_width, ctx.later_width, 0, True)] + rest
        return head, Paragraph(self.more, self.kind, self.red, 0.0, True, rest, self.done)


def break_paragraph(prepared: PreparedText, first: int, last: int, ctx: LayoutContext) -> Paragraph:
    """Lay out source lines [first, last) as one reportlab Paragraph (its lines as they are needed)."""
    widths = (ctx.first_width, ctx.later_width)
    frags = fragment_count(prepared, first, last)
    indent = ctx.config.first_line_indent
    if frags == 0:
        return Paragraph(iter(()), 0, False, indent)
    if frags == 1 and last - first == 2 and not ctx.marker:
        return Paragraph(iter(()), 0, False, indent)  # a lone <br/>: reportlab draws nothing
    red = frags == 1 and last - first == 2  # the lone marker fragment
    start, end = prepared.line(first)[0], prepared.line(last - 1)[1]
    if ctx.cjk:
        chunks = cjk.cjk_chunks(prepared, first, last, ctx)
        if frags == 1:
            spaced = red or _SPACE_RE.search(prepared.text, start, end) is not None
            return Paragraph(cjk.simple_lines(chunks, widths, red), 0, red, indent, spaced=spaced)
        return Paragraph(cjk.fragment_lines(chunks, widths), 1, False, indent)
    entities = western.needs_fragment_words(prepared, first, last)
    if not red and not (ctx.marker and frags > 1) and not entities:
        if end - start <= PLAIN_MAX:
            lines = western.plain_lines(prepared, first, last, ctx, frags == 1)
            if lines is not None:
                return Paragraph(iter(lines), 0 if frags == 1 else 1, False, indent)
        elif frags == 1:
            return Paragraph(western.plain_line(prepared, first, ctx), 0, False, indent)
    if frags == 1:
        words = iter([western.marker_word(ctx)]) if red else western.line_words(prepared, first, ctx)
        return Paragraph(western.simple_lines(words, ctx, widths, red), 0, red, indent)
    if entities:
        tokens = western.fragment_words(prepared, first, last, ctx)
    else:
        tokens = western.break_words(prepared, first, last, ctx)
    return Paragraph(western.fragment_lines(tokens, ctx, widths), 1, False, indent)


@dataclass
class PlacedParagraph:
    """A paragraph part drawn on a page, with the PDF geometry reportlab writes for it."""

    lines: list[Line]
    x: float  # the translation of the paragraph's origin (points, as written to the PDF)
    y: float
    height: float
    first_indent: float
    justify_last: bool  # reportlab justifies the last line of a part split off a longer one


@dataclass
class PageLayout:
    number: int
    paragraphs: list[PlacedParagraph] = field(default_factory=list)

    @property
    def lines(self) -> Iterator[tuple[PlacedParagraph, int, Line]]:
        for para in self.paragraphs:
            for i, line in enumerate(para.lines):
                yield para, i, line


def paginate(prepared: PreparedText, ctx: LayoutContext) -> Iterator[PageLayout]:
    """Place the paragraphs in frames page by page, exactly like SimpleDocTemplate."""
    cfg = ctx.config
    leading = cfg.line_height
    page = PageLayout(1)
    y = ctx.frame_top
    at_top = True
    prev_after = 0.0
    postponed = False

    def new_page() -> None:
        nonlocal page, y, at_top, prev_after
        page = PageLayout(page.number + 1)
        y = ctx.frame_top
        at_top = True
        prev_after = 0.0

    for first, last in paragraph_ranges(prepared):
        para: Paragraph | None = break_paragraph(prepared, first, last, ctx)
        while para is not None:
            before = 0.0 if at_top else max(cfg.space_before - prev_after, 0)
            avail = y - ctx.frame_bottom - before
            # a line more than fit is enough to tell that the paragraph does not
            para.lay_out(int((max(avail, 0) + FUZZ) / leading) + 2)
            height = len(para.lines) * leading
            if avail > 0 and y - (height + before) >= ctx.frame_bottom - FUZZ:
                y = _place(page, para.first_indent, para.lines, y - (height + before), height, ctx, False)
                y -= cfg.space_after
                prev_after = cfg.space_after
                at_top = at_top and height + before + cfg.space_after == 0
                para = None
                postponed = False
                continue
            keep = int(avail / leading) if avail > 0 else 0
            if keep > 1 and keep < len(para.lines):
                justify_last = not para.lines[keep - 1].hard_break
                indent = para.first_indent
                head, para = para.split(keep, ctx)
                part_height = len(head) * leading
                _place(page, indent, head, y - (part_height + before), part_height, ctx, justify_last)
                postponed = False
            elif postponed:
                raise AssertionError("layout error: a paragraph does not fit an empty page")
            else:
                postponed = True
            yield page
            new_page()
    yield page


def fills_pages(prepared: PreparedText, ctx: LayoutContext, pages: int) -> bool:
    """Whether CJK text surely takes ``pages`` pages or more, from the widths of its characters alone: a CJK
    line holds no more than its width (and FUZZ) and the one character it may keep past it, and a page no more
    lines than fit its frame. Laying such text out can take long: reportlab re-wraps a paragraph's remainder on
    every page it continues to, with a space added at each former line end where it has fragments, so every
    page lays out the pages before it again (counting 500 pages of a line of "中文&" took 256 s)."""
    lines_per_page = int((ctx.frame_top - ctx.frame_bottom + FUZZ) / ctx.config.line_height)
    line = max(ctx.first_width, ctx.later_width) + FUZZ
    widths = ctx.char_widths
    text = prepared.text
    content = widest = 0.0  # of the characters that are not whitespace, so none that reportlab may drop
    for a in range(0, len(text), _FILL_CHUNK):
        for ch, n in Counter(text[a : a + _FILL_CHUNK]).items():
            if not ch.isspace():
                content += n * widths[ch]
                widest = max(widest, widths[ch])
        if content > (line + widest) * lines_per_page * pages * (1 + 1e-9):  # (rounding: a margin)
            return True
    return False


def _place(page: PageLayout, first_indent: float, lines: list[Line], y_draw: float, height: float,
           ctx: LayoutContext, justify_last: bool) -> float:
    page.paragraphs.append(PlacedParagraph(lines, ctx.frame_x, y_draw, height, first_indent, justify_last))
    return y_draw

