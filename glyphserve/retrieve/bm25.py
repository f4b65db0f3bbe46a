"""Okapi BM25 over passages of text: the words of a question against paragraphs of a document.

The text is split into passages (paragraphs, long ones cut at sentence ends); each passage keeps its
character span, so callers can find it on the rendered page whose ``char_span`` holds it.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import Stemmer

MAX_PASSAGE_CHARS = 480
# Han, kana and Hangul write words without spaces between them: runs of them are searched as single characters
# plus bigrams of adjacent ones. Any other letters or digits (Latin with accents, Cyrillic, Greek, ...) are words.
_CJK_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK_CHARS}]+|[^\W_{_CJK_CHARS}]+(?:'[^\W_{_CJK_CHARS}]+)?")
_CJK = re.compile(rf"[{_CJK_CHARS}]")
# Function characters of Chinese and Japanese, which match nearly any page (alone and in bigrams).
_CJK_STOP_CHARS = frozenset("的了是在和有也就都而与或之其为以被把对吗呢吧啊么这那个我你他她它们什怎哪谁のはがをにでともかへやねよ")
_CJK_STOP_BIGRAMS = frozenset("什么 怎么 哪里 哪个 如何 是否 为什 我们 你们 他们 这个 那个 一个".split())
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
    """Snowball's English stem ("installed", "installing", "installation" -> "instal"); numbers stay as they are
    (other scripts pass through the English rules unchanged)."""
    return word if word.isdigit() else _ENGLISH.stemWord(word)


def tokenize(text: str) -> list[str]:
    """Words of ``text`` (NFKC, case-folded) without stop words, English ones stemmed; runs of Han, kana or Hangul
    as their characters plus bigrams of adjacent ones, leaving out the commonest function characters."""
    tokens: list[str] = []
    for run in _WORD.findall(unicodedata.normalize("NFKC", text).replace("\u2019", "'").casefold()):
        if _CJK.match(run):
            tokens += [c for c in run if c not in _CJK_STOP_CHARS]
            tokens += [a + b for a, b in zip(run, run[1:])
                       if a not in _CJK_STOP_CHARS and b not in _CJK_STOP_CHARS and a + b not in _CJK_STOP_BIGRAMS]
        elif run not in _STOPWORDS:
            tokens.append(_stem(run))
    return tokens


@dataclass(frozen=True)
class Passage:
    start: int
    end: int
    text: str


def split_passages(text: str, max_chars: int = MAX_PASSAGE_CHARS) -> list[Passage]:
    """Paragraphs of ``text`` (blank-line separated); long ones packed from whole sentences, a sentence longer than
    a passage cut at a word."""
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
                cut = _word_end(block, start, start + max_chars)
                passages.append(_passage(text, block_start + start, block_start + cut))
                start = cut
            end = piece_end
        if end > start:
            passages.append(_passage(text, block_start + start, block_start + end))
    return [p for p in passages if p.text]


def _word_end(block: str, start: int, limit: int) -> int:
    """Where a passage from ``start`` of a sentence too long for one ends: after its last whitespace before
    ``limit`` in its second half (cut at ``limit``, a word split between two passages matched in neither: lists,
    tables and PDF lines have no full stops), else at ``limit`` (a run without spaces: CJK, one long token)."""
    space = max(block.rfind(c, (start + limit) // 2, limit) for c in " \n\t")
    return space + 1 if space > start else limit


def _passage(text: str, start: int, end: int) -> Passage:
    raw = text[start:end]
    lead = len(raw) - len(raw.lstrip())
    body = raw.strip()
    return Passage(start + lead, start + lead + len(body), body)


class BM25Index:
    """Okapi BM25 over a fixed list of passages (term counts kept per passage, postings per term)."""

    def __init__(self, passages: list[Passage], k1: float = 1.5, b: float = 0.75):
        self.passages = passages
        self.k1, self.b = k1, b
        self.terms = [Counter(tokenize(p.text)) for p in passages]
        self.lengths = [sum(t.values()) for t in self.terms]
        self.postings: dict[str, list[tuple[int, int]]] = {}  # term -> [(passage, count)], passages ascending
        for index, terms in enumerate(self.terms):
            for term, count in terms.items():
                self.postings.setdefault(term, []).append((index, count))

    @classmethod
    def from_text(cls, text: str) -> BM25Index:
        return cls(split_passages(text))

    def scores(self, weights: Mapping[str, float], corpus: Corpus | None = None) -> dict[int, float]:
        """Positive BM25 scores by passage for weighted query terms. ``corpus``: the statistics of a larger
        collection these passages belong to (its idf and mean passage length), instead of this index's own."""
        corpus = corpus or Corpus([self])
        out: dict[int, float] = {}
        avg = corpus.mean_length or 1
        for term in sorted(weights):  # a fixed order: the same sums, to the last bit, on every run
            idf = corpus.idf(term)
            for index, tf in self.postings.get(term, ()):
                norm = self.k1 * (1 - self.b + self.b * self.lengths[index] / avg)
                out[index] = out.get(index, 0.0) + weights[term] * idf * tf * (self.k1 + 1) / (tf + norm)
        return {index: score for index, score in out.items() if score > 0}

    def search(self, query: str, k: int = 3) -> list[tuple[Passage, float]]:
        """The ``k`` best passages with a positive score, best first (ties keep text order)."""
        scored = sorted((-score, index) for index, score in self.scores(dict.fromkeys(tokenize(query), 1.0)).items())
        return [(self.passages[i], -neg) for neg, i in scored[:k]]


class Corpus:
    """Statistics of one or more indexes searched as one collection: passages, their mean length in terms,
    and how many passages hold each term (counted once per term, on first use)."""

    def __init__(self, indexes: list[BM25Index]):
        self.indexes = indexes
        self.passages = sum(len(i.lengths) for i in indexes)
        self.mean_length = sum(sum(i.lengths) for i in indexes) / self.passages if self.passages else 0.0
        self._idf: dict[str, float] = {}

    def idf(self, term: str) -> float:
        idf = self._idf.get(term)
        if idf is None:
            df = sum(len(i.postings.get(term, ())) for i in self.indexes)
            idf = self._idf[term] = math.log(1 + (self.passages - df + 0.5) / (df + 0.5))
        return idf
