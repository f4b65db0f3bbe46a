"""Scoring functions: LongBench families, MRCR, RULER string match and OCR character error rate.

Every score is a float in [0, 1]. The LongBench functions compute what the official evaluation script
(``metrics.py`` of LongBench, shipped again in the Glyph repository) computes, through the packages it uses:
``jieba`` words for Chinese, ``rouge``'s ROUGE-L, ``fuzzywuzzy``'s ratio for code, so the figures compare.
"""

from __future__ import annotations

import logging
import re
import string
import warnings
from collections import Counter
from collections.abc import Sequence
from difflib import SequenceMatcher

import jieba
import numpy as np
from rouge import Rouge

with warnings.catch_warnings():  # without python-Levenshtein it uses difflib, as the official environment does
    warnings.simplefilter("ignore")
    from fuzzywuzzy import fuzz

jieba.setLogLevel(logging.WARNING)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_EN_PUNCT = set(string.punctuation)
_ZH_PUNCT = set("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")
_WS = re.compile(r"\s+")


def normalize_en(text: str) -> str:
    """Lower-case, drop punctuation and articles, squeeze whitespace (SQuAD-style)."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh(text: str) -> str:
    """Lower-case and drop punctuation (English and Chinese) and all whitespace."""
    return "".join(ch for ch in text.lower() if ch not in _EN_PUNCT and ch not in _ZH_PUNCT and not ch.isspace())


def _token_f1(pred: Sequence[str], ref: Sequence[str]) -> float:
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _jieba_words(text: str) -> list[str]:
    return list(jieba.cut(text, cut_all=False))


def qa_f1(prediction: str, reference: str) -> float:
    """Word-level F1 after English normalisation."""
    return _token_f1(normalize_en(prediction).split(), normalize_en(reference).split())


def qa_f1_zh(prediction: str, reference: str) -> float:
    """F1 over jieba words, each normalised (punctuation and whitespace dropped), empty ones left out."""

    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh(w) for w in _jieba_words(text)) if w]

    return _token_f1(words(prediction), words(reference))


def rouge_l(prediction: str, reference: str) -> float:
    """The ``rouge`` package's ROUGE-L F score; 0 where it refuses the input (e.g. an empty prediction)."""
    try:
        return float(Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"])
    except Exception:  # the official script scores anything rouge rejects (empty or word-less text) as 0
        return 0.0


def rouge_l_zh(prediction: str, reference: str) -> float:
    """ROUGE-L over jieba words."""
    return rouge_l(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(reference)))


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_en(prediction) == normalize_en(reference))


def classification_score(prediction: str, reference: str, all_classes: Sequence[str]) -> float:
    """1/k when the reference class is among the k class names found in the prediction.

    A found class that is only part of the reference's name (e.g. "ENTY" in "ENTY:other") does not
    count against it; as in the official script, it is removed while the list is walked, so the name after
    each removed one is not looked at.
    """
    found = [c for c in all_classes if c in prediction]
    for name in found:
        if name in reference and name != reference:
            found.remove(name)
    return 1.0 / len(found) if reference in found else 0.0


