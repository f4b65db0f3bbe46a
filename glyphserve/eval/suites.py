"""Seeded, locally generated test suites: needle-in-a-haystack, multi-document QA, frequent words.

Each sample is built from its own ``random.Random`` seeded with (seed, suite, length, index);
its bytes depend on nothing else but the sample count, which spaces the needle depths evenly.
Haystacks are sized with the renderer's token estimate, the one reported for backends
without a tokenizer.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from glyphserve.eval import textgen
from glyphserve.render import count_text_tokens

GENERATED_SUITES = ("niah", "niah-multi", "mdqa", "freqword")

NEEDLE = "One of the special magic {noun}s for {key} is: {value}."
NEEDLE_QUESTION = "What is the special magic {noun} for {key} mentioned in the provided text?"
MULTI_QUESTION = "What are all the special magic {noun}s for {key} mentioned in the provided text?"
FREQ_QUESTION = (
    "The document is a list of coded words separated by '...'. Count how often each coded word occurs. "
    "What are the three most frequently occurring coded words? Answer with the three words, most frequent first."
)
# (key kind, value kind) of the single-needle variants, cycled over the samples.
_NIAH_VARIANTS = (("word", "number"), ("word", "uuid"), ("uuid", "uuid"))


@dataclass(frozen=True)
class Sample:
    """One question about one document, with what a correct answer must contain.

    ``metric`` names the scorer in :func:`glyphserve.eval.runner.score`; ``meta`` keeps
    what the scorer or a reader needs (needle depths, dataset name, MRCR prefix).
    """

    suite: str
    length: int
    index: int
    text: str
    question: str
    answers: tuple[str, ...]
    metric: str
    meta: dict[str, Any] = field(default_factory=dict)
    # The same text as a collection of (title, text) documents, for questions over collections (mdqa).
    documents: tuple[tuple[str, str], ...] | None = None
    # The sentences a correct answer needs to see (page selection must show the pages holding them).
    evidence: tuple[str, ...] = ()


def sample_rng(seed: int, suite: str, length: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{suite}:{length}:{index}")


@functools.cache
def _filler_chars_per_token() -> float:
    probe = " ".join(textgen.filler_sentences(random.Random(0), 20_000))
    return len(probe) / count_text_tokens(probe)[0]


def chars_for_tokens(tokens: int) -> int:
    """Characters of English filler that the renderer's estimate prices at ``tokens``."""
    return round(tokens * _filler_chars_per_token())


def _evenly_spaced(index: int, count: int) -> float:
    """Depth of sample ``index`` out of ``count``: the middles of ``count`` equal slices."""
    return (index + 0.5) / count


def _insert_at_depths(rng: random.Random, sentences: list[str], needles: list[tuple[float, str]]) -> str:
    """Group the sentences into paragraphs, then put each needle at the sentence boundary of the
    final text nearest its depth (a fraction of the haystack's characters, needles excluded)."""
    groups = textgen.paragraph_groups(sentences, rng)
    boundaries: list[tuple[int, int, int]] = []  # (character offset, paragraph, sentence)
    offset = 0
    for g, group in enumerate(groups):
        for s, sentence in enumerate(group):
            boundaries.append((offset, g, s))
            offset += len(sentence) + 1
        boundaries.append((offset - 1, g, len(group)))  # end of the paragraph
        offset += 1  # the paragraph break is two characters, not one space
    total = offset - 2
    places = [(min(boundaries, key=lambda b: abs(b[0] - depth * total)), needle) for depth, needle in needles]
    # Insert from the back so earlier (paragraph, sentence) places keep their meaning.
    for (_, g, s), needle in sorted(places, key=lambda p: p[0], reverse=True):
        groups[g].insert(s, needle)
    return textgen.join_paragraphs(groups)


def _value(rng: random.Random, kind: str) -> str:
    return textgen.number_value(rng) if kind == "number" else textgen.uuid_like(rng)


def _key(rng: random.Random, kind: str) -> str:
    return textgen.needle_key(rng) if kind == "word" else textgen.uuid_like(rng)


