"""Western line breaking: reportlab's ``Paragraph.breakLines``, simple and fragment paths.

Greedy filling by reportlab's widths with its 5% space shrinkage; over-long words cut
character by character; words built fragment by fragment where entities split the text,
including the empty words reportlab's whitespace split produces (they change the shrinkage
and can even draw a space). ``plain_lines`` is the same algorithm in a tight loop for the
common case (no entities, no U+00A0, no over-long word).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from glyphserve.render.lines import MARKER_TEXT, SPACE_SHRINKAGE, LayoutContext, Line, stripped_segment
from glyphserve.render.text import ENTITY_RUN_RE, WHITESPACE, WORD_RE, PreparedText


@dataclass(slots=True)
class Word:
    text: str  # drawn characters ("" for reportlab's empty words)
    width: float
    start: int  # source offset of text[0] (-1: synthetic, e.g. the marker)
    red: bool = False
    hs: bool = True  # followed by a space
    split: int = 0  # 0 whole word, 1 a cut piece, 2 the last cut piece
    origin: object = None  # for cut pieces: the word they were cut from


BREAK = None  # a <br/> in the word stream
_INJECTED = Word("", 0.0, -1)  # the line end reportlab injects after the first cut piece
_NON_WS_RE = re.compile(rf"[^{re.escape(WHITESPACE)}]+")


def marker_word(ctx: LayoutContext) -> Word:
    return Word(MARKER_TEXT, ctx.word_width(MARKER_TEXT), -1, True)


def line_words(prepared: PreparedText, line_no: int, ctx: LayoutContext) -> Iterator[Word]:
    start, end = prepared.line(line_no)
    segment = prepared.text[start:end]
    for m in WORD_RE.finditer(segment):
        raw = m.group()
        yield Word(raw.replace(" ", "\xa0"), ctx.word_width(raw), start + m.start())


def needs_fragment_words(prepared: PreparedText, first: int, last: int) -> bool:
    """Entities or a literal U+00A0 make reportlab's word building differ from plain splitting."""
    a, _ = prepared.line(first)
    _, b = prepared.line(last - 1)
    chunk = prepared.text[a:b]
    return "&" in chunk or "<" in chunk or ">" in chunk or "\xa0" in chunk or "  " in chunk


def _fragments(prepared: PreparedText, first: int, last: int, ctx: LayoutContext) -> Iterator:
    """The paragraph as reportlab's parser fragments it: (text, source start, red) or None
    for a <br/>. Every entity is its own fragment. (Text is left uncollapsed: collapsing
    whitespace to one space changes no word boundary, so offsets stay exact.)"""
    for i in range(first, last):
        if i > first:
            yield (" " + MARKER_TEXT + " ", -1, True) if ctx.marker else BREAK
        start, end = stripped_segment(prepared, i, first, last)
        if start >= end:
            continue
        raw = prepared.text[start:end]
        pos = 0
        for m in ENTITY_RUN_RE.finditer(raw):
            if m.start() > pos:
                yield raw[pos : m.start()], start + pos, False
            ent = m.group()
            for j, ch in enumerate(ent):
                yield ("\xa0" if ch == " " else ch, start + m.start() + j, False)
            pos = m.end()
        if pos < len(raw):
            yield raw[pos:], start + pos, False


