"""What a laid-out line is, how reportlab measures text, and the markup facts shared by
the Western and CJK line breakers (see ``layout``)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from glyphserve.render.config import MARKER_MARKUP, RenderConfig
from glyphserve.render.fonts import FontFace, WidthMap
from glyphserve.render.text import ENTITY_PIECE_RE, ENTITY_RUN_RE, WHITESPACE, WHITESPACE_CLASS, PreparedText

FUZZ = 1e-6  # reportlab's _FUZZ
SPACE_SHRINKAGE = 0.05  # reportlab's rl_config.spaceShrinkage
FRAME_PADDING = 6.0  # reportlab Frame's default padding on every side
MARKER_TEXT = "\\n"  # what the red marker draws (between two spaces)
_LIMIT_TABLE = 256  # line_limits precomputes this many word counts
_CACHED_WORD = 128  # the longest word whose width is cached (the cache outlives the layout: a 40 MiB word stayed)
_STRIP_CHUNK = 4096  # characters read back at a time for the whitespace ending a paragraph
# The whitespace reportlab strips from a paragraph's start; a run of 2+ spaces is &nbsp; by then, so it ends there.
_LEADING_WS = re.compile(rf"(?:(?!  )[{WHITESPACE_CLASS}])*")
_ENTITY_STARTS = ("&", "<", ">", "  ")


@dataclass(slots=True)
class Line:
    """One laid-out line of a paragraph."""

    text: str  # the characters drawn, in order
    extra: float  # unused width (negative when the line overflows into the shrinkage)
    max_width: float
    word_count: int  # what reportlab divides extra space by (with the U+00A0 count)
    hard_break: bool = False  # ended by a <br/>
    red: tuple[tuple[int, int], ...] = ()  # [start, end) ranges of ``text`` in the marker colour
    units: Any = None  # CJK: the characters as reportlab saw them (a CjkRun, for re-wrapping)
    words: list | None = None  # Western: the words on the line (for re-wrapping)
    end: int = -1  # source offset just past the last source character drawn (-1: none)
    stripped: bool = False  # CJK single-fragment: whitespace at the line's ends was dropped
    end_ref: tuple[Any, int] | None = None  # (its source line's word ends, words so far): ``end``, lazily
    ahead: int = 0  # CJK: units after the line its break looked at (-1: the line ended its run)

    def source_end(self) -> int:
        if self.end_ref is not None:
            words, count = self.end_ref
            self.end = words.end(count)
            self.end_ref = None
        return self.end


def frame_geometry(cfg: RenderConfig) -> tuple[float, float, float, float]:
    """SimpleDocTemplate's frame, in reportlab's own operation order: (x of the text,
    top and bottom of the text area, available width), points from the bottom left."""
    w, h = cfg.page_size
    width = (w - cfg.margin_x) - cfg.margin_x
    height = (h - cfg.margin_y) - cfg.margin_y
    x1, y1 = cfg.margin_x, cfg.margin_y
    x2, y2 = x1 + width, y1 + height
    return x1 + FRAME_PADDING, y2 - FRAME_PADDING, y1 + FRAME_PADDING, x2 - x1 - FRAME_PADDING - FRAME_PADDING


@dataclass
class LayoutContext:
    config: RenderConfig
    widths: WidthMap
    cjk: bool

    def __post_init__(self) -> None:
        cfg = self.config
        self.k = 0.001 * cfg.font_size
        self.space = self.k * self.widths[" "]
        self.frame_x, self.frame_top, self.frame_bottom, self.avail_width = frame_geometry(cfg)
        self.first_width = self.avail_width - (cfg.left_indent + cfg.first_line_indent) - cfg.right_indent
        self.later_width = self.avail_width - cfg.left_indent - cfg.right_indent
        self.marker = cfg.newline_markup == MARKER_MARKUP
        self._word_widths = _word_width_cache(self.widths.table.faces, cfg.font_size)
        self.char_widths = _char_width_cache(self.widths.table.faces, cfg.font_size, self.widths)
        self._limits = {simple: {w: [self.line_limit(w, k, simple) for k in range(_LIMIT_TABLE)]
                                 for w in {self.first_width, self.later_width}}
                        for simple in (True, False)}

    def line_limit(self, max_width: float, words: int, simple: bool) -> float:
        """The widest a line may get when it takes its ``words``-th word (1-based from the
        second): reportlab lets spaces shrink by 5%, in two slightly different float
        expressions for its simple and fragment paths."""
        if simple:
            return max_width + SPACE_SHRINKAGE * self.space * words
        return max_width + (self.space + (words - 1) * self.space) * SPACE_SHRINKAGE

    def line_limits(self, simple: bool) -> dict[float, list[float]]:
        """``line_limit`` precomputed for the usual word counts, per max width."""
        return self._limits[simple]

    def word_width(self, raw: str) -> float:
        """Width of a source word as reportlab measures it: fragment by fragment, each
        entity (``&``, ``<``, ``>``, and every space of a 2+ run, i.e. ``&nbsp;``) on its own."""
        cached = self._word_widths.get(raw)
        if cached is None:
            wm = self.widths
            if _has_entities(raw):
                cached = 0
                for piece in ENTITY_PIECE_RE.findall(raw):
                    cached += self.k * sum(map(wm.__getitem__, piece))
            else:
                cached = self.k * sum(map(wm.__getitem__, raw))
            if len(raw) <= _CACHED_WORD and len(self._word_widths) < 500_000:
                self._word_widths[raw] = cached
        return cached

    def string_width(self, text: str) -> float:
        return self.k * sum(map(self.widths.__getitem__, text))


@lru_cache(maxsize=16)
def _word_width_cache(faces: tuple[FontFace, ...], font_size: float) -> dict[str, float]:
    """Word widths are pure functions of the fonts and size: shared by every layout."""
    return {}


class _CharWidths(dict):
    """char -> stringWidth(char) at one font size (0 for the CJK <br/> sentinel)."""

    def __init__(self, widths: WidthMap, k: float):
        super().__init__()
        self.widths, self.k = widths, k

    def __missing__(self, ch: str) -> float:
        value = self[ch] = 0.0 if ch == "\n" else self.k * self.widths[ch]
        return value


_CHAR_WIDTHS: dict[tuple[tuple[FontFace, ...], float], _CharWidths] = {}


def _char_width_cache(faces: tuple[FontFace, ...], font_size: float, widths: WidthMap) -> _CharWidths:
    """Shared by every layout with these fonts and size (widths never change)."""
    cache = _CHAR_WIDTHS.get((faces, font_size))
    if cache is None:
        cache = _CHAR_WIDTHS[(faces, font_size)] = _CharWidths(widths, 0.001 * font_size)
    return cache


def _has_entities(raw: str) -> bool:
    return "&" in raw or "<" in raw or ">" in raw or " " in raw


def entity_runs(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """[start, end) of each entity run in ``text[start:end]`` (what ``ENTITY_RUN_RE`` finds), found with
    ``str.find``: the regular expression took 0.66 s to find none in a 40 MiB line."""
    find = text.find
    hits = {s: find(s, start, end) for s in _ENTITY_STARTS}
    pos = start
    while True:
        for s, hit in hits.items():
            if 0 <= hit < pos:
                hits[s] = find(s, pos, end)
        hit = min((h for h in hits.values() if h >= 0), default=-1)
        if hit < 0:
            return
        pos = ENTITY_RUN_RE.match(text, hit, end).end()
        yield hit, pos


def _count_fragments(text: str, start: int, end: int, enough: int) -> int:
    """Fragments reportlab's parser makes of ``text[start:end]``, counted up to ``enough``: one per entity
    (``&``, ``<``, ``>``, each space of a 2+ run) and one per text run between them."""
    count = 0
    pos = start
    for a, b in entity_runs(text, start, end):
        count += (a > pos) + b - a
        pos = b
        if count >= enough:
            return count
    return count + (end > pos)


def stripped_segment(prepared: PreparedText, i: int, first: int, last: int) -> tuple[int, int]:
    """Source bounds of line ``i`` once reportlab strips the paragraph's two ends (a run of
    2+ spaces is ``&nbsp;`` by then, so it survives)."""
    start, end = prepared.line(i)
    if i != first and i != last - 1:
        return start, end
    text = prepared.text
    lo = _LEADING_WS.match(text, start, end).end() if i == first else start
    hi = _stripped_end(text, start, end) if i == last - 1 else end
    return lo, max(lo, hi)


def _stripped_end(text: str, start: int, end: int) -> int:
    """Where ``text[start:end]`` ends without its trailing whitespace, bar the last 2+ space run (``&nbsp;``)."""
    pos = end
    while pos > start:
        a = max(start, pos - _STRIP_CHUNK)
        kept = len(text[a:pos].rstrip(WHITESPACE))
        if kept:
            pos = a + kept
            break
        pos = a
    run = text.rfind("  ", pos, end)
    return run + 2 if run >= 0 else pos


def fragment_count(prepared: PreparedText, first: int, last: int) -> int:
    """How many fragments the paragraph's markup parses into, counted until there are two
    (1 => reportlab's simple path)."""
    count = last - first - 1  # one per separator
    for i in range(first, last):
        start, end = stripped_segment(prepared, i, first, last)
        if end > start:
            count += _count_fragments(prepared.text, start, end, 2 - count)
            if count > 1:
                return count
    return count