def niah(seed: int, length: int, index: int, count: int) -> Sample:
    """One key-value needle at an evenly spaced depth; the question asks for its value."""
    rng = sample_rng(seed, "niah", length, index)
    key_kind, value_kind = _NIAH_VARIANTS[index % len(_NIAH_VARIANTS)]
    key, value = _key(rng, key_kind), _value(rng, value_kind)
    needle = NEEDLE.format(noun=value_kind, key=key, value=value)
    depth = _evenly_spaced(index, count)
    sentences = textgen.filler_sentences(rng, chars_for_tokens(length) - len(needle))
    text = _insert_at_depths(rng, sentences, [(depth, needle)])
    return Sample(
        "niah", length, index, text, NEEDLE_QUESTION.format(noun=value_kind, key=key), (value,), "recall",
        {"depth": depth, "needles": [needle], "key": key, "value_kind": value_kind}, evidence=(needle,),
    )


def niah_multi(seed: int, length: int, index: int, count: int, values: int = 4, distractors: int = 2) -> Sample:
    """Several values for one key at random depths, plus needles for other keys; all values are asked for."""
    rng = sample_rng(seed, "niah-multi", length, index)
    value_kind = ("number", "uuid")[index % 2]
    key = textgen.needle_key(rng)
    other_keys: list[str] = []
    while len(other_keys) < distractors:
        other = textgen.needle_key(rng)
        if other != key and other not in other_keys:
            other_keys.append(other)
    answers = tuple(_value(rng, value_kind) for _ in range(values))
    needles = [NEEDLE.format(noun=value_kind, key=key, value=v) for v in answers]
    needles += [NEEDLE.format(noun=value_kind, key=k, value=_value(rng, value_kind)) for k in other_keys]
    depths = [rng.random() for _ in needles]
    sentences = textgen.filler_sentences(rng, chars_for_tokens(length) - sum(map(len, needles)))
    text = _insert_at_depths(rng, sentences, list(zip(depths, needles)))
    return Sample(
        "niah-multi", length, index, text, MULTI_QUESTION.format(noun=value_kind, key=key), answers, "recall",
        {"depths": depths, "needles": needles, "key": key, "value_kind": value_kind},
        evidence=tuple(needles[:values]),
    )


_PRODUCTS = ("copper kettles", "wool blankets", "glass lenses", "paper lanterns", "oak barrels", "brass compasses",
             "clay tiles", "silk ribbons", "iron hinges", "river boats", "pocket watches", "leather satchels")
_MDQA_QUESTIONS = {
    "year": "In which year was {company} founded?",
    "city": "In which city does {company} have its headquarters?",
    "founder": "Who founded {company}?",
    "birthplace": "In which city was the founder of {company} born?",
}
# A company document plus, for a third of the companies, a founder's half-length document.
_MDQA_TOKENS_PER_COMPANY = 350
_MDQA_SHORT_NAMES = 600