def fragment_words(prepared: PreparedText, first: int, last: int, ctx: LayoutContext) -> list[Word | None]:
    """reportlab's ``_getFragWords``: words built fragment by fragment, including the empty
    words its whitespace split produces (they change the space shrinkage, and can add a
    drawn space)."""
    k = ctx.k
    wm = ctx.widths
    out: list[Word | None] = []
    w_text: list[str] = []
    w_width = 0.0
    w_start = -1
    w_red = False
    w_open = False
    hanging_strip = True

    def close(hs: bool) -> None:
        nonlocal w_text, w_width, w_open
        out.append(Word("".join(w_text), w_width, w_start, w_red, hs))
        w_text, w_width, w_open = [], 0.0, False

    def add(piece: str, src: int, red: bool) -> None:
        nonlocal w_width, w_start, w_red, w_open
        if not w_open:
            w_start, w_red, w_open = src, red, True
        w_text.append(piece)
        w_width += k * sum(map(wm.__getitem__, piece))

    for frag in _fragments(prepared, first, last, ctx):
        if frag is None:
            if w_open:
                close(False)
            out.append(BREAK)
            hanging_strip = True
            continue
        text, src, red = frag
        if hanging_strip:
            stripped = text.lstrip(WHITESPACE)
            if not stripped:
                continue
            if src >= 0:
                src += len(text) - len(stripped)
            text = stripped
            hanging_strip = False
        spans = [(m.start(), m.end()) for m in _NON_WS_RE.finditer(text)]
        pieces = [(text[a:b], a) for a, b in spans]
        if "\xa0" in text:  # reportlab's regex split keeps empty strings at the ends
            if text[0] in WHITESPACE:
                pieces.insert(0, ("", 0))
            if text[-1] in WHITESPACE:
                pieces.append(("", len(text)))
        if text[0] in WHITESPACE or not pieces:
            if w_open:
                close(False)
                prev_hs = False
            else:
                prev_hs = bool(out) and out[-1] is not None and out[-1].hs
            if not prev_hs:
                pieces.insert(0, ("", 0))
            elif not pieces:
                continue
        for piece, a in pieces[:-1]:
            add(piece, src + a if src >= 0 else -1, red)
            close(True)
        piece, a = pieces[-1]
        add(piece, src + a if src >= 0 else -1, red)
        if text[-1] in WHITESPACE:
            close(True)
    if w_open:
        close(False)
    return out


def simple_lines(words: list[Word], ctx: LayoutContext, widths: tuple[float, float], red: bool) -> list[Line]:
    """``Paragraph.breakLines`` for a single-fragment paragraph (kind 0)."""
    sw = ctx.space
    shrink = SPACE_SHRINKAGE * sw
    lines: list[Line] = []
    line: list[Word] = []
    current = -sw
    lineno = 0
    max_width = widths[0]
    forced = False
    queue = list(reversed(words))
    while queue:
        word = queue.pop()
        if not word.text and word.split:
            forced = True
        word_width = ctx.string_width(word.text) if word.split else word.width
        new_width = current + sw + word_width
        lim_width = max_width + shrink * len(line)
        if new_width > lim_width and not forced and not word.split and word_width > widths[min(lineno, 1)]:
            queue.extend(reversed(_cut_word_simple(word, current + sw, widths, lineno, ctx)))
            forced = True
            continue
        if new_width <= lim_width or not line or forced:
            if word.text:
                line.append(word)
            if forced:
                forced = False
                lines.append(_words_line(line, max_width - new_width, max_width, red))
                line = []
                current = -sw
                lineno += 1
                max_width = widths[1]
            else:
                current = new_width
        else:
            lines.append(_words_line(line, max_width - current, max_width, red))
            line = [word]
            current = word_width
            lineno += 1
            max_width = widths[1]
    if line:
        lines.append(_words_line(line, max_width - current, max_width, red))
    return lines


def _cut_word_simple(word: Word, line_width: float, widths, lineno: int, ctx: LayoutContext) -> list[Word]:
    """reportlab's ``_splitWord``: cut an over-long word to fit the current line, then full lines."""
    pieces: list[Word] = []
    max_width = widths[min(lineno, 1)]
    max_next = widths[min(lineno + 1, 1)]
    text = word.text
    piece_start = 0
    for i, ch in enumerate(text):
        cw = ctx.char_width(ch)
        new_line_width = line_width + cw
        if new_line_width > max_width and (i > piece_start or cw <= max_next):
            pieces.append(Word(text[piece_start:i], 0.0, _shift(word.start, piece_start), word.red, False, 1, word))
            lineno += 1
            max_width = widths[min(lineno, 1)]
            new_line_width = cw
            piece_start = i
        line_width = new_line_width
    pieces.append(Word(text[piece_start:], 0.0, _shift(word.start, piece_start), word.red, word.hs, 2, word))
    return pieces


def _shift(start: int, by: int) -> int:
    return start + by if start >= 0 else -1


def _words_line(words: list[Word], extra: float, max_width: float, red: bool) -> Line:
    text = " ".join(w.text for w in words)
    end = max((w.start + len(w.text) for w in words if w.start >= 0), default=-1)
    return Line(text, extra, max_width, len(words), red=((0, len(text)),) if red and text else (),
                words=list(words), end=end)