def retrieval_score(prediction: str, reference: str, zh: bool = False) -> float:
    """Share of the numbers in the prediction that equal the reference paragraph's number."""
    match = re.findall(r"段落(\d+)" if zh else r"Paragraph (\d+)", reference)
    if not match:
        return 0.0
    numbers = re.findall(r"\d+", prediction)
    return sum(n == match[0] for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, reference: str) -> float:
    """Share of the numbers in the prediction that equal the reference count."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(reference) for n in numbers) / len(numbers) if numbers else 0.0


def code_similarity(prediction: str, reference: str) -> float:
    """``fuzz.ratio`` / 100 of the first line without a backtick, # or // against the reference."""
    lines = prediction.lstrip("\n").split("\n")
    line = next((ln for ln in lines if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return fuzz.ratio(line, reference) / 100


def mrcr_score(response: str, answer: str, prefix: str) -> float:
    """MRCR grading as Glyph's script does it: 0 without the required prefix, else the SequenceMatcher ratio,
    a ``<|user|>`` left in the response (a stop token sent back) removed first."""
    if not response.startswith(prefix):
        return 0.0
    return SequenceMatcher(None, response.removeprefix(prefix).replace("<|user|>", ""),
                           answer.removeprefix(prefix)).ratio()


def string_match_recall(prediction: str, references: Sequence[str]) -> float:
    """RULER's string_match_all: share of the references found (case-insensitive) in the prediction."""
    lowered = prediction.lower()
    return sum(ref.lower() in lowered for ref in references) / len(references)


def string_match_any(prediction: str, references: Sequence[str]) -> float:
    """RULER's string_match_part: 1 when any reference occurs in the prediction."""
    lowered = prediction.lower()
    return float(any(ref.lower() in lowered for ref in references))


def word_recall(prediction: str, references: Sequence[str]) -> float:
    """Share of the reference words that occur as whole words in the prediction."""
    words = set(re.findall(r"\w+", prediction.lower()))
    return sum(ref.lower() in words for ref in references) / len(references)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute all cost 1), one numpy pass per character of ``a``.

    Within a row the insertion chain ``cur[j] = min(cur[j], cur[j-1] + 1)`` equals
    ``min_k<=j (cur[k] - k) + j``, so it is a running minimum instead of a Python loop.
    """
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    b_codes = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    offsets = np.arange(len(b) + 1, dtype=np.int64)
    row = offsets.copy()
    cur = np.empty_like(row)
    for i, ch in enumerate(a, 1):
        cur[0] = i
        np.minimum(row[:-1] + (b_codes != ord(ch)), row[1:] + 1, out=cur[1:])
        row = np.minimum.accumulate(cur - offsets) + offsets
    return int(row[-1])


def normalize_for_cer(text: str, zh: bool = False) -> str:
    """Whitespace runs become one space; for Chinese all whitespace goes."""
    return _WS.sub("", text) if zh else _WS.sub(" ", text).strip()


def character_error_rate(hypothesis: str, reference: str, zh: bool = False) -> float:
    """Levenshtein distance over the reference length, both whitespace-normalised."""
    hyp, ref = normalize_for_cer(hypothesis, zh), normalize_for_cer(reference, zh)
    if not ref:
        return float(bool(hyp))
    return levenshtein(hyp, ref) / len(ref)


# LongBench dataset -> metric. The first-line datasets answer in one line; the official
# evaluation cuts the prediction there.
LONGBENCH_METRICS: dict[str, str] = {
    **dict.fromkeys(
        ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"], "qa_f1"
    ),
    "multifieldqa_zh": "qa_f1_zh",
    **dict.fromkeys(["gov_report", "qmsum", "multi_news", "samsum"], "rouge_l"),
    **dict.fromkeys(["dureader", "vcsum"], "rouge_l_zh"),
    **dict.fromkeys(["trec", "lsht"], "classification"),
    "passage_retrieval_en": "retrieval",
    "passage_retrieval_zh": "retrieval_zh",
    "passage_count": "count",
    **dict.fromkeys(["lcc", "repobench-p"], "code_sim"),
}
_FIRST_LINE_DATASETS = {"trec", "triviaqa", "samsum", "lsht"}


def longbench_metric(dataset: str) -> str:
    """The metric name for a LongBench dataset (``_e`` variants share their base's); unknown -> qa_f1."""
    return LONGBENCH_METRICS.get(dataset.removesuffix("_e"), "qa_f1")


def longbench_score(prediction: str, answers: Sequence[str], dataset: str, all_classes: Sequence[str] = ()) -> float:
    """Best score of the prediction over the reference answers, as LongBench computes it."""
    base = dataset.removesuffix("_e")
    metric = longbench_metric(base)
    if base in _FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    scorers = {
        "qa_f1": qa_f1,
        "qa_f1_zh": qa_f1_zh,
        "rouge_l": rouge_l,
        "rouge_l_zh": rouge_l_zh,
        "classification": lambda p, r: classification_score(p, r, all_classes),
        "retrieval": retrieval_score,
        "retrieval_zh": lambda p, r: retrieval_score(p, r, zh=True),
        "count": count_score,
        "code_sim": code_similarity,
    }
    return max((scorers[metric](prediction, ref) for ref in answers), default=0.0)
