"""Metrics against values computed by hand on small cases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glyphserve.eval import metrics


def test_qa_f1_normalises_and_counts_overlap():
    # "the"/"a" and punctuation drop out: "cat sat on mat" vs "cat sat" -> P 2/4, R 2/2.
    assert metrics.qa_f1("The cat sat on the mat.", "a cat sat") == pytest.approx(2 / 3)
    assert metrics.qa_f1("Paris", "paris!") == 1.0
    assert metrics.qa_f1("London", "Paris") == 0.0


def test_qa_f1_zh_works_on_jieba_words():
    # jieba: 北京市|。 vs 北京 -> no common word; 北京|是|首都 vs 北京 -> P 1/3, R 1 -> F1 0.5
    assert metrics.qa_f1_zh("北京市。", "北京") == 0.0
    assert metrics.qa_f1_zh("北京是首都", "北京") == pytest.approx(0.5)


def test_rouge_l_is_the_rouge_packages():
    # rouge's ROUGE-L (union LCS over sentences): the cat sat on the mat / the cat on a mat -> P = R = 0.6.
    assert metrics.rouge_l("the cat sat on the mat", "The cat on a mat") == pytest.approx(0.6)
    assert metrics.rouge_l_zh("今天天气好", "今天天气好") == pytest.approx(1.0)
    assert metrics.rouge_l("", "anything") == 0.0  # rouge refuses an empty hypothesis: scored 0, as officially


def test_exact_match():
    assert metrics.exact_match("The Beatles!", "beatles") == 1.0
    assert metrics.exact_match("The Beatles", "Rolling Stones") == 0.0


def test_classification_retrieval_count_and_code():
    classes = ["ENTY", "ENTY:other", "HUM"]
    assert metrics.classification_score("ENTY:other", "ENTY:other", classes) == 1.0
    assert metrics.classification_score("HUM or ENTY:other", "ENTY:other", classes) == 0.5
    assert metrics.classification_score("HUM", "ENTY:other", classes) == 0.0
    assert metrics.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert metrics.retrieval_score("Paragraph 3 or Paragraph 4", "Paragraph 3") == 0.5
    assert metrics.retrieval_score("段落2", "段落2", zh=True) == 1.0
    assert metrics.count_score("There are 12 unique paragraphs", "12") == 1.0
    assert metrics.count_score("12 or 13", "12") == 0.5
    assert metrics.code_similarity("```\nreturn x\n", "return x") == 1.0
    assert metrics.code_similarity("x = 1  # set\nreturn x", "return y") == 0.88  # fuzz.ratio, rounded to 1 %
    # The official script drops a found part-name while walking the list, so the name after it ("ENTY:o",
    # also part of the reference) is never looked at and stays: 1/2, not 1.
    assert metrics.classification_score("ENTY:other", "ENTY:other", ["ENTY", "ENTY:o", "ENTY:other"]) == 0.5


def test_longbench_score_picks_metric_best_answer_and_first_line():
    assert metrics.longbench_metric("hotpotqa_e") == "qa_f1"
    assert metrics.longbench_metric("gov_report") == "rouge_l"
    # triviaqa answers are cut at the first line; the best of several references counts.
    assert metrics.longbench_score("Paris\nor maybe London", ["Lyon", "Paris"], "triviaqa") == 1.0
    assert metrics.longbench_score("HUM", ["HUM"], "trec", ["HUM", "LOC"]) == 1.0


def test_mrcr_requires_the_prefix_then_uses_sequence_matcher():
    # SequenceMatcher(" hello", " hello world").ratio() = 2 * 6 / (6 + 12)
    assert metrics.mrcr_score("xYz12 hello", "xYz12 hello world", "xYz12") == pytest.approx(2 / 3)
    assert metrics.mrcr_score("hello world", "xYz12 hello world", "xYz12") == 0.0
    assert metrics.mrcr_score("xYz12 hello world<|user|>", "xYz12 hello world", "xYz12") == 1.0


def test_string_match_recall_any_and_word_recall():
    assert metrics.string_match_recall("The values are 123 and ABC.", ["123", "abc", "999"]) == pytest.approx(2 / 3)
    assert metrics.string_match_any("value 999", ["123", "999"]) == 1.0
    assert metrics.string_match_any("value 9", ["123", "999"]) == 0.0
    # whole words only: "tsam" is not "tsamyl"
    assert metrics.word_recall("tsamyl, KJSVGB and tsam", ["tsamyl", "kjsvgb", "ultalu"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "", 3), ("same", "same", 0),
     ("北京", "南京", 1)],
)
def test_levenshtein_known_values(a, b, distance):
    assert metrics.levenshtein(a, b) == distance


def _naive_levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abc 北", max_size=25), st.text(alphabet="abc 北", max_size=25))
def test_levenshtein_matches_the_textbook_recurrence(a, b):
    assert metrics.levenshtein(a, b) == _naive_levenshtein(a, b)


def test_character_error_rate_normalises_whitespace():
    assert metrics.character_error_rate("hello   world\n", "hello world") == 0.0
    assert metrics.character_error_rate("helo world", "hello world") == pytest.approx(1 / 11)
    assert metrics.character_error_rate("北 京\n欢迎", "北京欢迎", zh=True) == 0.0
    assert metrics.character_error_rate("", "abcd") == 1.0
