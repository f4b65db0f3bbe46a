"""CJK line breaking: reportlab's ``breakLinesCJK`` (``cjkFragSplit`` / ``dumbSplit``).

Used for the whole document as soon as it holds a character in U+4E00..U+9FFF: lines
break between any two characters, a character that cannot start a line stays at the end
of the previous one (kinsoku), and inside a Latin run the break steps back to the last
space or CJK character. Characters are kept as parallel sequences (a ``CjkRun``).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from glyphserve.render.lines import FUZZ, MARKER_TEXT, LayoutContext, Line, stripped_segment
from glyphserve.render.text import WHITESPACE, PreparedText, nbsp_view

# reportlab.lib.textsplit.ALL_CANNOT_START: characters kept at the end of a CJK line.
CANNOT_START = frozenset(
    "!',.:;?!\")]\u3001\u3002\u300d\u300f\u3011\u3015\uff3d\uff09"
    "\u3005\u2015\u3041\u3043\u3045\u3047\u3049\u3063\u3083\u3085\u3087\u308e\u30a1\u30a3"
    "\u30a5\u30a7\u30a9\u30c3\u30e3\u30e5\u30e7\u30ee\u30fc\u30f5\u30f6"
    "\u309b\u309c\u30fb\u30fd\u30fe\u309d\u309e\u2010\xb0\u2032\u2033\u2103\uffe0\uff05\u2030"
)

BREAK_CHAR = "\n"  # stands for a <br/> in a CJK run (no source newline survives in a paragraph)


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
                       frozenset(i - a for i in self.red if a <= i < b),
                       frozenset(i - a for i in self.spaced_breaks if a <= i < b))


def cjk_run(prepared: PreparedText, first: int, last: int, ctx: LayoutContext) -> CjkRun:
    """The paragraph after reportlab's whitespace cleaning, with its separators."""
    chars: list[str] = []
    offsets: list[int] = []
    red: list[int] = []
    marker = " " + MARKER_TEXT + " "
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
        if start >= end:
            continue
        view = nbsp_view(prepared.text[start:end])
        for m in _RUN_RE.finditer(view):
            a, b = m.span()
            if view[a] in WHITESPACE:
                chars.append(" ")
                offsets.append(start + a)
            else:
                chars.append(m.group())
                offsets.extend(range(start + a, start + b))
    text = "".join(chars)
    return CjkRun(text, list(map(ctx.char_widths.__getitem__, text)), offsets, frozenset(red))


_RUN_RE = re.compile(rf"[{re.escape(WHITESPACE)}]+|[^{re.escape(WHITESPACE)}]+")


def fragment_lines(run: CjkRun, widths: tuple[float, float]) -> list[Line]:
    """reportlab's ``cjkFragSplit`` (multi-fragment CJK paragraphs)."""
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
            lines.append(_run_line(run, line_start, i, extra, max_width, brk))
            max_width = widths[1]
            line_start = i
            used = 0.0
    if used > 0:
        lines.append(_run_line(run, line_start, n, max_width - used, max_width, False))
    return lines


def simple_lines(run: CjkRun, widths: tuple[float, float], red: bool) -> list[Line]:
    """reportlab's ``wordSplit``/``dumbSplit`` (single-fragment CJK paragraphs)."""
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
            lines.append(_run_line(run, lo, hi, extra, max_width, False, all_red=red))
            lines[-1].stripped = (lo, hi) != (line_start, i)
            max_width = widths[1]
            line_start = i
            used = 0.0
    if used > 0:
        lines.append(_run_line(run, line_start, n, max_width - used, max_width, False, all_red=red))
    return lines


def _run_line(run: CjkRun, a: int, b: int, extra: float, max_width: float, brk: bool, *,
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
    return Line(text, extra, max_width, 1, brk, tuple(spans), part, end=end + 1 if end >= 0 else -1)


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


def continuation(rest: list[Line], kind: int, red: bool, ctx: LayoutContext) -> list[Line]:
    """The remainder of a CJK paragraph on the next page, re-wrapped as reportlab does."""
    widths = (ctx.later_width, ctx.later_width)
    if kind == 0:
        # reportlab re-wraps the remaining (stripped) line texts joined together; when no
        # line lost whitespace that is the same text from the same point: the same lines
        if not any(ln.stripped for ln in rest):
            return rest
        return simple_lines(join_runs([ln.units for ln in rest]), widths, red)
    # ... or their fragments, with a space added at the end of every former line (a <br/>
    # ending one becomes a space itself, still ending the line)
    parts = []
    for i, line in enumerate(rest):
        part = line.units
        if i < len(rest) - 1:
            last = len(part.chars) - 1
            if last >= 0 and part.chars[last] == BREAK_CHAR:
                part = CjkRun(part.chars[:last] + " ", part.widths[:last] + [ctx.space], part.offsets,
                              part.red, part.spaced_breaks | {last})
            elif last < 0 or part.chars[last] != " ":
                red_units = part.red | ({last + 1} if last in part.red else set())
                part = CjkRun(part.chars + " ", part.widths + [ctx.space], part.offsets + [-1],
                              frozenset(red_units), part.spaced_breaks)
        parts.append(part)
    return fragment_lines(join_runs(parts), widths)
