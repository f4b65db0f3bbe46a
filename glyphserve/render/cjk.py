"""CJK line breaking: reportlab's ``breakLinesCJK`` (``cjkFragSplit`` / ``dumbSplit``).

Used for the whole document as soon as it holds a character in U+4E00..U+9FFF: lines
break between any two characters, a character that cannot start a line stays at the end
of the previous one (kinsoku), and inside a Latin run the break steps back to the last
space or CJK character. Characters are kept as parallel sequences (a ``CjkRun``), made and
laid out a chunk at a time: a break looks at no character after the one that overflowed the
line, so the lines a chunk finishes are final (laid out whole, a 13M-character line took 12 s
and 1.1 GB to count pages a server refused after its 500th).
"""

from __future__ import annotations

import re
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice

import numpy as np

from glyphserve.render.lines import FUZZ, MARKER_TEXT, LayoutContext, Line, stripped_segment
from glyphserve.render.text import WHITESPACE, WHITESPACE_CLASS, PreparedText, nbsp_view

# reportlab.lib.textsplit.ALL_CANNOT_START: characters kept at the end of a CJK line.
CANNOT_START = frozenset(
    "!',.:;?!\")]\u3001\u3002\u300d\u300f\u3011\u3015\uff3d\uff09"
    "\u3005\u2015\u3041\u3043\u3045\u3047\u3049\u3063\u3083\u3085\u3087\u308e\u30a1\u30a3"
    "\u30a5\u30a7\u30a9\u30c3\u30e3\u30e5\u30e7\u30ee\u30fc\u30f5\u30f6"
    "\u309b\u309c\u30fb\u30fd\u30fe\u309d\u309e\u2010\xb0\u2032\u2033\u2103\uffe0\uff05\u2030"
)

BREAK_CHAR = "\n"  # stands for a <br/> in a CJK run (no source newline survives in a paragraph)
CHUNK = 4096  # units (about source characters) made and laid out at a time
_BATCH = 64  # lines of a paragraph put through its remainder's re-wraps at a time
_WS_RUN_RE = re.compile(rf"[{WHITESPACE_CLASS}]+")
_WS_CODES = np.array([ord(ch) for ch in WHITESPACE], dtype="<u4")
# Where a chunk may end: not inside a whitespace run (it collapses to one space), unless both sides keep 2+ spaces
# of a run of spaces (all of which become U+00A0 either way).
_CUT_RE = re.compile(rf"(?<=[^{WHITESPACE_CLASS}])|(?=[^{WHITESPACE_CLASS}])|(?<=  )(?=  )")


@dataclass(slots=True)
class CjkRun:
    """Characters as reportlab's CJK wrapper sees them, as parallel sequences."""

    chars: str  # one character per unit; BREAK_CHAR for a <br/>
    widths: list[float]  # each unit's stringWidth
    offsets: list[int]  # source offset of each unit (-1: synthetic)
    red: frozenset[int] = frozenset()  # units drawn in the marker colour
    spaced_breaks: frozenset[int] = frozenset()  # <br/> units that became " " (continued paragraphs)

    def slice(self, a: int, b: int) -> CjkRun:
        return CjkRun(self.chars[a:b], self.widths[a:b], self.offsets[a:b],
                       frozenset(i - a for i in self.red if a <= i < b) if self.red else self.red,
                       frozenset(i - a for i in self.spaced_breaks if a <= i < b) if self.spaced_breaks
                       else self.spaced_breaks)


