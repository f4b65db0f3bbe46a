"""Batch inputs (folder, glob, manifest, questions) and the resumable results file."""

from __future__ import annotations

import fcntl
import io
import json

import pytest

from glyphserve.batch import ResultLog, collect_documents, load_questions, read_results
from glyphserve.batch.progress import Progress
from glyphserve.errors import ConfigError, NotFoundError


def test_questions_from_lines_and_json(tmp_path):
    lines = tmp_path / "q.txt"
    lines.write_text("What is it?\n\n  Who signed?  \nWhat is it?\n", encoding="utf-8")
    assert load_questions(lines) == ["What is it?", "Who signed?"]
    listed = tmp_path / "q.json"
    listed.write_text(json.dumps(["A?", "B?"]), encoding="utf-8")
    assert load_questions(listed) == ["A?", "B?"]
    listed.write_text('["A?", 3]', encoding="utf-8")
    with pytest.raises(ConfigError):
        load_questions(listed)
    with pytest.raises(NotFoundError):
        load_questions(tmp_path / "missing.txt")


def test_folder_glob_and_single_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.md").write_text("b")
    (tmp_path / ".hidden").write_text("h")
    docs = collect_documents(str(tmp_path), ["Q?"])
    assert [d.id for d in docs] == ["a.txt", "sub/b.md"]
    assert docs[1].path == tmp_path / "sub" / "b.md" and docs[1].questions == ("Q?",)
    globbed = collect_documents(str(tmp_path / "**" / "*.md"), ["Q?"])
    assert [d.path for d in globbed] == [tmp_path / "sub" / "b.md"]
    assert [d.id for d in collect_documents(str(tmp_path / "a.txt"), ["Q?"])] == ["a.txt"]
    with pytest.raises(ConfigError, match="no questions"):
        collect_documents(str(tmp_path))
    with pytest.raises(NotFoundError):
        collect_documents(str(tmp_path / "nope"), ["Q?"])
    with pytest.raises(NotFoundError):
        collect_documents(str(tmp_path / "*.pdf"), ["Q?"])


def test_manifest(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.txt").write_text("x")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"id": "x", "path": "docs/x.txt", "questions": ["Own?"]}) + "\n\n"
        + json.dumps({"id": "inline", "text": "Some pasted text.", "questions": []}) + "\n",
        encoding="utf-8",
    )
    x, inline = collect_documents(str(manifest), ["Shared?"])
    assert x.path == tmp_path / "docs" / "x.txt" and x.questions == ("Own?", "Shared?")
    assert inline.text == "Some pasted text." and inline.path is None and inline.questions == ("Shared?",)
    manifest.write_bytes((json.dumps({"id": "é", "text": "Reçu."}, ensure_ascii=False) + "\n").encode("utf-16"))
    assert [(d.id, d.text) for d in collect_documents(str(manifest), ["Q?"])] == [("é", "Reçu.")]  # PowerShell's >
    manifest.write_text(json.dumps({"id": "x", "path": "a", "text": "b"}) + "\n")
    with pytest.raises(ConfigError, match="exactly one"):
        collect_documents(str(manifest), ["Q?"])
    manifest.write_text(json.dumps({"id": "x", "text": "a"}) + "\n" + json.dumps({"id": "x", "text": "b"}) + "\n")
    with pytest.raises(ConfigError, match="duplicate"):
        collect_documents(str(manifest), ["Q?"])
    # Every bad line at once, each by its number (fixing five took five runs when only the first was said).
    manifest.write_text("\n".join(["{not json", json.dumps({"id": "y", "text": "ok"}), "[1]",
                                   json.dumps({"id": "z", "text": 3})]) + "\n")
    with pytest.raises(ConfigError, match=r"3 bad lines: line 1: not valid JSON.*; line 3: must be a JSON object; "
                                          r"line 4: 'path'/'text' must be a string$"):
        collect_documents(str(manifest), ["Q?"])


def _record(doc_id, question, error=None):
    return {"id": doc_id, "question": question, "answer": None if error else "yes", "error": error}


def test_a_blank_listed_question_is_reported_not_dropped(tmp_path):
    listed = tmp_path / "q.json"
    listed.write_text(json.dumps(["A?", "  "]))
    with pytest.raises(ConfigError, match=r"question 2 of 2 is blank"):
        load_questions(listed)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "x", "text": "Some text.", "questions": ["", "B?"]}) + "\n")
    with pytest.raises(ConfigError, match=r"line 1: 'questions': question 1 of 2 is blank"):
        collect_documents(str(manifest))


def test_a_results_path_that_is_no_file_is_refused_with_its_reason(tmp_path):
    with pytest.raises(ConfigError, match=r"is a folder: give the results file \(e.g. .*results.jsonl\)"):
        ResultLog(tmp_path)
    (tmp_path / "plain").write_text("")
    with pytest.raises(ConfigError, match="cannot make the folder of the results file .*: a file stands in its path"):
        ResultLog(tmp_path / "plain" / "results.jsonl")  # its folder would be a file


