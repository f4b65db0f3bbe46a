"""Finding what matters in text too long to read whole: BM25 over passages, and the choice of pages to show the
model when a document or a collection does not fit its context. Pure Python; no engine, no web framework."""

from glyphserve.retrieve.bm25 import BM25Index, Corpus, Passage, split_passages, tokenize
from glyphserve.retrieve.selection import (
    MODES,
    DocumentPages,
    PageFacts,
    PromptBudget,
    Selection,
    ShownPage,
    collection_label,
    select_pages,
)

__all__ = [
    "MODES",
    "BM25Index",
    "Corpus",
    "DocumentPages",
    "PageFacts",
    "Passage",
    "PromptBudget",
    "Selection",
    "ShownPage",
    "collection_label",
    "select_pages",
    "split_passages",
    "tokenize",
]