class _LineText:
    """The drawn text of a fragment-path line, assembled the way reportlab fills its styled
    runs: a space goes before a word that follows a space unless the run already ends in one."""

    __slots__ = ("parts", "end", "red", "pos", "run_red", "run_space", "words")

    def __init__(self, word: Word):
        self.words: list[Word] = []
        self.parts: list[str] = []
        self.end = -1
        self.red: list[tuple[int, int]] = []
        self.pos = 0
        self.run_red = word.red
        self.run_space = False
        self._put(word)

    def _put(self, word: Word) -> None:
        self.words.append(word)
        n = len(word.text)
        if not n:
            return
        self.parts.append(word.text)
        if word.start >= 0:
            self.end = word.start + n
        if word.red:
            self.red.append((self.pos, self.pos + n))
        self.pos += n

    def _space(self) -> None:
        self.parts.append(" ")
        if self.run_red:
            self.red.append((self.pos, self.pos + 1))
        self.pos += 1

    def add(self, word: Word, spaced: bool) -> int:
        """Append ``word``; returns how many spaces were added (they count for shrinkage)."""
        added = 0
        if self.run_red != word.red:
            if spaced and not self.run_space:
                self._space()
                added = 1
            self.run_red = word.red
            self.run_space = False
        elif spaced:
            if not self.run_space:
                self._space()
                added = 1
                self.run_space = True
        if word.text:
            self.run_space = False
        self._put(word)
        return added

    def line(self, extra: float, max_width: float, n: int, hard_break: bool) -> Line:
        return Line("".join(self.parts), extra, max_width, n, hard_break, tuple(self.red), words=self.words,
                    end=self.end)


def fragment_lines(tokens: list[Word | None], ctx: LayoutContext, widths: tuple[float, float]) -> list[Line]:
    """``Paragraph.breakLines`` for a multi-fragment paragraph (kind 1); ``None`` is a <br/>."""
    sw = ctx.space
    lines: list[Line] = []
    text: _LineText | None = None
    n = nsp = 0
    pending = current = 0.0
    lineno = 0
    max_width = widths[0]
    queue = list(reversed(tokens))
    while queue:
        tok = queue.pop()
        if text is None:
            n = nsp = 0
            pending = current = 0.0
        if tok is None or tok is _INJECTED:
            lines.append(text.line(max_width - current, max_width, n, tok is None) if text
                         else Line("", max_width, max_width, 0, tok is None))
            lineno += 1
            max_width = widths[1]
            text = None
            continue
        word_width = tok.width
        new_width = current + pending + word_width if word_width > 0 else current
        lim_width = max_width + (pending + nsp * sw) * SPACE_SHRINKAGE
        if new_width > lim_width and tok.split == 0 and word_width > widths[min(lineno, 1)]:
            pieces = _cut_word_fragments(tok, max_width - pending - current, widths, lineno, ctx)
            queue.extend(reversed(pieces[1:]))
            queue.append(_INJECTED)
            queue.append(pieces[0])
            continue
        if not (new_width > lim_width and n > 0):
            if text is None:
                text = _LineText(tok)
            else:
                nsp += text.add(tok, pending > 0)
            if tok.text:
                n += 1
            pending = sw if tok.hs else 0.0
            current = new_width
        else:
            lines.append(text.line(max_width - current, max_width, n, False))
            lineno += 1
            max_width = widths[1]
            text = _LineText(tok)
            current = word_width
            n = 1
            nsp = 0
            pending = sw if tok.hs else 0.0
    if text is not None:
        lines.append(text.line(max_width - current, max_width, n, False))
    return lines


def _cut_word_fragments(word: Word, avail: float, widths, lineno: int, ctx: LayoutContext) -> list[Word]:
    """reportlab's ``_splitFragWord``: piece widths are sums of per-character widths."""
    pieces: list[Word] = []
    max_width = avail
    max_next = widths[min(lineno + 1, 1)]
    line_width = 0.0
    piece_width = 0.0
    text = word.text
    piece_start = 0
    for i, ch in enumerate(text):
        cw = ctx.char_width(ch)
        new_line_width = line_width + cw
        if new_line_width > max_width and (piece_width or cw <= max_next):
            pieces.append(Word(text[piece_start:i], piece_width, _shift(word.start, piece_start), word.red, False, 1,
                                word))
            lineno += 1
            max_width = max_next
            max_next = widths[min(lineno + 1, 1)]
            new_line_width = cw
            piece_width = 0.0
            piece_start = i
        piece_width += cw
        line_width = new_line_width
    pieces.append(Word(text[piece_start:], piece_width, _shift(word.start, piece_start), word.red, word.hs, 2, word))
    return pieces