def test_results_resume_repairs_torn_line_and_retries_server_errors(tmp_path):
    path = tmp_path / "out" / "results.jsonl"
    with ResultLog(path) as log:
        log.append(_record("a", "q1"))
        log.append(_record("a", "q2", {"code": "corrupt_file", "message": "bad", "retryable": False}))
        log.append(_record("b", "q1", {"code": "out_of_memory", "message": "oom", "retryable": True}))
        with pytest.raises(ConfigError, match="another batch run"):
            ResultLog(path)
    with open(path, "ab") as f:
        f.write(b'{"id": "c", "question": "q1", "ans')  # a crash mid-write
    assert [r["id"] for r in read_results(path)] == ["a", "a", "b"]

    with ResultLog(path) as log:
        assert set(log.done) == {("a", "q1"), ("a", "q2")}  # the retryable failure runs again
        assert log.torn_bytes > 0 and log.retrying == 1
        log.append(_record("b", "q1"))
    assert path.read_bytes().endswith(b"\n")
    assert [(r["id"], r["question"], r["error"]) for r in read_results(path)] == [
        ("a", "q1", None),
        ("a", "q2", {"code": "corrupt_file", "message": "bad", "retryable": False}),
        ("b", "q1", None),
    ]
    with ResultLog(path, retry_failed=True) as log:
        assert set(log.done) == {("a", "q1"), ("b", "q1")}
    assert len(read_results(path)) == 2


