"""The generated suites: deterministic bytes, sizes near the asked length, checkable answers."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from glyphserve.eval import suites, textgen
from glyphserve.render import count_text_tokens

LENGTH = 4096


@pytest.mark.parametrize("suite", suites.GENERATED_SUITES)
def test_same_seed_same_bytes_other_seed_other_bytes(suite):
    first = list(suites.generate(suite, [LENGTH], 3, seed=7))
    again = list(suites.generate(suite, [LENGTH], 3, seed=7))
    other = list(suites.generate(suite, [LENGTH], 3, seed=8))
    assert [s.text.encode() for s in first] == [s.text.encode() for s in again]
    assert [(s.question, s.answers) for s in first] == [(s.question, s.answers) for s in again]
    assert all(a.text != b.text for a, b in zip(first, other))
    assert len({s.text for s in first}) == 3


@pytest.mark.parametrize("suite", suites.GENERATED_SUITES)
@pytest.mark.parametrize("length", [4096, 32768])
def test_documents_are_about_the_asked_length(suite, length):
    for sample in suites.generate(suite, [length], 2, seed=0):
        tokens, _ = count_text_tokens(sample.text)
        assert 0.93 * length <= tokens <= 1.08 * length, (suite, tokens)


def test_filler_never_contains_needle_material():
    text = " ".join(textgen.filler_sentences(__import__("random").Random(3), 200_000))
    assert not re.search(r"[0-9\-]|magic|special", text)


@pytest.mark.parametrize("length", [4096, 16384])
def test_niah_needle_is_there_once_at_its_depth(length):
    count = 5
    samples = list(suites.generate("niah", [length], count, seed=0))
    assert {s.meta["value_kind"] for s in samples} == {"number", "uuid"}
    for sample in samples:
        (needle,) = sample.meta["needles"]
        (value,) = sample.answers
        assert sample.text.count(needle) == 1
        assert sample.text.count(value) == 1
        assert sample.text.count(sample.meta["key"]) == 1
        assert sample.meta["key"] in sample.question
        longest_sentence = max(len(s) for s in re.split(r"(?<=\.)\s+", sample.text))
        position = sample.text.index(needle)
        haystack_chars = len(sample.text) - len(needle) - 1  # depth is a fraction of the text without the needle
        assert abs(position - sample.meta["depth"] * haystack_chars) <= longest_sentence
    assert [s.meta["depth"] for s in samples] == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])


def test_niah_multi_has_every_needle_and_distinct_distractor_keys():
    for sample in suites.generate("niah-multi", [LENGTH], 4, seed=0):
        key = sample.meta["key"]
        needles = sample.meta["needles"]
        assert len(needles) == 6
        for needle in needles:
            assert sample.text.count(needle) == 1
        for value in sample.answers:
            assert sample.text.count(value) == 1
            assert f"for {key} is: {value}." in sample.text
        # two distractors, for other keys only
        assert sum(f"for {key} is:" in n for n in needles) == 4
        assert sample.text.count(f"for {key} is:") == 4


def test_mdqa_answers_are_stated_once_in_the_right_document():
    samples = list(suites.generate("mdqa", [LENGTH], 8, seed=0))
    assert {s.meta["question_kind"] for s in samples} == {"year", "city", "founder", "birthplace"}
    for sample in samples:
        (answer,) = sample.answers
        company = sample.meta["company"]
        docs = re.split(r"\n\n(?=Document \d+: )", sample.text)
        assert len(docs) == sample.meta["documents"]
        company_doc = next(d for d in docs if d.split("\n")[0].endswith(f": {company}"))
        kind = sample.meta["question_kind"]
        if kind == "birthplace":
            founder = re.search(r"founded in \d+ by ([^.]+)\.", company_doc).group(1)
            person_doc = next(d for d in docs if d.split("\n")[0].endswith(f": {founder}"))
            assert f"{founder} was born in {answer}." in person_doc
            assert sample.text.count(answer) == 1
        elif kind == "founder":
            assert f"by {answer}." in company_doc
            assert sample.text.count(f"by {answer}.") == 1
        else:
            assert answer in company_doc and sample.text.count(answer) == 1


def test_mdqa_as_a_collection_with_its_evidence_and_past_a_million_tokens():
    sample = suites.mdqa(0, LENGTH, 3, 4)  # a birthplace question: two documents are evidence
    assert [f"Document {n}: {text}" for n, (_, text) in enumerate(sample.documents, 1)] == sample.text.split("\n\n")
    assert all(text.startswith(title + "\n") for title, text in sample.documents)
    assert len(sample.evidence) == 2 and all(sample.text.count(e) == 1 for e in sample.evidence)
    # Far past what two-syllable company names can tell apart: generated at once, every company distinct.
    big = suites.mdqa(0, 1_000_000, 0, 1)
    companies = [title for title, text in big.documents if " was founded in " in text]
    assert len(companies) > 2800 and len(set(companies)) == len(companies)


def test_freqword_counts_match_the_stated_answer():
    for sample in suites.generate("freqword", [LENGTH], 3, seed=0):
        words = Counter(w for w in sample.text.split() if w != "...")
        ranked = words.most_common()
        assert tuple(w for w, _ in ranked[:3]) == sample.answers
        assert ranked[0][1] > ranked[1][1] > ranked[2][1] > ranked[3][1]  # no ties anywhere near the answer
        assert {w: words[w] for w in sample.meta["top_counts"]} == sample.meta["top_counts"]
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in words)