def _unique(rng: random.Random, make: Callable[[random.Random], str], count: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        value = make(rng)
        if value not in taken:
            taken.add(value)
            out.append(value)
    return out


def mdqa(seed: int, length: int, index: int, count: int) -> Sample:
    """Numbered fact documents about made-up companies and their founders; one fact is asked for.

    The asked-for value is stated nowhere else (a founder's name also heads the founder's own
    document); ``birthplace`` questions need two documents: the company's, which names the
    founder, and the founder's, which names the city.
    """
    rng = sample_rng(seed, "mdqa", length, index)
    kind = tuple(_MDQA_QUESTIONS)[index % len(_MDQA_QUESTIONS)]
    companies = max(4, round(length / _MDQA_TOKENS_PER_COMPANY))
    taken: set[str] = set()
    # Two-syllable names run out (43 x 43) well before a million-token collection: longer ones past 600 companies.
    syllables = 2 if companies <= _MDQA_SHORT_NAMES else 3
    names = [f"{n} {rng.choice(('Works', 'Mills', 'Trading', 'Foundry', 'Guild'))}"
             for n in _unique(rng, lambda r: textgen.proper_name(r, syllables), companies, taken)]
    founders = _unique(rng, textgen.person_name, companies, taken)
    cities = _unique(rng, lambda r: textgen.proper_name(r, 3), 2 * companies, taken)
    target = min(companies - 1, int(_evenly_spaced(index, count) * companies))
    target_year = rng.randrange(1500, 2000)
    other_years = [y for y in range(1500, 2000) if y != target_year]
    years = [str(target_year if i == target else rng.choice(other_years)) for i in range(companies)]
    with_person = {target} | set(rng.sample(range(companies), companies // 3))

    facts = [
        f"{names[i]}\n{names[i]} was founded in {years[i]} by {founders[i]}. Its headquarters are in {cities[i]}, "
        f"where it makes {rng.choice(_PRODUCTS)}."
        for i in range(companies)
    ]
    person_facts = [f"{founders[i]}\n{founders[i]} was born in {cities[companies + i]}." for i in sorted(with_person)]
    # Filler fills the rest of the length: a company document gets twice a person document's share.
    # Per document, 50 characters cover the "Document N: " header and the filler's overshoot (half a sentence).
    fixed = sum(len(f) + 50 for f in facts + person_facts)
    share = max(0, chars_for_tokens(length) - fixed) / (2 * len(facts) + len(person_facts))
    docs = [f + " " + " ".join(textgen.filler_sentences(rng, round(2 * share))) for f in facts]
    person_docs = [f + " " + " ".join(textgen.filler_sentences(rng, round(share))) for f in person_facts]
    # Company documents keep their depth order; person documents go to random places.
    for doc in person_docs:
        docs.insert(rng.randrange(len(docs) + 1), doc)
    text = "\n\n".join(f"Document {n}: {doc}" for n, doc in enumerate(docs, 1))
    answer = {"year": years[target], "city": cities[target], "founder": founders[target],
              "birthplace": cities[companies + target]}[kind]
    evidence = [facts[target].split("\n", 1)[1]]
    if kind == "birthplace":
        evidence.append(f"{founders[target]} was born in {cities[companies + target]}.")
    return Sample(
        "mdqa", length, index, text, _MDQA_QUESTIONS[kind].format(company=names[target]), (answer,), "any",
        {"question_kind": kind, "company": names[target], "documents": len(docs)},
        documents=tuple((doc.split("\n", 1)[0], doc) for doc in docs), evidence=tuple(evidence),
    )


def freqword(seed: int, length: int, index: int, count: int, top: int = 3) -> Sample:
    """Coded words with Zipf-like counts among '...' noise; the ``top`` most frequent are asked for.

    The top counts are forced strictly apart (and above the rest) so the answer is unique.
    """
    rng = sample_rng(seed, "freqword", length, index)
    probe = " ".join(["abcdef"] * 40 + ["..."] * 60)
    items = round(length * len(probe.split()) / count_text_tokens(probe)[0])
    n_words = max(4 * top, items * 2 // 5)
    vocab = _unique(rng, textgen.coded_word, max(top + 3, min(400, n_words // 15)), set())
    weights = [1 / (rank + 1) ** 1.2 for rank in range(len(vocab))]
    counts = [max(1, round(n_words * w / sum(weights))) for w in weights]
    for rank in range(top, 0, -1):
        counts[rank - 1] = max(counts[rank - 1], counts[rank] + max(2, counts[rank] // 10))
    tokens = [w for w, c in zip(vocab, counts) for _ in range(c)] + ["..."] * max(0, items - sum(counts))
    rng.shuffle(tokens)
    answers = tuple(vocab[:top])
    return Sample(
        "freqword", length, index, " ".join(tokens), FREQ_QUESTION, answers, "words",
        {"top_counts": dict(zip(vocab[: top + 1], counts[: top + 1]))},
    )


_GENERATORS: dict[str, Callable[[int, int, int, int], Sample]] = {
    "niah": niah,
    "niah-multi": niah_multi,
    "mdqa": mdqa,
    "freqword": freqword,
}


def generate(suite: str, lengths: list[int], samples: int, seed: int) -> Iterator[Sample]:
    """``samples`` samples of ``suite`` at each length, shortest length first."""
    make = _GENERATORS[suite]
    for length in lengths:
        for index in range(samples):
            yield make(seed, length, index, samples)
