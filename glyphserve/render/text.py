"""Text preparation shared by the layout engine: Glyph's normalisation, paragraph grouping
and reportlab's whitespace rules, with offsets back into the caller's text.

The official script removes soft hyphens and zero-width spaces, turns every run of two or
more spaces into that many ``&nbsp;``, splits on ``\\n`` and joins every 30 source lines
into one reportlab Paragraph with the newline markup between them. reportlab then
collapses every other run of whitespace to one space and strips the paragraph's ends.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

LINES_PER_PARAGRAPH = 30

# reportlab's whitespace (paragraph.py ``_wsc``): what collapses and separates words.
# U+00A0 is not in it; U+200B is, but Glyph removes it beforehand.
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u200b\u2028\u2029\u202f\u205f\u3000"
)
_WS_CLASS = re.escape(WHITESPACE)
# A word: non-whitespace, or runs of 2+ spaces (which Glyph turned into &nbsp; entities).
WORD_RE = re.compile(rf"(?:[^{_WS_CLASS}]| {{2,}})+")
NBSP_RUN_RE = re.compile(r" {2,}")
# Characters that reach reportlab as XML entities, so each is a separate text fragment.
ENTITY_RUN_RE = re.compile(r" {2,}|[&<>]")
# Inside a word every space belongs to a 2+ run: pieces are single entities or runs of text.
ENTITY_PIECE_RE = re.compile(r"[&<> ]|[^&<> ]+")


@dataclass
class PreparedText:
    """The text after Glyph's character removal, split into source lines."""

    text: str  # without U+00AD / U+200B
    original_length: int
    line_starts: list[int]  # offset of each source line in ``text``; lines end at the next "\n"
    _index: np.ndarray | None  # text offset -> original offset (None when nothing was removed)

    def line(self, i: int) -> tuple[int, int]:
        start = self.line_starts[i]
        end = self.line_starts[i + 1] - 1 if i + 1 < len(self.line_starts) else len(self.text)
        return start, end

    @property
    def line_count(self) -> int:
        return len(self.line_starts)

    def to_original(self, offset: int) -> int:
        """Map an offset of ``text`` (0..len) to the caller's text."""
        if self._index is None:
            return offset
        if offset >= len(self.text):
            return self.original_length
        return int(self._index[offset])


def prepare(text: str) -> PreparedText:
    index = None
    if "\xad" in text or "\u200b" in text:
        keep = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        mask = (keep != 0xAD) & (keep != 0x200B)
        index = np.flatnonzero(mask)
        cleaned = text.replace("\xad", "").replace("\u200b", "")
    else:
        cleaned = text
    starts = [0]
    find = cleaned.find
    pos = find("\n")
    while pos >= 0:
        starts.append(pos + 1)
        pos = find("\n", pos + 1)
    return PreparedText(cleaned, len(text), starts, index)


def paragraph_ranges(prepared: PreparedText) -> list[tuple[int, int]]:
    """[first_line, end_line) of every Paragraph: 30 source lines each."""
    n = prepared.line_count
    return [(i, min(i + LINES_PER_PARAGRAPH, n)) for i in range(0, n, LINES_PER_PARAGRAPH)]


def pdf_number(v: float) -> float:
    """A number as reportlab writes it into the PDF (``fp_str``) and a PDF reader reads it back."""
    sa = abs(v)
    if sa <= 1e-7:
        return 0.0
    places = 6 if sa <= 1 else min(max(0, 6 - int(math.log10(sa))), 6)
    return float(f"{v:.{places}f}")


def nbsp_view(segment: str) -> str:
    """The characters reportlab draws for a source segment: 2+ space runs become U+00A0."""
    if "  " not in segment:
        return segment
    return NBSP_RUN_RE.sub(lambda m: "\xa0" * len(m.group()), segment)