def cjk_chunks(prepared: PreparedText, first: int, last: int, ctx: LayoutContext) -> Iterator[CjkRun]:
    """The paragraph after reportlab's whitespace cleaning, with its separators, in runs of about ``CHUNK`` units."""
    text = prepared.text
    chars: list[str] = []
    offsets: list[int] = []
    red: list[int] = []
    marker = " " + MARKER_TEXT + " "

    def run() -> CjkRun:
        joined = "".join(chars)
        return CjkRun(joined, list(map(ctx.char_widths.__getitem__, joined)), offsets, frozenset(red))

    for i in range(first, last):
        if i > first:
            if ctx.marker:
                red.extend(range(len(offsets), len(offsets) + len(marker)))
                chars.append(marker)
                offsets.extend([-1] * len(marker))
            else:
                chars.append(BREAK_CHAR)
                offsets.append(-1)
        start, end = stripped_segment(prepared, i, first, last)
        while start < end:
            cut = end
            room = max(2, CHUNK - len(offsets))  # (a cut in a run of spaces keeps two of them on this side)
            if end - start > room and (m := _CUT_RE.search(text, start + room, end)):
                cut = m.start()
            units, where = _units(nbsp_view(text[start:cut]), start)
            chars.append(units)
            offsets.extend(where)
            start = cut
            if len(offsets) >= CHUNK:
                yield run()
                chars, offsets, red = [], [], []
    if offsets:
        yield run()


def _units(view: str, start: int) -> tuple[str, list[int]]:
    """The units of a stretch of a paragraph (U+00A0 for its 2+ space runs) and their source offsets: a
    whitespace run is one space, at the run's start. Found in C (one run at a time, 500 pages of a line of "中 "
    took 40% longer)."""
    if not _WS_RUN_RE.search(view):
        return view, list(range(start, start + len(view)))
    ws = np.isin(np.frombuffer(view.encode("utf-32-le", "surrogatepass"), dtype="<u4"), _WS_CODES)
    kept = ~ws
    kept[1:] |= ws[1:] & ~ws[:-1]
    kept[0] = True
    return _WS_RUN_RE.sub(" ", view), (np.flatnonzero(kept) + start).tolist()


Step = Callable[[CjkRun, tuple[float, float], bool], tuple[list[Line], int]]


class _Pending:
    """Units to lay out: what the last step left unfinished and what came since, joined when they are laid out
    again. That waits until they are twice as many should one line outgrow them (zero-width characters): joining
    each chunk to such a line would take time growing with its square."""

    def __init__(self):
        self.parts: list[CjkRun] = []
        self.size = 0
        self.tried = 0

    def add(self, units: CjkRun) -> bool:
        """Add ``units``; whether the units are worth laying out now."""
        self.parts.append(units)
        self.size += len(units.chars)
        return self.size >= 2 * self.tried

    def run(self) -> CjkRun:
        return self.parts[0] if len(self.parts) == 1 else join_runs(self.parts)

    def rest(self, run: CjkRun, start: int) -> None:
        """Keep what a step over ``run`` left unfinished, from ``start`` on."""
        self.size = self.tried = len(run.chars) - start
        self.parts = [run.slice(start, len(run.chars))] if self.size else []


def _lay_out(chunks: Iterable[CjkRun], widths: tuple[float, float], step: Step) -> Iterator[Line]:
    """The lines of a run that comes a chunk at a time: ``step`` gives the lines the units so far finish and where
    the unfinished one starts, to be laid out again with the next chunk."""
    pending = _Pending()
    for chunk in chunks:
        if pending.add(chunk):
            run = pending.run()
            lines, start = step(run, widths, False)
            if lines:
                widths = (widths[1], widths[1])
                yield from lines
            pending.rest(run, start)
    if pending.parts:
        yield from step(pending.run(), widths, True)[0]


def fragment_lines(chunks: Iterable[CjkRun], widths: tuple[float, float]) -> Iterator[Line]:
    """reportlab's ``cjkFragSplit`` (multi-fragment CJK paragraphs)."""
    return _lay_out(chunks, widths, _fragment_step)


def simple_lines(chunks: Iterable[CjkRun], widths: tuple[float, float], red: bool) -> Iterator[Line]:
    """reportlab's ``wordSplit``/``dumbSplit`` (single-fragment CJK paragraphs)."""
    return _lay_out(chunks, widths, lambda run, widths, final: _simple_step(run, widths, red, final))


