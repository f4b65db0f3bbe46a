"""Western line breaking: reportlab's ``Paragraph.breakLines``, simple and fragment paths.

Greedy filling by reportlab's widths with its 5% space shrinkage; over-long words cut
character by character; words built fragment by fragment where entities split the text,
including the empty words reportlab's whitespace split produces (they change the shrinkage
and can even draw a space). ``plain_lines`` is the same algorithm in a tight loop for the
common case (no entities, no U+00A0, no over-long word). Lines come out as they are laid out (generators): a
paragraph is laid out only as far as the pages need it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain

from glyphserve.render.lines import MARKER_TEXT, SPACE_SHRINKAGE, LayoutContext, Line, entity_runs, stripped_segment
from glyphserve.render.text import WHITESPACE, WORD_RE, PreparedText


@dataclass(slots=True)
class Word:
    text: str  # drawn characters ("" for reportlab's empty words)
    width: float
    start: int  # source offset of text[0] (-1: synthetic, e.g. the marker)
    red: bool = False
    hs: bool = True  # followed by a space
    split: int = 0  # 0 whole word, 1 a cut piece, 2 the last cut piece
    origin: object = None  # for cut pieces: the word they were cut from
    partial: bool = False  # ``width`` is that of the word's start, wider than any line (see ``line_words``)


BREAK = None  # a <br/> in the word stream
_END = object()  # no more words
_INJECTED = Word("", 0.0, -1)  # the line end reportlab injects after the first cut piece
_NON_WS_RE = re.compile(rf"[^{re.escape(WHITESPACE)}]+")
# A word longer than this many characters is measured by its start when that is wider than any line: it is cut
# then, whatever its whole width (measuring a 40 MiB word took 0.8 s).
_LONG_WORD = 4096
_PLAIN_WINDOW = 1 << 14  # characters of a long line ``plain_line`` splits into words at a time


def marker_word(ctx: LayoutContext) -> Word:
    return Word(MARKER_TEXT, ctx.word_width(MARKER_TEXT), -1, True)


def line_words(prepared: PreparedText, line_no: int, ctx: LayoutContext, since: int | None = None) -> Iterator[Word]:
    """The words of a source line (from offset ``since`` on)."""
    start, end = prepared.line(line_no)
    widest = max(ctx.first_width, ctx.later_width)
    for m in WORD_RE.finditer(prepared.text, start if since is None else since, end):
        raw = m.group()
        if len(raw) > _LONG_WORD and "\xa0" not in raw and (width := ctx.word_width(raw[:_LONG_WORD])) > widest:
            yield Word(raw.replace(" ", "\xa0"), width, m.start(), partial=True)
        else:
            yield Word(raw.replace(" ", "\xa0"), ctx.word_width(raw), m.start())


def break_words(prepared: PreparedText, first: int, last: int, ctx: LayoutContext) -> Iterator[Word | None]:
    """The words of source lines [first, last), a <br/> (or the marker) between two lines."""
    for i in range(first, last):
        if i > first:
            yield marker_word(ctx) if ctx.marker else BREAK
        yield from line_words(prepared, i, ctx)


def _measured(word: Word, ctx: LayoutContext) -> float:
    """The whole width of a word measured by its start (``line_words``: it has no U+00A0 but its runs of spaces),
    now that its start decides nothing."""
    word.width, word.partial = ctx.word_width(word.text.replace("\xa0", " ")), False
    return word.width


def needs_fragment_words(prepared: PreparedText, first: int, last: int) -> bool:
    """Entities or a literal U+00A0 make reportlab's word building differ from plain splitting."""
    a, _ = prepared.line(first)
    _, b = prepared.line(last - 1)
    find = prepared.text.find
    return any(find(s, a, b) >= 0 for s in ("&", "<", ">", "\xa0", "  "))


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
        text = prepared.text
        pos = start
        for a, b in entity_runs(text, start, end):
            if a > pos:
                yield text[pos:a], pos, False
            for j in range(a, b):
                ch = text[j]
                yield ("\xa0" if ch == " " else ch, j, False)
            pos = b
        if pos < end:
            yield text[pos:end], pos, False


