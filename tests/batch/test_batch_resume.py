"""Resuming ``glyphserve batch`` into a results file: every row says what answered it, and a rerun by another
backend, model or settings is refused before any work instead of mixing its answers with the file's (the tiny
model on CPU, the extractive answers, a loopback OpenAI server)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from glyphserve.batch import read_results
from glyphserve.cli import main
from tests.batch.chat_server import ChatServer

PARAGRAPH = ("The river port of Alderney handled {n} barges in the spring of the year, most of them carrying grain "
             "and timber downstream to the estuary. Harbour master Ines Calloway kept the ledgers herself.")
QUESTIONS = ["Who kept the ledgers?", "What did the barges carry?"]


@pytest.fixture
def docs(tmp_path) -> Path:
    """Three short reports; their questions beside the folder, in questions.txt."""
    folder = tmp_path / "docs"
    folder.mkdir()
    for n in range(3):
        (folder / f"report{n}.txt").write_text(PARAGRAPH.format(n=n), encoding="utf-8")
    (tmp_path / "questions.txt").write_text("\n".join(QUESTIONS) + "\n", encoding="utf-8")
    return folder


def _batch(docs: Path, out: Path, *flags: str) -> int:
    return main(["batch", str(docs), "--questions", str(docs.parent / "questions.txt"), "-o", str(out),
                 "--workers", "0", *flags])


def _half_done(out: Path, rows: int = 2) -> None:
    """Keep the first ``rows`` rows, as a run stopped there leaves the file."""
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:rows]))


def test_a_resume_by_another_backend_model_or_settings_is_refused_untouched(tiny_model_dir, docs, tmp_path, capsys,
                                                                             monkeypatch):
    out = tmp_path / "r.jsonl"
    model = ["--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "2"]
    assert _batch(docs, out, *model) == 0
    rows = read_results(out)
    assert len(rows) == 6 and {json.dumps(r["answered_by"], sort_keys=True) for r in rows} == {json.dumps({
        "backend": "local", "model": str(tiny_model_dir.resolve()), "quantize": None, "max_new_tokens": 2,
        "temperature": 0.0, "top_p": 1.0, "seed": None, "ignore_eos": False, "max_context": None,
        "page_selection": "retrieve", "preset": "auto", "dpi": None, "newline": None}, sort_keys=True)}
    _half_done(out)
    before = out.read_bytes()
    capsys.readouterr()

    # The trial's two mixes: another backend, other generation settings; each named as the flags that differ.
    refusals = [
        (["--backend", "extractive"],
         f"2 by --backend local --model {tiny_model_dir.resolve()}, where this run has --backend extractive."),
        ([*model[:-1], "4"], "2 by --max-new-tokens 2, where this run has --max-new-tokens 4."),
        ([*model, "--temperature", "0.7", "--seed", "3"],
         "2 by --temperature 0 no --seed, where this run has --temperature 0.7 --seed 3."),
        ([*model, "--page-selection", "first", "--dpi", "96"],
         "2 by --page-selection retrieve no --dpi, where this run has --page-selection first --dpi 96."),
        (["--random-weights", "glm-4.1v-9b", "--device", "cpu", "--max-new-tokens", "2"],
         "where this run has --backend local --random-weights glm-4.1v-9b."),
    ]
    for flags, difference in refusals:
        assert _batch(docs, out, *flags) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"error: {out} holds 2 rows answered otherwise than this run answers: "), \
            captured.err
        assert difference in captured.err and "give -o another file" in captured.err
        assert "--allow-mixed" in captured.err and captured.out == ""  # refused before any work
        assert out.read_bytes() == before

    # The same model by another path (a rerun from elsewhere) is the same answerer: the run goes on.
    monkeypatch.chdir(tiny_model_dir.parent)
    assert _batch(docs, out, "--model", f"./{tiny_model_dir.name}/", "--device", "cpu", "--max-new-tokens", "2") == 0
    assert "4 answered" in capsys.readouterr().out and len(read_results(out)) == 6

    # --allow-mixed adds them anyway, and each row keeps saying what answered it.
    _half_done(out)
    assert _batch(docs, out, "--backend", "extractive", "--allow-mixed") == 0
    captured = capsys.readouterr()
    assert f"--allow-mixed: {out} holds 2 rows answered otherwise" in captured.err
    assert "4 answered, 0 failed, 2 skipped" in captured.out
    assert [r["answered_by"]["backend"] for r in read_results(out)] == ["local"] * 2 + ["extractive"] * 4


def test_rows_from_before_answered_by_resume_with_a_warning_and_reach_the_table(docs, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert _batch(docs, out, "--backend", "extractive") == 0
    old = [{key: value for key, value in row.items() if key != "answered_by"} for row in read_results(out)[:3]]
    out.write_text("".join(json.dumps(row) + "\n" for row in old), encoding="utf-8")
    capsys.readouterr()
    table = tmp_path / "tables" / "r.parquet"  # its folder is made, as -o's is
    assert _batch(docs, out, "--backend", "extractive", "--parquet", str(table)) == 0
    captured = capsys.readouterr()
    assert (f"batch: 3 rows of {out} do not say what answered them (written before glyphserve recorded it), so "
            "they are not compared with this run (--backend extractive --preset auto)") in captured.err
    assert "3 answered, 0 failed, 3 skipped" in captured.out

    import pyarrow.parquet as pq

    answered_by = pq.read_table(table).column("answered_by").to_pylist()  # a column, though the first row lacks it
    assert answered_by[:3] == [None] * 3 and [a["backend"] for a in answered_by[3:]] == ["extractive"] * 3


def test_the_servers_model_is_recorded_and_another_refused(docs, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    glyph, other = ChatServer(model="glyph-a"), ChatServer(model="glyph-b")
    try:
        assert _batch(docs, out, "--endpoint", glyph.url + "/v1", "--max-new-tokens", "8") == 0
        assert {r["answered_by"]["model"] for r in read_results(out)} == {"glyph-a"}
        _half_done(out)
        capsys.readouterr()
        assert _batch(docs, out, "--endpoint", other.url + "/v1", "--max-new-tokens", "8") == 2
        err = capsys.readouterr().err
        assert ("2 by --backend openai --remote-model glyph-a, where this run has --backend openai --remote-model "
                "glyph-b") in err
        assert len(other.requests) == 0  # asked its model's name, and nothing else
        # Another server of the same model, or the same by the name given, finishes the file.
        assert _batch(docs, out, "--endpoint", glyph.url + "/v1", "--remote-model", "glyph-a",
                      "--max-new-tokens", "8") == 0
    finally:
        glyph.close()
        other.close()
    assert len(read_results(out)) == 6


def test_a_foreign_results_file_is_refused_before_the_servers_are_asked(docs, tmp_path, capsys):
    important = tmp_path / "important.jsonl"
    important.write_text('{"customer": 1}\n', encoding="utf-8")
    # (nothing listens there: the file is refused first, not the endpoint)
    assert _batch(docs, important, "--endpoint", "http://127.0.0.1:9/v1") == 2
    assert capsys.readouterr().err.startswith(f"error: {important} is not a batch results file")
    assert os.path.getsize(important) == 16