def _fragment_step(run: CjkRun, widths: tuple[float, float], final: bool) -> tuple[list[Line], int]:
    """``cjkFragSplit`` over ``run``: the lines it finishes (all of them when ``final``) and where the next starts."""
    chars, cw, spaced = run.chars, run.widths, run.spaced_breaks
    lines: list[Line] = []
    i = line_start = 0
    used = 0.0
    max_width = widths[0]
    n = len(chars)
    while i < n:
        u = i
        i += 1
        w = cw[u]
        used += w
        brk = chars[u] == BREAK_CHAR or (spaced and u in spaced)
        if (used > max_width + FUZZ and used > 0) or brk:
            over = i
            extra = max_width - used
            if not brk:
                if ord(chars[u]) < 0x3000:
                    # inside a Latin run: step back to the last space or CJK character
                    for j in range(i - 1, (line_start + i) >> 1, -1):
                        cj = chars[j]
                        if cj != BREAK_CHAR and unicodedata.category(cj) == "Zs" or ord(cj) >= 0x3000:
                            k = j + 1
                            if k < i:
                                j = k + 1
                                extra += sum(cw[j:i])
                                w = cw[k]
                                u = k
                                i = j
                                break
                if chars[u] not in CANNOT_START and i > line_start + 1:
                    i -= 1
                    extra += w
            lines.append(_run_line(run, line_start, i, extra, max_width, bool(brk), over - i))
            max_width = widths[1]
            line_start = i
            used = 0.0
    if final and used > 0:
        lines.append(_run_line(run, line_start, n, max_width - used, max_width, False, -1))
        line_start = n
    return lines, line_start


def _simple_step(run: CjkRun, widths: tuple[float, float], red: bool, final: bool) -> tuple[list[Line], int]:
    """``dumbSplit`` over ``run``: the lines it finishes (all of them when ``final``) and where the next starts."""
    chars, cw = run.chars, run.widths
    lines: list[Line] = []
    i = line_start = 0
    used = 0.0
    max_width = widths[0]
    n = len(chars)
    while i < n:
        w = cw[i]
        c = chars[i]
        used += w
        i += 1
        if used > max_width + FUZZ and used > 0:
            over = i
            extra = max_width - used
            if ord(c) < 0x3000:
                for j in range(i - 1, (line_start + i) >> 1, -1):
                    cj = chars[j]
                    if unicodedata.category(cj) == "Zs" or ord(cj) >= 0x3000:
                        k = j + 1
                        if k < i:
                            j = k + 1
                            extra += sum(cw[j:i])
                            w = cw[k]
                            c = chars[k]
                            i = j
                            break
            if c not in CANNOT_START and i > line_start + 1:
                i -= 1
                extra += w
            # the line is drawn stripped (Python's str.strip)
            chunk = chars[line_start:i]
            lo = line_start + len(chunk) - len(chunk.lstrip())
            hi = max(lo, line_start + len(chunk.rstrip()))
            lines.append(_run_line(run, lo, hi, extra, max_width, False, over - i, all_red=red))
            lines[-1].stripped = (lo, hi) != (line_start, i)
            max_width = widths[1]
            line_start = i
            used = 0.0
    if final and used > 0:
        lines.append(_run_line(run, line_start, n, max_width - used, max_width, False, -1, all_red=red))
        line_start = n
    return lines, line_start


