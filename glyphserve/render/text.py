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
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

LINES_PER_PARAGRAPH = 30
_REMOVED_CHUNK = 1 << 20  # characters ``prepare`` scans at a time for soft hyphens and zero-width spaces

# reportlab's whitespace (paragraph.py ``_wsc``): what collapses and separates words.
# U+00A0 is not in it; U+200B is, but Glyph removes it beforehand.
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u200b\u2028\u2029\u202f\u205f\u3000"
)
WHITESPACE_CLASS = re.escape(WHITESPACE)  # inside a regular expression's [...]
# A word: non-whitespace, or runs of 2+ spaces (which Glyph turned into &nbsp; entities). Runs, not single
# characters, repeat in the group: one character at a time, matching a 40 MiB word took 16 s.
WORD_RE = re.compile(rf"(?:[^{WHITESPACE_CLASS}]+| {{2,}})+")
NBSP_RUN_RE = re.compile(r" {2,}")
# Characters that reach reportlab as XML entities, so each is a separate text fragment.
ENTITY_RUN_RE = re.compile(r" {2,}|[&<>]")
# Inside a word every space belongs to a 2+ run: pieces are single entities or runs of text.
ENTITY_PIECE_RE = re.compile(r"[&<> ]|[^&<> ]+")


@dataclass
class PreparedText:
    """The text after Glyph's character removal, split into source lines as the layout reaches them (indexing
    40M empty lines up front took 8 s and 1.8 GB)."""

    text: str  # without U+00AD / U+200B
    original_length: int
    _removed: np.ndarray | None  # per removed character, the kept ones before it (None when nothing was removed)
    line_starts: list[int] = field(default_factory=lambda: [0])  # offsets of the source lines found so far
    _scan: int = 0  # where the search for the next "\n" resumes (-1: all lines found)

    def line(self, i: int) -> tuple[int, int]:
        """Source line ``i`` (one ``lines_up_to`` has reached)."""
        start = self.line_starts[i]
        end = self.line_starts[i + 1] - 1 if i + 1 < len(self.line_starts) else len(self.text)
        return start, end

    def lines_up_to(self, n: int) -> int:
        """Find the source lines up to the ``n``-th; returns how many lines there are up to it."""
        starts = self.line_starts
        pos = self._scan
        if len(starts) <= n and pos >= 0:
            find = self.text.find
            while len(starts) <= n:
                pos = find("\n", pos)
                if pos < 0:
                    break
                pos += 1
                starts.append(pos)
            self._scan = pos
        return min(n, len(starts))

    def to_original(self, offset: int) -> int:
        """Map an offset of ``text`` (0..len) to the caller's text."""
        if offset >= len(self.text):
            return self.original_length
        if self._removed is None:
            return offset
        return offset + int(np.searchsorted(self._removed, offset, side="right"))


def prepare(text: str) -> PreparedText:
    removed = None
    if "\xad" in text or "\u200b" in text:
        # where they were, not an index of every character (8 bytes each, 320 MB for a 40 MiB text)
        found = []
        for a in range(0, len(text), _REMOVED_CHUNK):
            codes = np.frombuffer(text[a : a + _REMOVED_CHUNK].encode("utf-32-le"), dtype="<u4")
            found.append(np.flatnonzero((codes == 0xAD) | (codes == 0x200B)) + a)
        where = np.concatenate(found)
        removed = where - np.arange(len(where))
        cleaned = text.replace("\xad", "").replace("\u200b", "")
    else:
        cleaned = text
    return PreparedText(cleaned, len(text), removed)


def paragraph_ranges(prepared: PreparedText) -> Iterator[tuple[int, int]]:
    """[first_line, end_line) of every Paragraph: 30 source lines each."""
    first = 0
    while (last := prepared.lines_up_to(first + LINES_PER_PARAGRAPH)) > first:
        yield first, last
        first = last


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