def _pieces(text: str) -> Iterator[tuple[str, int]]:
    """A fragment's words, with the empty strings reportlab's regex split keeps at its ends when it holds a U+00A0."""
    nbsp = "\xa0" in text
    if nbsp and text[0] in WHITESPACE:
        yield "", 0
    for m in _NON_WS_RE.finditer(text):
        yield m.group(), m.start()
    if nbsp and text[-1] in WHITESPACE:
        yield "", len(text)


def fragment_words(prepared: PreparedText, first: int, last: int, ctx: LayoutContext) -> Iterator[Word | None]:
    """reportlab's ``_getFragWords``: words built fragment by fragment, including the empty
    words its whitespace split produces (they change the space shrinkage, and can add a
    drawn space)."""
    k = ctx.k
    wm = ctx.widths
    w_text: list[str] = []
    w_width = 0.0
    w_start = -1
    w_red = False
    w_open = False
    last_hs = False  # the last word is followed by a space
    hanging_strip = True

    def close(hs: bool) -> Word:
        nonlocal w_text, w_width, w_open, last_hs
        word = Word("".join(w_text), w_width, w_start, w_red, hs)
        w_text, w_width, w_open, last_hs = [], 0.0, False, hs
        return word

    def add(piece: str, src: int, red: bool) -> None:
        nonlocal w_width, w_start, w_red, w_open
        if not w_open:
            w_start, w_red, w_open = src, red, True
        w_text.append(piece)
        w_width += k * sum(map(wm.__getitem__, piece))

    for frag in _fragments(prepared, first, last, ctx):
        if frag is None:
            if w_open:
                yield close(False)
            yield BREAK
            last_hs = False
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
        if len(text) == 1 and text not in WHITESPACE:  # an entity, most often: it goes on the open word
            add(text, src, red)
            continue
        pieces = _pieces(text)
        head = next(pieces, None)
        if head is not None:
            pieces = chain((head,), pieces)
        if text[0] in WHITESPACE or head is None:
            if w_open:
                yield close(False)
                prev_hs = False
            else:
                prev_hs = last_hs
            if not prev_hs:
                pieces = chain((("", 0),), pieces)
            elif head is None:
                continue
        piece, a = next(pieces)
        for following in pieces:
            add(piece, src + a if src >= 0 else -1, red)
            yield close(True)
            piece, a = following
        add(piece, src + a if src >= 0 else -1, red)
        if text[-1] in WHITESPACE:
            yield close(True)
    if w_open:
        yield close(False)


def simple_lines(words: Iterable[Word], ctx: LayoutContext, widths: tuple[float, float], red: bool) -> Iterator[Line]:
    """``Paragraph.breakLines`` for a single-fragment paragraph (kind 0)."""
    sw = ctx.space
    shrink = SPACE_SHRINKAGE * sw
    line: list[Word] = []
    current = -sw
    lineno = 0
    max_width = widths[0]
    forced = False
    words = iter(words)
    pieces: Iterator[Word] = iter(())  # the rest of a word being cut
    while (word := next(pieces, None) or next(words, None)) is not None:
        if not word.text and word.split:
            forced = True
        word_width = ctx.string_width(word.text) if word.split else word.width
        new_width = current + sw + word_width
        lim_width = max_width + shrink * len(line)
        cut = new_width > lim_width and not forced and not word.split and word_width > widths[min(lineno, 1)]
        if word.partial and not cut:  # (the test holds for the word once it holds for its start)
            word_width = _measured(word, ctx)
            new_width = current + sw + word_width
            cut = new_width > lim_width and not forced and word_width > widths[min(lineno, 1)]
        if cut:
            pieces = _cut_word_simple(word, current + sw, widths, lineno, ctx)
            forced = True
            continue
        if new_width <= lim_width or not line or forced:
            if word.text:
                line.append(word)
            if forced:
                forced = False
                yield _words_line(line, max_width - new_width, max_width, red)
                line = []
                current = -sw
                lineno += 1
                max_width = widths[1]
            else:
                current = new_width
        else:
            yield _words_line(line, max_width - current, max_width, red)
            line = [word]
            current = word_width
            lineno += 1
            max_width = widths[1]
    if line:
        yield _words_line(line, max_width - current, max_width, red)