def _run_line(run: CjkRun, a: int, b: int, extra: float, max_width: float, brk: bool, ahead: int, *,
              all_red: bool = False) -> Line:
    part = run.slice(a, b)
    text = part.chars.replace(BREAK_CHAR, "")
    spans: list[tuple[int, int]] = []
    if all_red:
        if text:
            spans.append((0, len(text)))
    elif part.red:
        pos = 0
        for i, ch in enumerate(part.chars):
            if ch == BREAK_CHAR:
                continue
            if i in part.red:
                if spans and spans[-1][1] == pos:
                    spans[-1] = (spans[-1][0], pos + 1)
                else:
                    spans.append((pos, pos + 1))
            pos += 1
    end = max(part.offsets, default=-1)
    return Line(text, extra, max_width, 1, brk, tuple(spans), part, end=end + 1 if end >= 0 else -1, ahead=ahead)


def join_runs(runs: list[CjkRun]) -> CjkRun:
    chars, widths, offsets, red, spaced = [], [], [], set(), set()
    base = 0
    for run in runs:
        chars.append(run.chars)
        widths.extend(run.widths)
        offsets.extend(run.offsets)
        red.update(base + i for i in run.red)
        spaced.update(base + i for i in run.spaced_breaks)
        base += len(run.chars)
    return CjkRun("".join(chars), widths, offsets, frozenset(red), frozenset(spaced))


def carry_over(more: Iterator[Line], carried: list[Line], kind: int, red: bool, spaced: bool,
               ctx: LayoutContext) -> Iterator[Line]:
    """The lines of the remainder of a CJK paragraph on the next page: ``carried`` (laid out already), then
    ``more``, re-wrapped as reportlab does."""
    if kind == 0 and not spaced:
        # reportlab re-wraps the remaining (stripped) line texts joined together: where no line lost whitespace
        # (none can in a paragraph without any) that is the same text from the same point, so the same lines
        return chain(carried, more)
    remainder = more if isinstance(more, Remainder) else Remainder(more)
    remainder.add(_Rewrap(red, ctx) if kind == 0 else _SpacedRewrap(ctx), carried)
    return remainder


class Remainder:
    """The lines of what a CJK paragraph carries over to a later page: reportlab re-wraps the remainder on every
    page, so they are the paragraph's lines put through one re-wrap per page, a few at a time (a generator per
    page, each drawing on the one before, ran out of stack after 500 pages)."""

    def __init__(self, lines: Iterator[Line]):
        self.lines = lines
        self.rewraps: list[_Rewrap | _SpacedRewrap] = []
        self.ready: deque[Line] = deque()
        self.ended = False

    def add(self, rewrap: _Rewrap | _SpacedRewrap, carried: list[Line]) -> None:
        """Re-wrap the lines from ``carried`` on (lines laid out already, then the rest) once more."""
        out = rewrap.feed(carried + list(self.ready))
        self.ready = deque(out + rewrap.end() if self.ended else out)
        self.rewraps.append(rewrap)

    def __iter__(self) -> Remainder:
        return self

    def __next__(self) -> Line:
        while not self.ready:
            if self.ended:
                raise StopIteration
            batch = list(islice(self.lines, _BATCH))
            self.ended = len(batch) < _BATCH
            if self.ended:
                for rewrap in self.rewraps:
                    batch = rewrap.feed(batch) + rewrap.end()
            else:
                batch = self._through(batch)
            self.ready.extend(batch)
        return self.ready.popleft()

    def _through(self, batch: list[Line]) -> list[Line]:
        """``batch`` put through the re-wraps. Those in step at the top (each waiting for the line after the one it
        holds) pass it along together where each would pass it as it is: one check per pair of lines, not one per
        line and page (500 pages of a Chinese line with spaces took 7 s)."""
        rewraps = self.rewraps
        k = len(rewraps)
        while k and rewraps[k - 1].in_step():
            k -= 1
        for rewrap in rewraps[:k]:
            batch = rewrap.feed(batch)
        together = rewraps[k:][::-1]  # the last to get a line first
        if not together or not batch:
            return batch
        lines = [rewrap.held for rewrap in together] + batch  # the stream they see, in order
        width = together[0].widths[0]
        if all(_made_again(line, following, width) for line, following in zip(lines, lines[1:])):
            for rewrap, line in zip(together, lines[len(batch):]):
                rewrap.held = line
            return lines[: len(batch)]
        for rewrap in together[::-1]:
            batch = rewrap.feed(batch)
        return batch


