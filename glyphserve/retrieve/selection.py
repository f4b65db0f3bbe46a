"""Which pages go in front of the model when a document (or a collection of documents) does not fit its context.

Modes: ``all`` sends every page (the engine refuses what does not fit); ``first`` keeps the first pages that fit;
``retrieve`` ranks the pages by how well their text matches the question and the conversation so far (BM25 over
the passages of each page's text, plus a second hop: the rarest words of the best passage, such as the name it
gives), ranks each page's neighbours at half its score, keeps pages best first while they fit and shows them in
reading order. Scanned pages have no text: they rank by their neighbours, and before text pages known not to
match when nothing else is known.

The accounting is exact: a page costs its vision tokens, the 2 image markers and its label's tokens; the rest of
the prompt (template, conversation, question) is counted by the caller's tokenizer (``PromptBudget``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from glyphserve.errors import ConfigError, ContextOverflowError
from glyphserve.glm4v import PAGE_MARKER_TOKENS
from glyphserve.retrieve.bm25 import BM25Index, Corpus, Passage, split_passages, tokenize

MODES = ("all", "first", "retrieve")
NEIGHBOUR_SHARE = 0.5  # a page next to a matching page ranks at this share of that page's score
HISTORY_WEIGHT = 0.5  # words of earlier turns count this much against the question's 1
EXPANSION_TERMS = 8  # the best passage's rarest words added to the query (the second hop)
EXPANSION_WEIGHT = 0.5


class PageLike(Protocol):
    """What selection reads of a page: ``glyphserve.render.RenderedPage`` and ``PageFacts`` have it."""

    number: int
    char_span: tuple[int, int]
    vision_tokens: int
    kind: str


@dataclass(frozen=True)
class PageFacts:
    """A page as a stored manifest describes it."""

    number: int
    char_span: tuple[int, int]
    vision_tokens: int
    kind: str = "text"

    @classmethod
    def from_manifest(cls, page: dict) -> PageFacts:
        return cls(page["number"], tuple(page["char_span"]), page["vision_tokens"], page.get("kind", "text"))


class DocumentPages:
    """One document's pages as selection sees them: their cost, and (built on first use, when the pages do not
    all fit) which have text and a BM25 index over the passages of each page's text. Keep one per document: it
    serves every question."""

    def __init__(self, text: str, pages: Sequence[PageLike]):
        self.numbers = [p.number for p in pages]
        self.vision_tokens = [p.vision_tokens for p in pages]
        self._text = text
        self._spans = [(p.char_span, p.kind) for p in pages]
        self._index: BM25Index | None = None
        self._lock = threading.Lock()  # one build when several questions need it at once

    def __len__(self) -> int:
        return len(self.numbers)

    def __getstate__(self) -> dict:  # sent between processes (batch renders in workers); a lock is not
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def index(self) -> BM25Index:
        with self._lock:
            if self._index is None:
                passages: list[Passage] = []
                self.page_of: list[int] = []  # passage -> page position
                self.has_text: list[bool] = []
                for position, ((start, end), kind) in enumerate(self._spans):
                    found = [Passage(start + p.start, start + p.end, p.text)
                             for p in split_passages(self._text[start:end])]
                    passages += found
                    self.page_of += [position] * len(found)
                    self.has_text.append(kind != "scan" and bool(found))
                self._index = BM25Index(passages)
        return self._index


def shown_number(n: int) -> str:
    """``n`` for a message: a number of more than 12 digits by its length (a max_tokens of 4,000 digits came back
    whole in an 8 KB error)."""
    text = str(n)
    return text if len(text) <= 12 else f"(a number of {len(text):,} digits)"


@dataclass(frozen=True)
class PromptBudget:
    """The tokens a question leaves for pages: the prompt may take ``context - max_tokens`` (the answer's room).
    ``count_prompt(labels)``: the prompt's tokens for pages with these labels, the pages' own vision tokens left
    out (their image markers and labels counted); ``count_label(text)``: one label's tokens."""

    context: int
    max_tokens: int
    count_prompt: Callable[[Sequence[str]], int]
    count_label: Callable[[str], int]
    max_tokens_unset: bool = False  # ``max_tokens`` is the room kept for an answer whose request set none

    def answer_words(self) -> str:
        """The answer's room, as the request set it or not."""
        if self.max_tokens_unset:
            return f"{self.max_tokens} kept for the answer (max_tokens unset)"
        return f"up to {shown_number(self.max_tokens)} for the answer"

    @property
    def limit(self) -> int:
        return self.context - self.max_tokens


@dataclass(frozen=True)
class ShownPage:
    document: int  # position of its document in the collection (0 for a single document)
    number: int  # 1-based page number in its document
    label: str  # text placed just before the page in the prompt ("" for a single document)


@dataclass
class Selection:
    mode: str
    pages: list[ShownPage]  # in reading order
    prompt_tokens: int | None  # the prompt's exact size with these pages (None when ``all`` was not counted)
    limit: int | None  # the most tokens the prompt could take
    total_pages: int  # pages the documents have

    @property
    def labels(self) -> list[str] | None:
        return [p.label for p in self.pages] if any(p.label for p in self.pages) else None

    def shown(self, documents: Sequence[str] | None = None) -> list:
        """``pages_shown``: page numbers for one document; ``{"document": id, "page": n}`` for a collection
        (``documents``: the collection's ids in order)."""
        if documents is None or len(documents) == 1:
            return [p.number for p in self.pages]
        return [{"document": documents[p.document], "page": p.number} for p in self.pages]


def collection_label(position: int, title: str, number: int, pages: int) -> str:
    """The text before a page of a collection, in the layout of LongBench's multi-document QA (which Glyph was
    evaluated on): ``Passage N:`` then the document's title; here also which page of it this is."""
    # One line, and no control-token look-alikes (a file name must not speak for the chat template).
    title = " ".join((title or "untitled").replace("<|", "<").replace("|>", ">").split())[:200]
    return f"Passage {position + 1}:\n{title} (page {number} of {pages})\n"


def select_pages(
    documents: Sequence[DocumentPages],
    *,
    mode: str,
    question: str,
    history: Sequence[str] = (),
    budget: PromptBudget | None,
    titles: Sequence[str] | None = None,
) -> Selection:
    """The pages of ``documents`` to show for ``question`` (``history``: the texts of earlier turns). With
    ``titles`` (one per document) every page is labelled with its document (``collection_label``).
    ``budget`` may be None only for mode ``all``. Raises ContextOverflowError when not even one page fits."""
    if mode not in MODES:
        raise ConfigError(f"page selection must be one of {', '.join(MODES)}, not {mode!r}")
    if titles is not None and len(titles) != len(documents):
        raise ConfigError("give one title per document")
    pages = [(d, i) for d, doc in enumerate(documents) for i in range(len(doc))]
    labels = {
        (d, i): collection_label(d, titles[d], documents[d].numbers[i], len(documents[d])) if titles else ""
        for d, i in pages
    }

    def chosen(keys) -> list[ShownPage]:
        return [ShownPage(d, documents[d].numbers[i], labels[d, i]) for d, i in sorted(keys)]

    if mode == "all" or budget is None:
        if mode != "all":
            raise ConfigError(f"page selection {mode!r} needs a token budget (a model with a tokenizer)")
        return Selection(mode, chosen(pages), None, None, len(pages))
    if not pages:
        return Selection(mode, [], budget.count_prompt([]), budget.limit, 0)

    # Unlabelled pages add only their markers, so the prompt with every page (the one shown when all fit, counted
    # again below from the builder's kept tokens) gives the rest: one tokenization where two were.
    fixed = (budget.count_prompt([""]) - PAGE_MARKER_TOKENS if titles
             else budget.count_prompt([""] * len(pages)) - len(pages) * PAGE_MARKER_TOKENS)
    cost = {
        (d, i): documents[d].vision_tokens[i] + PAGE_MARKER_TOKENS + (budget.count_label(labels[d, i]) if titles else 0)
        for d, i in pages
    }
    room = budget.limit - fixed
    if sum(cost.values()) <= room:
        order = pages
    elif mode == "first":
        order = pages
    else:
        order = _ranked(documents, question, history)
    keep: list[tuple[int, int]] = []
    for key in order:
        if cost[key] <= room:
            keep.append(key)
            room -= cost[key]
        elif mode == "first":
            break  # the first pages: nothing after one that does not fit
    while True:
        shown = chosen(keep)
        total = budget.count_prompt([p.label for p in shown]) + sum(documents[d].vision_tokens[i] for d, i in keep)
        # The per-page sums equal the prompt's count whenever a label tokenizes alike on its own and in place;
        # should one not, the lowest-ranked page goes, so the prompt never overflows.
        if total <= budget.limit or not keep:
            break
        keep.pop()
    if not keep and mode == "first" and min(cost.values()) <= room:
        first = cost[pages[0]]
        raise ContextOverflowError(
            f"the first page alone needs {first} tokens and {room} are left for pages (the question and the "
            f"conversation take {fixed}, {budget.answer_words()}, of the {budget.context}): mode first "
            "shows nothing past a page that does not fit; use retrieve, or a longer context"
        )
    if not keep:
        smallest = min(cost.values())
        room_for_answer = budget.context - fixed - smallest
        advice = (f"{'send a max_tokens of' if budget.max_tokens_unset else 'lower max_tokens to'} at most "
                  f"{room_for_answer}"
                  if room_for_answer > 0
                  else f"one page and a one-token answer need {fixed + smallest + 1}: use a longer context or "
                       "shorten the question or the conversation")
        raise ContextOverflowError(
            f"the question and the conversation take {fixed} tokens, {budget.answer_words()}, but the context holds "
            f"{budget.context}: not even the smallest page ({smallest} tokens) fits; {advice}"
        )
    return Selection(mode, shown, total, budget.limit, len(pages))


def _ranked(documents: Sequence[DocumentPages], question: str, history: Sequence[str]) -> list[tuple[int, int]]:
    """Every page, most relevant first (see the module docstring); ties in reading order."""
    weights = dict.fromkeys(tokenize(question), 1.0)
    for turn in history:
        for term in tokenize(turn):
            weights.setdefault(term, HISTORY_WEIGHT)
    corpus = Corpus([doc.index for doc in documents])
    scores = [doc.index.scores(weights, corpus) for doc in documents]
    best = min(((-s, d, p) for d, found in enumerate(scores) for p, s in found.items()), default=None)
    if best is not None:
        _, d, p = best
        rare = sorted((-corpus.idf(t), t) for t in documents[d].index.terms[p] if t not in weights)
        for _, term in rare[:EXPANSION_TERMS]:
            weights[term] = EXPANSION_WEIGHT
        scores = [doc.index.scores(weights, corpus) for doc in documents]
    keys = []
    for d, doc in enumerate(documents):
        own = [0.0] * len(doc)
        for passage, score in scores[d].items():
            page = doc.page_of[passage]
            own[page] = max(own[page], score)
        for i in range(len(doc)):
            near = max(own[i - 1] if i > 0 else 0.0, own[i + 1] if i + 1 < len(doc) else 0.0)
            priority = max(own[i], NEIGHBOUR_SHARE * near)
            unknown = priority == 0 and not doc.has_text[i]
            keys.append((-priority, not unknown, d, i))
    keys.sort()
    return [(d, i) for _, _, d, i in keys]