def _cut_word_simple(word: Word, line_width: float, widths, lineno: int, ctx: LayoutContext) -> Iterator[Word]:
    """reportlab's ``_splitWord``: cut an over-long word to fit the current line, then full lines."""
    max_width = widths[min(lineno, 1)]
    max_next = widths[min(lineno + 1, 1)]
    cws = ctx.char_widths
    text = word.text
    piece_start = 0
    for i, ch in enumerate(text):
        cw = cws[ch]
        new_line_width = line_width + cw
        if new_line_width > max_width and (i > piece_start or cw <= max_next):
            yield Word(text[piece_start:i], 0.0, _shift(word.start, piece_start), word.red, False, 1, word)
            lineno += 1
            max_width = widths[min(lineno, 1)]
            new_line_width = cw
            piece_start = i
        line_width = new_line_width
    yield Word(text[piece_start:], 0.0, _shift(word.start, piece_start), word.red, word.hs, 2, word)


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


def fragment_lines(tokens: Iterable[Word | None], ctx: LayoutContext, widths: tuple[float, float]) -> Iterator[Line]:
    """``Paragraph.breakLines`` for a multi-fragment paragraph (kind 1); ``None`` is a <br/>."""
    sw = ctx.space
    text: _LineText | None = None
    n = nsp = 0
    pending = current = 0.0
    lineno = 0
    max_width = widths[0]
    tokens = iter(tokens)
    pieces: Iterator[Word] = iter(())  # the rest of a word being cut
    while (tok := next(pieces, _END)) is not _END or (tok := next(tokens, _END)) is not _END:
        if text is None:
            n = nsp = 0
            pending = current = 0.0
        if tok is None or tok is _INJECTED:
            yield (text.line(max_width - current, max_width, n, tok is None) if text
                   else Line("", max_width, max_width, 0, tok is None))
            lineno += 1
            max_width = widths[1]
            text = None
            continue
        word_width = tok.width
        new_width = current + pending + word_width if word_width > 0 else current
        lim_width = max_width + (pending + nsp * sw) * SPACE_SHRINKAGE
        cut = new_width > lim_width and tok.split == 0 and word_width > widths[min(lineno, 1)]
        if tok.partial and not cut:  # (the test holds for the word once it holds for its start)
            word_width = _measured(tok, ctx)
            new_width = current + pending + word_width if word_width > 0 else current
            cut = new_width > lim_width and word_width > widths[min(lineno, 1)]
        if cut:
            pieces = _cut_word_fragments(tok, max_width - pending - current, widths, lineno, ctx)
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
            yield text.line(max_width - current, max_width, n, False)
            lineno += 1
            max_width = widths[1]
            text = _LineText(tok)
            current = word_width
            n = 1
            nsp = 0
            pending = sw if tok.hs else 0.0
    if text is not None:
        yield text.line(max_width - current, max_width, n, False)