def test_results_torn_only_line_is_truncated(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"id": "a", "quest')
    with ResultLog(path) as log:
        assert not log.done and log.torn_bytes == 18
    assert path.read_bytes() == b""


def test_a_results_file_this_run_made_and_left_empty_goes_again(tmp_path):
    """A run that failed before its first row (an unreachable --endpoint) leaves no empty results file behind."""
    with ResultLog(tmp_path / "none.jsonl"):
        pass
    assert not (tmp_path / "none.jsonl").exists()
    with ResultLog(tmp_path / "one.jsonl") as log:
        log.append(_record("a", "q1"))
    assert len(read_results(tmp_path / "one.jsonl")) == 1


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_and_lines_otherwise():
    terminal = _Terminal()
    progress = Progress(documents=2, items=4, stream=terminal)
    progress.item_done()
    progress.item_done(failed=True)
    progress.document_done()
    progress.note("batch: a message")
    progress.finish()
    out = terminal.getvalue()
    assert "batch:  50%|" in out and "2/4 [" in out and "1/2 documents, 1 failed]" in out  # tqdm's bar
    assert "batch: a message\n" in out

    plain = io.StringIO()
    progress = Progress(documents=2, items=4, stream=plain, interval_s=3600)
    for _ in range(4):
        progress.item_done()
    lines = plain.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batch:  25%|") and "1/4 [" in lines[0] and "\r" not in lines[0]


def test_questions_from_csv_json_lines_and_any_encoding(tmp_path):
    table = tmp_path / "q.csv"
    table.write_text('id,Question\n1,"Who signed, and when?"\n\n2,What is it?\n', encoding="utf-8")
    assert load_questions(table) == ["Who signed, and when?", "What is it?"]
    tabbed = tmp_path / "q.tsv"
    tabbed.write_text("question\tid\nWho signed?\t1\n", encoding="utf-8")
    assert load_questions(tabbed) == ["Who signed?"]
    lines = tmp_path / "q.jsonl"
    lines.write_text('{"id": 1, "question": "Who signed?"}\n\n{"question": "What is it?"}\n', encoding="utf-8")
    assert load_questions(lines) == ["Who signed?", "What is it?"]
    sniffed = tmp_path / "q.txt"  # JSON Lines whatever the file's name
    sniffed.write_text('{"question": "Who signed?"}\n', encoding="utf-8")
    assert load_questions(sniffed) == ["Who signed?"]
    listed = tmp_path / "q.json"
    listed.write_text(json.dumps(["A?", {"question": "B?"}]), encoding="utf-8")
    assert load_questions(listed) == ["A?", "B?"]
    for encoding in ("utf-16", "cp1252"):  # as Windows editors save them
        legacy = tmp_path / f"q-{encoding}.txt"
        legacy.write_bytes("Qui a signé le reçu ?\nWas kostet die Größe?\n".encode(encoding))
        assert load_questions(legacy) == ["Qui a signé le reçu ?", "Was kostet die Größe?"]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("q.json", b"[]", r"questions file .*q.json holds no questions$"),
    ("q.txt", b"\n  \n", r"questions file .*q.txt holds no questions$"),
    ("q.csv", b"id,question\n", r"q.csv holds no questions$"),
    ("q.csv", b"id,text\n1,Who?\n", r"q.csv needs a header row with a 'question' column \(its first row: id,text\)"),
    ("q.csv", b"id,question\n1,Who?\n2,\n", r"q.csv, line 3: the question is blank"),
    ("q.jsonl", b'{"question": "A?"}\n{"q": "B?"}\n', r"q.jsonl, line 2: a question is a string or an object"),
    ("q.jsonl", b'{"question": "A?"}\n{oops\n', r"q.jsonl, line 2: not valid JSON"),
    ("q.jsonl", b'{"question": "A?"}\n{"question": " "}\n', r"q.jsonl, line 2: the question is blank$"),
    ("q.txt", bytes(range(256)) * 4, r"q.txt is not a text file$"),
])
def test_question_files_that_hold_no_questions_say_so(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_questions(path)


def test_the_runs_own_outputs_in_its_input_folder_are_no_documents(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.txt", "sub/b.md", "results.jsonl", "results.jsonl.tmp", "sub/table.parquet", "other.jsonl"):
        (tmp_path / name).write_text("x")
    outputs = [tmp_path / "results.jsonl", tmp_path / "results.jsonl.tmp", tmp_path / "sub" / "table.parquet"]
    assert [d.id for d in collect_documents(str(tmp_path), ["Q?"], exclude=outputs)] == \
        ["a.txt", "other.jsonl", "sub/b.md"]
    assert [d.id for d in collect_documents(str(tmp_path / "*.jsonl"), ["Q?"], exclude=outputs)] == \
        [str(tmp_path / "other.jsonl")]


ROW = b'{"id": "a", "question": "q1", "answer": "yes", "error": null}\n'


@pytest.mark.parametrize(("content", "bad_line", "why"), [
    (b'{"id": "m", "path": "doc.txt", "questions": ["Who?"]}\n', 1, "no string 'question'"),  # a manifest
    (b'{"x": 1}\n{"y": 2}\n', 1, "no string 'id' or 'question'"),  # any other JSONL
    (ROW + b"garbage\n" + ROW.replace(b'"a"', b'"b"'), 2, "not JSON"),  # a hand-damaged results file
    (ROW + b'{"id": "x", "question": "q", "error": "boom"}\n', 2, "its 'error' is neither null nor an object"),
    (b"some notes without a newline", 1, "not JSON"),  # not a torn row: nothing of ours starts so
    (ROW + b"[1, 2]", 2, "not a JSON object"),
])
def test_a_file_holding_anything_but_results_is_refused_untouched(tmp_path, content, bad_line, why):
    path = tmp_path / "important.jsonl"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as refused:
        ResultLog(path)
    assert str(refused.value) == (f"{path} is not a batch results file: line {bad_line} is not a result row ({why}); "
                                  "it was left as it is: give -o another file, or fix that line")
    assert path.read_bytes() == content and sorted(tmp_path.iterdir()) == [path]
    with open(path, "rb") as file:  # and it let go of the lock it took
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_whole_last_row_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(ROW + ROW.replace(b'"a"', b'"b"').rstrip(b"\n"))
    with ResultLog(path) as log:
        assert set(log.done) == {("a", "q1"), ("b", "q1")} and log.torn_bytes == 0
        log.append(_record("c", "q1"))
    assert [r["id"] for r in read_results(path)] == ["a", "b", "c"]


def test_repeated_questions_are_asked_once_and_said_so(tmp_path, capsys):
    """A results row is one document and one question: a question listed twice is asked once, and the run says
    how many were merged instead of leaving the rows fewer than the lines without a word."""
    from glyphserve.cli import main

    (tmp_path / "docs").mkdir()
    for n in range(2):
        (tmp_path / "docs" / f"r{n}.txt").write_text(f"Report {n}: Ines Calloway kept the ledgers.", encoding="utf-8")
    questions = tmp_path / "q.txt"
    questions.write_text("Who kept the ledgers?\nWhat is it?\nWho kept the ledgers?\n  What is it?  \nWhen?\n",
                         encoding="utf-8")
    out = tmp_path / "r.jsonl"
    assert main(["batch", str(tmp_path / "docs"), "--questions", str(questions), "-o", str(out), "--workers", "0",
                 "--backend", "extractive"]) == 0
    assert (f"batch: questions file {questions} repeats 2 questions (the first: 'Who kept the ledgers?'): each is "
            "asked once per document, as a result row is one document and one question\n") in capsys.readouterr().err
    assert sorted((r["id"], r["question"]) for r in read_results(out)) == [
        (f"r{n}.txt", q) for n in range(2) for q in sorted(["Who kept the ledgers?", "What is it?", "When?"])]

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in [
        {"id": "a", "text": "Alpha.", "questions": ["When?"]},
        {"id": "b", "text": "Beta.", "questions": ["Why?", "Why?", "When?"]},  # one twice, one --questions adds
    ]) + "\n", encoding="utf-8")
    (tmp_path / "once.txt").write_text("When?\n", encoding="utf-8")
    assert main(["batch", str(manifest), "--questions", str(tmp_path / "once.txt"), "-o", str(tmp_path / "m.out"),
                 "--workers", "0", "--backend", "extractive"]) == 0
    err = capsys.readouterr().err
    assert (f"batch: manifest {manifest}: 3 questions a line asks twice (its 'questions' listing one twice, or one "
            "that --questions adds too; first on line 1) asked once for its document") in err
    assert sorted((r["id"], r["question"]) for r in read_results(tmp_path / "m.out")) == [
        ("a", "When?"), ("b", "When?"), ("b", "Why?")]
