"""Loaders for user-supplied LongBench and MRCR files (JSON Lines, or one JSON array).

LongBench rows carry ``context``, ``input``, ``answers`` and ``dataset`` (``all_classes`` for the
classification sets); MRCR rows carry ``prompt`` (a JSON list of chat messages), ``answer`` and
``random_string_to_prepend``. The context is what gets rendered; the instruction and the
question go to the backend as the question.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from glyphserve.errors import CorruptFileError, NotFoundError
from glyphserve.eval.metrics import longbench_metric
from glyphserve.eval.suites import Sample

_QA = "Answer the question using the document. Give only the answer, no other words.\n\nQuestion: {input}"
_QA_ZH = "根据文档回答问题，只给出答案，不要输出其他文字。\n\n问题：{input}"
# Instruction per metric family; datasets without a question (gov_report, lcc, ...) have empty ``input``.
_INSTRUCTIONS = {
    "qa_f1": _QA,
    "qa_f1_zh": _QA_ZH,
    "rouge_l": "Summarize the document. {input}",
    "rouge_l_zh": "根据文档完成任务。{input}",
    "classification": "The document holds labelled examples. Give only the label of the following text.\n\n{input}",
    "retrieval": 'The document holds numbered paragraphs. Which paragraph does this summary describe? '
                 'Answer like "Paragraph 1".\n\n{input}',
    "retrieval_zh": "文档由编号的段落组成。下面的摘要出自哪个段落？请按“段落1”的格式回答。\n\n{input}",
    "count": "How many unique paragraphs does the document contain once duplicates are removed? "
             "Answer with one number only.",
    "code_sim": "Complete the code: give only its next line.\n\n{input}",
}
LONGBENCH_FIELDS = ("context", "input", "answers", "dataset")
MRCR_FIELDS = ("prompt", "answer", "random_string_to_prepend")


def read_records(path: str | Path, required: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file (or a JSON array), each checked for the ``required`` fields."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"data file not found: {path}")
    required = tuple(required)
    with path.open(encoding="utf-8") as handle:
        first = handle.read(1)
        handle.seek(0)
        if first == "[":
            try:
                rows = enumerate(json.load(handle), 1)
            except json.JSONDecodeError as exc:
                raise CorruptFileError(f"{path} is not valid JSON: {exc}") from None
        else:
            rows = ((n, _parse_line(path, n, line)) for n, line in enumerate(handle, 1) if line.strip())
        for number, row in rows:
            missing = [f for f in required if not isinstance(row, dict) or f not in row]
            if missing:
                raise CorruptFileError(f"{path}, record {number}: missing field(s) {', '.join(missing)}")
            yield row


def _parse_line(path: Path, number: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{path}, line {number} is not valid JSON: {exc}") from None


def detect_format(path: str | Path) -> str:
    """``longbench`` or ``mrcr``, from the fields of the file's first record."""
    first = next(read_records(path, ()), None)
    for name, fields in (("longbench", LONGBENCH_FIELDS), ("mrcr", MRCR_FIELDS)):
        if first is not None and all(f in first for f in fields):
            return name
    raise CorruptFileError(
        f"{path} is neither LongBench ({', '.join(LONGBENCH_FIELDS)}) nor MRCR ({', '.join(MRCR_FIELDS)}) data"
    )


def load_longbench(path: str | Path) -> Iterator[Sample]:
    """LongBench (v1 or LongBench-E) rows as samples scored with their dataset's metric.

    The suite is ``longbench/<dataset>`` so reports keep datasets apart, as LongBench does.
    """
    for index, row in enumerate(read_records(path, LONGBENCH_FIELDS)):
        dataset = str(row["dataset"])
        question = _INSTRUCTIONS[longbench_metric(dataset)].format(input=row["input"] or "").strip()
        answers = row["answers"] if isinstance(row["answers"], list) else [row["answers"]]
        yield Sample(
            f"longbench/{dataset}", 0, index, str(row["context"]), question, tuple(map(str, answers)), "longbench",
            {"dataset": dataset, "all_classes": list(row.get("all_classes") or [])},
        )


def load_mrcr(path: str | Path) -> Iterator[Sample]:
    """MRCR rows: every message but the last is the rendered conversation; the last is the question.

    The suite is ``mrcr/<n>-needle`` when rows say how many needles they hold (``n_needles``).
    """
    for index, row in enumerate(read_records(path, MRCR_FIELDS)):
        messages = json.loads(row["prompt"]) if isinstance(row["prompt"], str) else row["prompt"]
        if not messages or not all(isinstance(m, dict) and "content" in m for m in messages):
            raise CorruptFileError(f"{path}, record {index + 1}: prompt is not a list of chat messages")
        text = "\n\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in messages[:-1])
        needles = row.get("n_needles")
        suite = f"mrcr/{needles}-needle" if needles else "mrcr"
        yield Sample(
            suite, 0, index, text, str(messages[-1]["content"]), (str(row["answer"]),), "mrcr",
            {"prefix": str(row["random_string_to_prepend"])},
        )


def bucket_by_length(
    samples: Iterable[Sample], lengths: list[int], count_tokens: Callable[[str], int], per_bucket: int | None
) -> tuple[list[Sample], int]:
    """Give each sample the smallest of ``lengths`` its text fits in; keep ``per_bucket`` per length.

    Returns the kept samples and how many were longer than the largest length (dropped).
    """
    kept: list[Sample] = []
    taken = dict.fromkeys(lengths, 0)
    too_long = 0
    for sample in samples:
        tokens = count_tokens(sample.text)
        length = next((L for L in sorted(lengths) if tokens <= L), None)
        if length is None:
            too_long += 1
        elif per_bucket is None or taken[length] < per_bucket:
            taken[length] += 1
            kept.append(dataclasses.replace(sample, length=length))
        if per_bucket is not None and all(n >= per_bucket for n in taken.values()):
            break
    return sorted(kept, key=lambda s: (s.length, s.index)), too_long
