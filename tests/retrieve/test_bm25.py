"""BM25 over passages: splitting, ranking, weighted queries, collection statistics."""

from __future__ import annotations

import pytest

from glyphserve.retrieve import BM25Index, Corpus, split_passages, tokenize
from tests.serve.conftest import STORY


def test_passages_keep_exact_spans_and_bounded_length():
    text = STORY + "\n\n" + ("A long sentence without an end " * 40) + "\n\n  Trailing paragraph.  "
    passages = split_passages(text, max_chars=200)
    assert [p.text for p in passages[:3]] == STORY.split("\n\n")
    for p in passages:
        assert text[p.start:p.end] == p.text
        assert 0 < len(p.text) <= 200
    assert passages[-1].text == "Trailing paragraph."


def test_long_paragraphs_are_cut_at_sentence_ends():
    sentences = [f"Sentence number {i} talks about topic {i}." for i in range(40)]
    passages = split_passages(" ".join(sentences), max_chars=150)
    assert len(passages) > 5
    assert all(p.text.endswith(".") for p in passages)


def test_a_sentence_longer_than_a_passage_is_cut_at_words():
    """Text without full stops (a list, a table's lines): each passage ends at a word, so every word is whole in
    one passage; a run without spaces is cut at the limit."""
    words = [f"quarterly{i} revenue{i}" for i in range(60)]
    text = " ".join(words)
    passages = split_passages(text, max_chars=100)
    assert len(passages) > 5 and all(len(p.text) <= 100 for p in passages)
    assert [w for p in passages for w in p.text.split()] == text.split()
    assert [p.text for p in split_passages("中" * 250, max_chars=100)] == ["中" * 100, "中" * 100, "中" * 50]


def test_bm25_ranks_the_matching_passage_first():
    index = BM25Index.from_text(STORY)
    (best, score), *_ = index.search("Which ship hit the rocks in the storm?")
    assert "schooner Albatross" in best.text and score > 0
    assert index.search("completely unrelated zebra") == []


def test_english_words_match_across_inflections():
    index = BM25Index.from_text("How to install the package.\n\nThe weather was fine.")
    (best, _), = index.search("Which packages are installed?")
    assert best.text == "How to install the package."
    assert tokenize("Installing installations") == ["instal", "instal"]


def test_chinese_text_is_searchable():
    text = "北京是中国的首都，有很多名胜古迹。\n\n上海是一座国际化的大都市，位于长江入海口。"
    assert "上海" in tokenize(text)  # character bigrams
    (best, _), *_ = BM25Index.from_text(text).search("长江入海口在哪里")
    assert best.text.startswith("上海")


def test_weighted_terms_and_statistics_of_a_collection():
    a = BM25Index.from_text("Red apples grow here.\n\nBlue sky above the hills.")
    b = BM25Index.from_text("Red cars everywhere.\n\nRed paint on the door.")
    alone = a.scores({"red": 1.0})
    assert list(alone) == [0] and a.scores({"red": 0.5})[0] == alone[0] / 2
    # In the collection "red" is in most passages: it tells less, and scores lower.
    assert 0 < a.scores({"red": 1.0}, Corpus([a, b]))[0] < alone[0]


@pytest.mark.parametrize("text, words", [
    ("Где находится Москва?", ["где", "находится", "москва"]),
    ("Zürich’s café", ["zürich", "café"]),  # a curly apostrophe as a straight one, the possessive stemmed
    ("ＡＢＣ", ["abc"]),  # full-width letters as their plain forms
    ("서울은", ["서", "울", "은", "서울", "울은"]),
    ("東京タワー", ["東", "京", "タ", "ワ", "ー", "東京", "京タ", "タワ", "ワー"]),
])
def test_every_script_has_words(text, words):
    assert tokenize(text) == words


def test_a_question_in_another_script_finds_its_passage():
    index = BM25Index.from_text("Paris is in France.\n\nМосква — столица России.\n\n서울은 한국의 수도이다.")
    assert index.search("Где Москва?")[0][0].text.startswith("Москва")
    assert index.search("서울")[0][0].text.startswith("서울")