class WordEnds:
    """Where the words of one source line end, found once and only when asked."""

    __slots__ = ("segment", "offset", "ends")

    def __init__(self, segment: str, offset: int):
        self.segment, self.offset, self.ends = segment, offset, None

    def end(self, count: int) -> int:
        if self.ends is None:
            self.ends = [self.offset + m.end() for m in WORD_RE.finditer(self.segment)]
        return self.ends[count - 1]


def plain_lines(prepared: PreparedText, first: int, last: int, ctx: LayoutContext, simple: bool) -> list[Line] | None:
    """The common case, fast: Western text with ``<br/>`` (or a single line), no entities,
    no U+00A0, no zero-width or over-long word. Same float operations as reportlab, in a
    tight loop; None when the paragraph needs the general path."""
    sw = ctx.space
    get = ctx._word_widths.get
    measure = ctx.word_width
    narrowest = min(ctx.first_width, ctx.later_width)
    later = ctx.later_width
    max_width = ctx.first_width
    limits = ctx.line_limits(simple)  # limit for a line's k-th word, per max width
    text = prepared.text
    lines: list[Line] = []
    for i in range(first, last):
        start, end = prepared.line(i)
        segment = text[start:end]
        words = segment.split()
        ends = WordEnds(segment, start)
        widths = list(map(get, words))
        if None in widths:
            widths = [measure(word) if w is None else w for word, w in zip(words, widths)]
        if widths and (min(widths) <= 0 or max(widths) > narrowest):
            return None
        n = len(words)
        a = 0
        while a < n:
            lim = limits[max_width]
            current = widths[a]
            b = a + 1
            while b < n:
                new_width = current + sw + widths[b]
                if new_width > (lim[b - a] if b - a < len(lim) else ctx.line_limit(max_width, b - a, simple)):
                    break
                current = new_width
                b += 1
            lines.append(Line(" ".join(words[a:b]), max_width - current, max_width, b - a, end_ref=(ends, b)))
            max_width = later
            a = b
        if i < last - 1:  # a <br/> follows
            if n:
                lines[-1].hard_break = True
            else:
                lines.append(Line("", max_width, max_width, 0, True))
                max_width = later
    return lines


def merge_pieces(words: list[Word], kind: int, ctx: LayoutContext) -> list[Word]:
    """Rejoin cut pieces into whole words, as reportlab does when it re-wraps the part of a
    paragraph it keeps (an unfinished word is then a plain word, so it may move instead
    of being cut)."""
    out: list[Word] = []
    for w in words:
        if not w.split:
            out.append(w)
            continue
        if out and out[-1].origin is not None and out[-1].origin is w.origin:
            prev = out.pop()
            text, width = prev.text + w.text, prev.width + w.width
            start = prev.start
        else:
            text, width, start = w.text, w.width, w.start
        out.append(Word(text, width, start, w.red, w.hs, 0, w.origin))
    for i, w in enumerate(out):
        if w.origin is not None:
            width = ctx.string_width(w.text) if kind == 0 else w.width
            out[i] = Word(w.text, width, w.start, w.red, w.hs)
    return out


def rewrap_kept(head: list[Line], kind: int, red: bool, continued: bool, ctx: LayoutContext) -> list[Line]:
    """The lines reportlab draws for the part of a paragraph it keeps on a page: it
    re-wraps that part, which only changes anything when it ends inside a word cut over
    several lines (the rejoined piece is a plain word again, so it may move)."""
    tail = head[-1].words
    if not tail or tail[-1].split != 1:
        return head
    origin = tail[-1].origin
    j = len(head) - 1  # the line holding the word's first piece
    while j > 0 and head[j - 1].words and any(w.origin is origin for w in head[j - 1].words):
        j -= 1
    words = merge_pieces([w for line in head[j:] for w in line.words], kind, ctx)
    widths = (ctx.first_width if j == 0 and not continued else ctx.later_width, ctx.later_width)
    lines = simple_lines(words, ctx, widths, red) if kind == 0 else fragment_lines(words, ctx, widths)
    return head[:j] + lines