def _cut_word_fragments(word: Word, avail: float, widths, lineno: int, ctx: LayoutContext) -> Iterator[Word]:
    """reportlab's ``_splitFragWord``: piece widths are sums of per-character widths; after the
    first piece, the line end reportlab injects."""
    max_width = avail
    max_next = widths[min(lineno + 1, 1)]
    cws = ctx.char_widths
    line_width = 0.0
    piece_width = 0.0
    text = word.text
    piece_start = 0
    injected = False
    for i, ch in enumerate(text):
        cw = cws[ch]
        new_line_width = line_width + cw
        if new_line_width > max_width and (piece_width or cw <= max_next):
            yield Word(text[piece_start:i], piece_width, _shift(word.start, piece_start), word.red, False, 1, word)
            if not injected:
                yield _INJECTED
                injected = True
            lineno += 1
            max_width = max_next
            max_next = widths[min(lineno + 1, 1)]
            new_line_width = cw
            piece_width = 0.0
            piece_start = i
        piece_width += cw
        line_width = new_line_width
    yield Word(text[piece_start:], piece_width, _shift(word.start, piece_start), word.red, word.hs, 2, word)
    if not injected:
        yield _INJECTED


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
    later = ctx.later_width
    max_width = ctx.first_width
    text = prepared.text
    lines: list[Line] = []
    for i in range(first, last):
        start, end = prepared.line(i)
        segment = text[start:end]
        measured = _plain_words(segment, ctx)
        if measured is None:
            return None
        words, widths = measured
        ends = WordEnds(segment, start)
        n = len(words)
        a = 0
        while a < n:
            b, current = _line_end(widths, a, max_width, ctx, simple)
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


def plain_line(prepared: PreparedText, line_no: int, ctx: LayoutContext) -> Iterator[Line]:
    """``plain_lines`` for a paragraph of one long source line, a window of its words at a time (the general path,
    a word at a time, took 1.5 s for 500 pages of a 40 MiB line of words). From a window holding a word it cannot
    take, the general path lays out the rest, from the start of the line it was filling."""
    start, end = prepared.line(line_no)
    text = prepared.text
    max_width = ctx.first_width
    pos = start
    size = _PLAIN_WINDOW
    while pos < end:
        cut = min(end, pos + size)
        segment = text[pos:cut]
        measured = _plain_words(segment, ctx)
        if measured is None:
            words = line_words(prepared, line_no, ctx, since=pos)
            yield from simple_lines(words, ctx, (max_width, ctx.later_width), False)
            return
        words, widths = measured
        ends = WordEnds(segment, pos)
        n = len(words)
        a = 0
        while a < n:
            b, current = _line_end(widths, a, max_width, ctx, True)
            if b >= n - 1 and cut < end:
                # the window's last word may go on in the next one, wider, even too wide for a line (then cut
                # to fill this one): the line that takes it, or stops before it, is laid out there
                break
            yield Line(" ".join(words[a:b]), max_width - current, max_width, b - a, end_ref=(ends, b))
            max_width = ctx.later_width
            a = b
        pos = ends.end(a + 1) - len(words[a]) if a < n else cut
        size = 2 * size if a == 0 < n else _PLAIN_WINDOW  # a window that one line outgrows: a wider one


def _plain_words(segment: str, ctx: LayoutContext) -> tuple[list[str], list[float]] | None:
    """The words of a segment and their widths; None when one is zero-width or wider than the narrowest line."""
    words = segment.split()
    widths = list(map(ctx._word_widths.get, words))
    if None in widths:
        widths = [ctx.word_width(word) if w is None else w for word, w in zip(words, widths)]
    if widths and (min(widths) <= 0 or max(widths) > min(ctx.first_width, ctx.later_width)):
        return None
    return words, widths


def _line_end(widths: list[float], a: int, max_width: float, ctx: LayoutContext, simple: bool) -> tuple[int, float]:
    """Where the line that starts at word ``a`` ends, and its width: filled as far as reportlab's limits let it."""
    sw = ctx.space
    lim = ctx.line_limits(simple)[max_width]  # limit for a line's k-th word
    n = len(widths)
    current = widths[a]
    b = a + 1
    while b < n:
        new_width = current + sw + widths[b]
        if new_width > (lim[b - a] if b - a < len(lim) else ctx.line_limit(max_width, b - a, simple)):
            break
        current = new_width
        b += 1
    return b, current


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
    return head[:j] + list(lines)
