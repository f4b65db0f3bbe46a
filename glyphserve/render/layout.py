"""Paragraphs and pages, reproducing reportlab's Paragraph and Frame layout.

The official renderer lays text out with reportlab; the fast renderer must break every
line and every page in the same place. Every 30 source lines form one Paragraph, broken
into lines by ``western`` or ``cjk`` (CJK wrapping when the document has any character
in U+4E00..U+9FFF). Pages are SimpleDocTemplate frames of ``int(height / leading)`` lines,
without one-line orphans, and with reportlab's quirks when a paragraph continues on the
next page: it resumes at the ``<br/>`` ending the last kept line (an empty first line),
re-wraps the part it keeps (a word cut over lines may move), and re-wraps CJK remainders
with spaces added at former line ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from glyphserve.render import cjk, western
from glyphserve.render.lines import FUZZ, LayoutContext, Line, fragment_count
from glyphserve.render.text import PreparedText, paragraph_ranges


@dataclass
class Paragraph:
    """A paragraph (or the remainder of one continued on a later page) ready to place."""

    lines: list[Line]
    kind: int  # 0 simple / 1 fragments (reportlab's blPara.kind)
    red: bool  # the single fragment is the marker (kind 0 only)
    first_indent: float  # firstLineIndent (0 for continuations)
    continued: bool = False

    def split(self, keep: int, ctx: LayoutContext) -> tuple[list[Line], Paragraph]:
        """Split after ``keep`` lines as reportlab does: the lines drawn on this page and
        the remainder for the next one, re-wrapped the way reportlab re-wraps it."""
        head, rest = self.lines[:keep], self.lines[keep:]
        if ctx.cjk:
            return head, Paragraph(cjk.continuation(rest, self.kind, self.red, ctx), self.kind, self.red, 0.0, True)
        head = western.rewrap_kept(head, self.kind, self.red, self.continued, ctx)
        if self.kind == 1 and head[-1].hard_break:
            # reportlab resumes at the <br/> that ended the last kept line, so the
            # remainder opens with an empty line; a kept line that held nothing but
            # that <br/> disappears when the first part is re-wrapped.
            if not head[-1].text:
                head = head[:-1]
            rest = [Line("", ctx.later_width, ctx.later_width, 0, True)] + rest
        return head, Paragraph(rest, self.kind, self.red, 0.0, True)


def break_paragraph(prepared: PreparedText, first: int, last: int, ctx: LayoutContext) -> Paragraph:
    """Lay out source lines [first, last) as one reportlab Paragraph."""
    widths = (ctx.first_width, ctx.later_width)
    frags = fragment_count(prepared, first, last)
    indent = ctx.config.first_line_indent
    if frags == 0:
        return Paragraph([], 0, False, indent)
    if frags == 1 and last - first == 2 and not ctx.marker:
        return Paragraph([], 0, False, indent)  # a lone <br/>: reportlab draws nothing
    red = frags == 1 and last - first == 2  # the lone marker fragment
    if ctx.cjk:
        run = cjk.cjk_run(prepared, first, last, ctx)
        if frags == 1:
            return Paragraph(cjk.simple_lines(run, widths, red), 0, red, indent)
        return Paragraph(cjk.fragment_lines(run, widths), 1, False, indent)
    entities = western.needs_fragment_words(prepared, first, last)
    if not red and not (ctx.marker and frags > 1) and not entities:
        lines = western.plain_lines(prepared, first, last, ctx, frags == 1)
        if lines is not None:
            return Paragraph(lines, 0 if frags == 1 else 1, False, indent)
    if frags == 1:
        words = [western.marker_word(ctx)] if red else list(western.line_words(prepared, first, ctx))
        return Paragraph(western.simple_lines(words, ctx, widths, red), 0, red, indent)
    if entities:
        tokens = western.fragment_words(prepared, first, last, ctx)
    else:
        tokens = []
        for i in range(first, last):
            if i > first:
                tokens.append(western.marker_word(ctx) if ctx.marker else western.BREAK)
            tokens.extend(western.line_words(prepared, i, ctx))
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


def _place(page: PageLayout, first_indent: float, lines: list[Line], y_draw: float, height: float,
           ctx: LayoutContext, justify_last: bool) -> float:
    page.paragraphs.append(PlacedParagraph(lines, ctx.frame_x, y_draw, height, first_indent, justify_last))
    return y_draw

