"""Batch inputs (folder, glob, manifest, questions) and the resumable results file."""

from __future__ import annotations

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
