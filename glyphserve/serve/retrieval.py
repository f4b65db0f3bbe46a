"""Extractive answers without a model: BM25 over the source text, mapped back to rendered pages.

The source text is split into passages (paragraphs, long ones cut at sentence ends); each
passage keeps its character span so it can be located on the page whose ``char_span`` holds
it, and then on that page's rows through ``PageLine`` baselines.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from dataclasses import dataclass

import Stemmer

MAX_PASSAGE_CHARS = 480
_WORD = re.compile(r"[0-9a-z]+(?:'[a-z]+)?|[\u3400-\u9fff\uf900-\ufaff]")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?;。！？；])[\"')\]”’]*\s+|(?<=[。！？；])|\n")
_STOPWORDS = frozenset(
    "a an and are as at be but by did do does for from had has have he her his how i if in into is it its "
    "me my no not of on or our she so such that the their them then there these they this to was we were "
    "what when where which who whom why will with would you your".split()
)


_ENGLISH = Stemmer.Stemmer("english")


@functools.lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    """Snowball's English stem ("installed", "installing", "installation" -> "instal"); CJK characters and
    numbers stay as they are."""
    return word if _CJK.fullmatch(word) or word.isdigit() else _ENGLISH.stemWord(word)


def tokenize(text: str) -> list[str]:
    """Lower-cased, stemmed words without stop words; CJK text as characters plus character bigrams."""
    words = [_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]
    bigrams = [a + b for a, b in zip(words, words[1:]) if _CJK.fullmatch(a) and _CJK.fullmatch(b)]
    return words + bigrams


@dataclass(frozen=True)
class Passage:
    start: int
    end: int
    text: str


def split_passages(text: str, max_chars: int = MAX_PASSAGE_CHARS) -> list[Passage]:
    """Paragraphs of ``text`` (blank-line separated); long ones packed from whole sentences."""
    passages: list[Passage] = []
    offset = 0
    for block in _PARAGRAPH.split(text) + [""]:
        block_start = text.find(block, offset) if block else offset
        offset = block_start + len(block)
        if not block.strip():
            continue
        pieces, cursor = [], 0
        for match in _SENTENCE_END.finditer(block):
            if match.end() > cursor:
                pieces.append((cursor, match.end()))
                cursor = match.end()
        if cursor < len(block):
            pieces.append((cursor, len(block)))
        start = end = pieces[0][0]
        for piece_start, piece_end in pieces:
            # Pack sentences up to max_chars; a single longer sentence is cut at max_chars.
            if piece_end - start > max_chars and end > start:
                passages.append(_passage(text, block_start + start, block_start + end))
                start = piece_start
            while piece_end - start > max_chars:
                passages.append(_passage(text, block_start + start, block_start + start + max_chars))
                start += max_chars
            end = piece_end
        if end > start:
            passages.append(_passage(text, block_start + start, block_start + end))
    return [p for p in passages if p.text]


def _passage(text: str, start: int, end: int) -> Passage:
    raw = text[start:end]
    lead = len(raw) - len(raw.lstrip())
    body = raw.strip()
    return Passage(start + lead, start + lead + len(body), body)


class BM25Index:
    """Okapi BM25 over a fixed list of passages."""

    def __init__(self, passages: list[Passage], k1: float = 1.5, b: float = 0.75):
        self.passages = passages
        self.k1, self.b = k1, b
        self._terms = [Counter(tokenize(p.text)) for p in passages]
        self._lengths = [sum(t.values()) for t in self._terms]
        self._avg_length = (sum(self._lengths) / len(self._lengths)) if passages else 0.0
        frequency: Counter[str] = Counter()
        for terms in self._terms:
            frequency.update(terms.keys())
        n = len(passages)
        self._idf = {term: math.log(1 + (n - df + 0.5) / (df + 0.5)) for term, df in frequency.items()}

    @classmethod
    def from_text(cls, text: str) -> "BM25Index":
        return cls(split_passages(text))

    def search(self, query: str, k: int = 3) -> list[tuple[Passage, float]]:
        """The ``k`` best passages with a positive score, best first (ties keep text order)."""
        query_terms = set(tokenize(query))
        scored = []
        for index, (terms, length) in enumerate(zip(self._terms, self._lengths)):
            score = 0.0
            norm = self.k1 * (1 - self.b + self.b * length / (self._avg_length or 1))
            for term in query_terms & terms.keys():
                tf = terms[term]
                score += self._idf[term] * tf * (self.k1 + 1) / (tf + norm)
            if score > 0:
                scored.append((-score, index))
        scored.sort()
        return [(self.passages[i], -neg) for neg, i in scored[:k]]


@dataclass(frozen=True)
class PageLayout:
    """What retrieval needs of a rendered page (from the stored manifest)."""

    number: int
    char_span: tuple[int, int]
    lines: list[tuple[str, float]]  # (text, baseline y in px)
    height: int


def pages_for_span(pages: list[PageLayout], start: int, end: int) -> list[int]:
    """Numbers of the pages whose character span overlaps [start, end)."""
    return [p.number for p in pages if p.char_span[0] < end and start < p.char_span[1]]


def crop_rows(page: PageLayout, source: str, start: int, end: int, margin_lines: int = 0) -> tuple[int, int]:
    """Top and bottom pixel rows of ``page`` showing source characters [start, end).

    A line's place in the source is estimated by counting non-space characters, which is
    exact for wrapped text and off by a character per newline marker at worst.
    """
    if not page.lines:
        return 0, page.height
    page_start, page_end = page.char_span
    cumulative, count = [], 0
    for line_text, _ in page.lines:
        count += sum(1 for ch in line_text if not ch.isspace())
        cumulative.append(count)
    total_source = sum(1 for ch in source[page_start:page_end] if not ch.isspace()) or 1
    scale = cumulative[-1] / total_source if cumulative[-1] else 1.0

    def position(char: int) -> float:
        char = min(max(char, page_start), page_end)
        return sum(1 for ch in source[page_start:char] if not ch.isspace()) * scale

    first_pos, last_pos = position(start), position(end)
    first = next((i for i, c in enumerate(cumulative) if c > first_pos), len(cumulative) - 1)
    last = next((i for i, c in enumerate(cumulative) if c >= last_pos), len(cumulative) - 1)
    first, last = max(0, first - margin_lines), min(len(cumulative) - 1, max(first, last) + margin_lines)
    baselines = [y for _, y in page.lines]
    gaps = [b - a for a, b in zip(baselines, baselines[1:]) if b > a]
    pitch = sorted(gaps)[len(gaps) // 2] if gaps else page.height / max(len(baselines), 1)
    top = int(max(0, baselines[first] - 0.95 * pitch))
    bottom = int(min(page.height, baselines[last] + 0.35 * pitch))
    return top, max(bottom, top + 1)
