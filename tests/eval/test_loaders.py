"""LongBench and MRCR loaders: fields, prompts, scoring and length buckets."""

from __future__ import annotations

import json

import pytest

from glyphserve.errors import CorruptFileError, NotFoundError
from glyphserve.eval import loaders
from glyphserve.eval.runner import score


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


LONGBENCH_ROWS = [
    {"context": "Paris is the capital of France. " * 50, "input": "What is the capital of France?",
     "answers": ["Paris"], "dataset": "hotpotqa", "length": 300, "all_classes": None, "_id": "a"},
    {"context": "Question: Who wrote it? Type: HUM\n" * 400, "input": "Where is the Eiffel Tower?",
     "answers": ["LOC"], "dataset": "trec", "all_classes": ["HUM", "LOC", "NUM"], "_id": "b"},
]


def _mrcr_row(prefix="aB3xQ"):
    messages = [
        {"role": "user", "content": "write a poem about tapirs"},
        {"role": "assistant", "content": "Tapirs roam the forest floor."},
        {"role": "user", "content": "write a poem about otters"},
        {"role": "assistant", "content": "Otters play in the river."},
        {"role": "user",
         "content": f"Prepend {prefix} to the 1st (1 indexed) poem about tapirs. Do not include any other text."},
    ]
    return {"prompt": json.dumps(messages), "answer": prefix + "Tapirs roam the forest floor.",
            "random_string_to_prepend": prefix, "n_needles": 2}


def test_longbench_rows_become_scored_samples(tmp_path):
    path = _write_jsonl(tmp_path / "lb.jsonl", LONGBENCH_ROWS)
    assert loaders.detect_format(path) == "longbench"
    qa, trec = loaders.load_longbench(path)
    assert qa.text.startswith("Paris is the capital") and "What is the capital of France?" in qa.question
    assert qa.text not in qa.question  # the context is rendered, not sent as text
    assert score(qa, "Paris") == 1.0
    # "it is paris france": P 1/4, R 1/1 -> F1 0.4
    assert score(qa, "It is Paris, France") == pytest.approx(0.4)
    assert "Where is the Eiffel Tower?" in trec.question
    assert score(trec, "LOC\nbecause it is a place") == 1.0
    assert score(trec, "HUM") == 0.0


def test_mrcr_rows_split_history_and_final_question(tmp_path):
    path = _write_jsonl(tmp_path / "mrcr.jsonl", [_mrcr_row()])
    assert loaders.detect_format(path) == "mrcr"
    (sample,) = loaders.load_mrcr(path)
    assert "Otters play in the river." in sample.text and "Prepend" not in sample.text
    assert sample.question.startswith("Prepend aB3xQ")
    assert score(sample, "aB3xQTapirs roam the forest floor.") == 1.0
    assert score(sample, "Tapirs roam the forest floor.") == 0.0


def test_a_json_array_file_is_accepted(tmp_path):
    path = tmp_path / "mrcr.json"
    path.write_text(json.dumps([_mrcr_row(), _mrcr_row("zz")]), encoding="utf-8")
    assert [s.meta["prefix"] for s in loaders.load_mrcr(path)] == ["aB3xQ", "zz"]


def test_bad_files_raise_typed_errors(tmp_path):
    with pytest.raises(NotFoundError):
        list(loaders.load_longbench(tmp_path / "missing.jsonl"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"context": "x"\n', encoding="utf-8")
    with pytest.raises(CorruptFileError, match="line 1"):
        list(loaders.load_longbench(broken))
    partial = _write_jsonl(tmp_path / "partial.jsonl", [{"context": "x", "input": "y"}])
    with pytest.raises(CorruptFileError, match="answers, dataset"):
        list(loaders.load_longbench(partial))
    with pytest.raises(CorruptFileError, match="neither LongBench"):
        loaders.detect_format(partial)


def test_bucket_by_length_assigns_smallest_fitting_length_and_caps(tmp_path):
    path = _write_jsonl(tmp_path / "lb.jsonl", LONGBENCH_ROWS * 3)
    samples = list(loaders.load_longbench(path))
    words = lambda text: len(text.split())  # noqa: E731 - a stand-in tokenizer: one token per word
    kept, too_long = loaders.bucket_by_length(samples, [1000, 4000], words, per_bucket=2)
    # hotpotqa contexts have 300 words (bucket 1000), trec ones 2,800 (bucket 4000)
    assert [(s.length, s.meta["dataset"]) for s in kept] == [(1000, "hotpotqa")] * 2 + [(4000, "trec")] * 2
    kept, too_long = loaders.bucket_by_length(samples, [1000], words, per_bucket=None)
    assert len(kept) == 3 and too_long == 3


def test_cli_runs_data_files_per_dataset_and_bucket(tmp_path):
    from glyphserve.cli import main

    data = _write_jsonl(tmp_path / "lb.jsonl", LONGBENCH_ROWS)
    out = tmp_path / "out"
    assert main(["eval", "--suite", "longbench", "--data", str(data), "--lengths", "1k,4k", "-o", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert [(r["suite"], r["length"], r["samples"]) for r in summary] == [
        ("longbench/hotpotqa", 1024, 1), ("longbench/trec", 4096, 1)]

    data = _write_jsonl(tmp_path / "mrcr.jsonl", [_mrcr_row()])
    assert main(["eval", "--suite", "mrcr", "--data", str(data), "--lengths", "1k", "-o", str(out)]) == 0
    (row,) = json.loads((out / "results.json").read_text())["summary"]
    assert row["suite"] == "mrcr/2-needle" and row["accuracy"] == 0.0  # extractive answers lack the prefix


def test_suite_all_adds_the_data_files_benchmark(tmp_path):
    from glyphserve.eval.commands import parse_suites

    data = _write_jsonl(tmp_path / "mrcr.jsonl", [_mrcr_row()])
    assert parse_suites("all", data) == ["niah", "niah-multi", "mdqa", "freqword", "mrcr", "ocr"]
    assert parse_suites("all", None) == ["niah", "niah-multi", "mdqa", "freqword", "ocr"]