class _Rewrap:
    """A single-fragment paragraph's remainder re-wrapped: its (stripped) lines joined and laid out again. A line
    is made again where it lost no whitespace and neither did the next line, which holds the units its break
    looked at: such a line comes through as it is, and re-wrapping goes on only until a new line ends where an
    old one did."""

    def __init__(self, red: bool, ctx: LayoutContext):
        self.red = red
        self.widths = (ctx.later_width, ctx.later_width)
        self.held: Line | None = None  # the last line fed (its fate waits for the next one)
        self.pending = _Pending()  # units of the line being made again, and after it

    def in_step(self) -> bool:
        """Whether it holds a line and makes none again (see ``Remainder._through``)."""
        return self.held is not None and not self.pending.parts

    def feed(self, lines: list[Line]) -> list[Line]:
        out: list[Line] = []
        for line in lines:
            if self.held is not None:
                self._take(self.held, line, out)
            self.held = line
        return out

    def end(self) -> list[Line]:
        out: list[Line] = []
        if self.held is not None:
            self._take(self.held, None, out)
        return out

    def _take(self, line: Line, following: Line | None, out: list[Line]) -> None:
        if not self.pending.parts and _made_again(line, following, self.widths[0]):
            out.append(line)
            return
        if not self.pending.add(line.units) and following is not None:
            return
        run = self.pending.run()
        lines, start = _simple_step(run, self.widths, self.red, following is None)
        out += lines
        self.pending.rest(run, start)


def _made_again(line: Line, following: Line | None, width: float) -> bool:
    """Whether a line comes out of the re-wrap as it is (see ``_Rewrap``)."""
    if line.stripped or line.max_width != width:
        return False
    if line.ahead < 0:  # it ended its run
        return following is None
    return line.ahead == 0 or (following is not None and not following.stripped
                               and line.ahead <= len(following.units.chars))


class _SpacedRewrap:
    """A multi-fragment paragraph's remainder re-wrapped: its lines' fragments laid out again with a space added at
    the end of every line but the last (a <br/> ending one becomes a space itself, still ending the line)."""

    def __init__(self, ctx: LayoutContext):
        self.space = ctx.space
        self.widths = (ctx.later_width, ctx.later_width)
        self.held: Line | None = None  # the last line fed (the last of all gets no space)
        self.pending = _Pending()

    def in_step(self) -> bool:
        return False  # every line gets a space: every line is laid out again

    def feed(self, lines: list[Line]) -> list[Line]:
        out: list[Line] = []
        for line in lines:
            if self.held is not None:
                self._add(self._spaced(self.held.units), out)
            self.held = line
        return out

    def end(self) -> list[Line]:
        out: list[Line] = []
        if self.held is not None:
            self._add(self.held.units, out)
        if self.pending.parts:
            out += _fragment_step(self.pending.run(), self.widths, True)[0]
        return out

    def _spaced(self, part: CjkRun) -> CjkRun:
        last = len(part.chars) - 1
        if last >= 0 and part.chars[last] == BREAK_CHAR:
            return CjkRun(part.chars[:last] + " ", part.widths[:last] + [self.space], part.offsets,
                          part.red, part.spaced_breaks | {last})
        if last < 0 or part.chars[last] != " ":
            red_units = part.red | ({last + 1} if last in part.red else set())
            return CjkRun(part.chars + " ", part.widths + [self.space], part.offsets + [-1],
                          frozenset(red_units), part.spaced_breaks)
        return part

    def _add(self, units: CjkRun, out: list[Line]) -> None:
        if self.pending.add(units):
            run = self.pending.run()
            lines, start = _fragment_step(run, self.widths, False)
            out += lines
            self.pending.rest(run, start)
