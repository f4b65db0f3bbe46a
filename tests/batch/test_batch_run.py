"""``glyphserve batch`` end to end with the tiny model on CPU: good and bad files, a run
killed half way and resumed, a JSONL manifest, out-of-memory back-off, a remote backend."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from glyphserve.batch import BatchOptions, BatchRunner, ResultLog, collect_documents, read_results
from glyphserve.errors import EngineOutOfMemoryError
from tests.batch.chat_server import ChatServer

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = ["What is this document about?", "Who is mentioned?"]
MAX_NEW_TOKENS = 6
BAD = {"corrupt.pdf": "corrupt_file", "empty.txt": "empty_document", "page.png": "unsupported_type"}

PARAGRAPH = (
    "The river port of Alderney handled {n} barges in the spring of the year, most of them carrying grain "
    "and timber downstream to the estuary. Harbour master Ines Calloway kept the ledgers herself."
)


def _write_pdf(path: Path, text: str) -> None:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    pdf = canvas.Canvas(str(path), pagesize=A4)
    y = 800
    for line in text.split(". "):
        pdf.drawString(40, y, line)
        y -= 16
    pdf.save()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch-docs")
    for i in range(6):
        text = "\n\n".join(PARAGRAPH.format(n=i * 10 + k) for k in range(3))
        (root / f"report{i}.txt").write_text(text, encoding="utf-8")
    (root / "notes.md").write_text("# Notes\n\n" + PARAGRAPH.format(n=7) + "\n\n- one\n- two\n", encoding="utf-8")
    _write_pdf(root / "letter.pdf", PARAGRAPH.format(n=99))
    (root / "corrupt.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage without xref\n")
    (root / "empty.txt").write_bytes(b"")
    Image.new("RGB", (40, 30), "white").save(root / "page.png")
    return root


@pytest.fixture(scope="module")
def questions_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("questions") / "questions.txt"
    path.write_text("\n".join(QUESTIONS) + "\n", encoding="utf-8")
    return path


def _batch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "glyphserve.cli", "batch", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _reference_answers(model_dir: Path, folder: Path) -> dict[tuple[str, str], str]:
    """Each good (document, question) answered alone, greedily, the way ``glyphserve ask`` does."""
    from glyphserve.batch.prefetch import RenderOptions, prepare_document
    from glyphserve.engine import AnswerRequest, Engine, EngineConfig, GenerationSettings

    engine = Engine.load(EngineConfig(model=str(model_dir), max_num_seqs=1))
    answers = {}
    for document in collect_documents(str(folder), QUESTIONS):
        if document.id in BAD:
            continue
        prepared = prepare_document(document, RenderOptions())
        assert prepared.error is None, prepared.error
        for question in QUESTIONS:
            settings = GenerationSettings(max_tokens=MAX_NEW_TOKENS)
            answer = engine.answer(AnswerRequest(prepared.pages, question, settings=settings))
            answers[(document.id, question)] = answer.text
    return answers


def test_killed_run_resumes_every_item_answered_once(tiny_model_dir, folder, questions_file, tmp_path):
    output = tmp_path / "results.jsonl"
    args = _batch_cmd(str(folder), "--questions", str(questions_file), "-o", str(output),
                      "--model", str(tiny_model_dir), "--batch-size", "2", "--max-new-tokens", str(MAX_NEW_TOKENS),
                      "--workers", "1")
    first = subprocess.Popen(args, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if output.exists() and output.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    written = read_results(output)
    total = len(list(folder.iterdir())) * len(QUESTIONS)
    assert 3 <= len(written) < total, "the run should have been killed half way"
    with open(output, "ab") as f:
        f.write(b'{"id": "report9.txt", "question": "Who')  # as if killed mid-write

    second = subprocess.run(args, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr
    assert "removed a torn last line" in second.stderr
    assert "batch: " in second.stderr  # plain progress lines when not on a terminal
    assert f"{len(written)} skipped" in second.stdout and "finished" in second.stdout

    records = read_results(output)
    keys = [(r["id"], r["question"]) for r in records]
    assert len(keys) == len(set(keys)) == total  # every item exactly once
    by_key = {(r["id"], r["question"]): r for r in records}
    for name, code in BAD.items():
        for question in QUESTIONS:
            record = by_key[(name, question)]
            assert record["answer"] is None and record["error"]["code"] == code
    good = {k: r for k, r in by_key.items() if k[0] not in BAD}
    for record in good.values():
        assert record["error"] is None and record["pages"] >= 1 and record["vision_tokens"] > 0
        assert record["new_tokens"] >= 1 and record["timings"]["render"] > 0 and record["timings"]["total"] > 0
    assert {k: r["answer"] for k, r in good.items()} == _reference_answers(tiny_model_dir, folder)

    # And the CLI one by one gives the same answer.
    doc_id, question = sorted(good)[0]
    ask = subprocess.run(
        [sys.executable, "-m", "glyphserve.cli", "ask", str(folder / doc_id), question, "--model", str(tiny_model_dir),
         "--max-new-tokens", str(MAX_NEW_TOKENS), "--json"],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert ask.returncode == 0, ask.stderr
    assert json.loads(ask.stdout.strip().splitlines()[-1])["text"] == good[(doc_id, question)]["answer"]

    third = subprocess.run([sys.executable, "-X", "importtime", *args[1:]], env=_env(), cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and f"{total} skipped" in third.stdout
    assert len(read_results(output)) == total
    # Nothing left to do: the engine (torch, transformers) is never imported, so a rerun returns at once.
    assert not [line for line in third.stderr.splitlines() if re.search(r"\|\s+torch$", line)]


@pytest.mark.parametrize("ray", [[], ["--ray"]])
def test_a_model_that_is_not_there_fails_before_any_work(folder, questions_file, tmp_path, ray):
    if ray:
        pytest.importorskip("ray")
    output = tmp_path / "results.jsonl"
    run = subprocess.run(_batch_cmd(str(folder), "--questions", str(questions_file), "-o", str(output),
                                    "--model", str(tmp_path / "no-model"), *ray),
                         env=_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: {tmp_path / 'no-model'}: no such folder, and not a Hugging Face id " \
                                 "(organisation/name)"  # as ask and serve say it (with --ray: before Ray starts)
    assert not output.exists()


def test_a_missing_input_is_reported_before_the_missing_model(questions_file, tmp_path):
    run = subprocess.run(_batch_cmd(str(tmp_path / "nowhere"), "--questions", str(questions_file), "-o",
                                    str(tmp_path / "results.jsonl")),
                         env=_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "input not found" in run.stderr and "model" not in run.stderr


class OutOfMemoryAbove:
    """The real engine, except that batches larger than ``limit`` raise the engine's OOM error."""

    def __init__(self, engine, limit: int):
        self.engine = engine
        self.limit = limit
        self.sizes: list[int] = []

    def answer_batch(self, requests):
        self.sizes.append(len(requests))
        if len(requests) > self.limit:
            raise EngineOutOfMemoryError(f"out of GPU memory with {len(requests)} requests")
        return self.engine.answer_batch(requests)


def test_manifest_input_and_out_of_memory_back_off(tiny_model_dir, folder, tmp_path):
    from glyphserve.engine import AnswerRequest, Engine, EngineConfig, GenerationSettings

    manifest = tmp_path / "manifest.jsonl"
    lines = [{"id": f"inline-{i}", "text": PARAGRAPH.format(n=i), "questions": [f"How many barges, case {i}?"]}
             for i in range(6)]
    lines.append({"id": "letter", "path": str(folder / "letter.pdf"), "questions": ["Who kept the ledgers?", "Where?"]})
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    documents = collect_documents(str(manifest))

    engine = Engine.load(EngineConfig(model=str(tiny_model_dir), max_num_seqs=8))
    flaky = OutOfMemoryAbove(engine, limit=2)
    options = BatchOptions(batch_size=8, max_new_tokens=MAX_NEW_TOKENS, workers=0)
    with ResultLog(tmp_path / "out.jsonl") as log:
        summary = BatchRunner(lambda: flaky, log, options).run(documents)
    assert summary.done == 8 and summary.failed == 0 and summary.batch_size == 2
    assert flaky.sizes[:3] == [8, 4, 2]  # halved and retried the same items; never failed the run
    assert max(flaky.sizes[3:]) <= 2

    records = {(r["id"], r["question"]): r for r in read_results(tmp_path / "out.jsonl")}
    assert len(records) == 8
    by_id = {d.id: d for d in documents}
    from glyphserve.batch.prefetch import RenderOptions, prepare_document

    for (doc_id, question), record in records.items():
        pages = prepare_document(by_id[doc_id], RenderOptions()).pages
        settings = GenerationSettings(max_tokens=MAX_NEW_TOKENS)
        alone = engine.answer(AnswerRequest(pages, question, settings=settings))
        assert record["answer"] == alone.text and record["error"] is None


def test_batch_through_the_openai_backend(folder, questions_file, tmp_path):
    server = ChatServer()
    try:
        output = tmp_path / "remote.jsonl"
        run = subprocess.run(
            _batch_cmd(str(folder), "--questions", str(questions_file), "-o", str(output),  # --endpoint: openai
                       "--endpoint", server.url + "/v1", "--batch-size", "4", "--workers", "1"),
            env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120,
        )
    finally:
        server.close()
    assert run.returncode == 0, run.stderr
    records = read_results(output)
    assert len(records) == len(list(folder.iterdir())) * len(QUESTIONS)
    for record in records:
        if record["id"] in BAD:
            assert record["error"]["code"] == BAD[record["id"]]
        else:
            assert record["answer"] == f"answer to: {record['question']}"
            assert record["thinking"] == f"{record['pages']} pages to read"
    # One request per good (document, question); nothing sent for the documents that failed to ingest.
    assert len(server.requests) == (len(list(folder.iterdir())) - len(BAD)) * len(QUESTIONS)


def test_documents_longer_than_the_context_read_the_pages_that_match(tiny_model_dir, tmp_path):
    from glyphserve.engine import Engine, EngineConfig
    from glyphserve.render import render_text, resolve_config

    filler = "\n\n".join(PARAGRAPH.format(n=n) for n in range(160))
    text = filler + "\n\nThe lock keeper's password is HERON-9.\n\n" + filler
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"id": "long", "text": text, "questions": ["What is the lock keeper's password?"]}))
    documents = collect_documents(str(manifest))
    start = text.index("HERON")
    [needle] = [p.number for p in render_text(text, resolve_config(text)).pages
                if p.char_span[0] <= start < p.char_span[1]]
    engine = Engine.load(EngineConfig(model=str(tiny_model_dir), max_context=1400))
    for mode in ("retrieve", "first"):
        out = tmp_path / f"{mode}.jsonl"
        with ResultLog(out) as log:
            BatchRunner(lambda: engine, log, BatchOptions(max_new_tokens=MAX_NEW_TOKENS, workers=0,
                                                         page_selection=mode)).run(documents)
        [record] = read_results(out)
        shown = record["pages_shown"]
        assert record["error"] is None and record["pages"] > len(shown) == record["pages_used"]
        assert record["prompt_tokens"] <= 1400 - MAX_NEW_TOKENS
        assert (needle in shown) == (mode == "retrieve")
    # --page-selection all: every page, which does not fit; the row's advice names batch's options.
    with ResultLog(tmp_path / "all.jsonl") as log:
        BatchRunner(lambda: engine, log, BatchOptions(max_new_tokens=MAX_NEW_TOKENS, workers=0,
                                                     page_selection="all")).run(documents)
    [record] = read_results(tmp_path / "all.jsonl")
    assert record["error"]["code"] == "context_length_exceeded", record["error"]
    assert re.search(r"plus --max-new-tokens 6 = \d+, but the context holds 1400: only the first \d+ of \d+ pages "
                     r"fit\. Keep the first \d+ \(--page-selection first\), or let the pages that match the question "
                     r"be chosen \(--page-selection retrieve\)$", record["error"]["message"]), \
        record["error"]["message"]


def test_parquet_holds_results_whose_timings_are_empty(tmp_path):
    """A document that fails before rendering has no timings: its row's struct is null (Parquet has no empty
    struct), also when no row of the file has any."""
    import pyarrow.parquet as pq

    from glyphserve.batch.results import write_parquet

    results = tmp_path / "out.jsonl"
    failed = {"id": "gone.txt", "question": "Q?", "answer": None, "timings": {},
              "error": {"code": "file_not_found", "message": "gone.txt: no such file"}}
    results.write_text(json.dumps(failed) + "\n", encoding="utf-8")
    assert write_parquet(results, tmp_path / "out.parquet") == 1
    row = pq.read_table(tmp_path / "out.parquet").to_pylist()[0]
    assert row["timings"] is None and row["error"] == failed["error"] and row["id"] == "gone.txt"


def test_a_parquet_path_that_cannot_be_written_is_refused_before_the_run(tmp_path, questions_file):
    """--parquet is written when the run ends: a path it cannot go to is refused first, with nothing written,
    not found out by a traceback once every question is answered."""
    (tmp_path / "a.txt").write_text(PARAGRAPH.format(n=1), encoding="utf-8")
    (tmp_path / "notes.txt").write_text("mine\n", encoding="utf-8")
    before = {path: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    out = tmp_path / "r.jsonl"
    cases = [
        (tmp_path, f"--parquet {tmp_path} is a folder: give the table a file (e.g. {tmp_path / 'results.parquet'})"),
        (tmp_path / "notes.txt", f"--parquet {tmp_path / 'notes.txt'} holds something other than a Parquet table"),
        (tmp_path / "a.txt" / "r.parquet", f"--parquet {tmp_path / 'a.txt' / 'r.parquet'}: cannot make its folder, a "
                                           "file stands in its path"),
    ]
    for parquet, message in cases:
        run = subprocess.run(_batch_cmd(str(tmp_path / "a.txt"), "--questions", str(questions_file), "-o", str(out),
                                        "--backend", "extractive", "--parquet", str(parquet)),
                             env=_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and run.stderr.startswith(f"error: {message}") and run.stdout == "", run.stderr
        assert len(run.stderr.splitlines()) == 1 and not out.exists()
    assert {path: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before


def test_a_table_that_fails_to_write_at_the_end_says_where_the_results_are(tmp_path, questions_file, capsys,
                                                                            monkeypatch):
    import pyarrow.parquet as pq

    from glyphserve.cli import main

    (tmp_path / "a.txt").write_text(PARAGRAPH.format(n=1), encoding="utf-8")
    out, table = tmp_path / "r.jsonl", tmp_path / "r.parquet"
    args = ["batch", str(tmp_path / "a.txt"), "--questions", str(questions_file), "-o", str(out), "--workers", "0",
            "--backend", "extractive", "--parquet", str(table)]
    assert main(args) == 0 and pq.read_table(table).num_rows == 2
    earlier = table.read_bytes()
    capsys.readouterr()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    assert main(args) == 2  # (every question done: the run only writes the table)
    captured = capsys.readouterr()
    assert "0 answered, 0 failed, 2 skipped" in captured.out and captured.err == (f"error: cannot write the table {table}: No space left on device; the results are in "
                            f"{out}: rerun the same command with --parquet naming another file to write the table (a "
                            "finished run only writes it)\n")
    assert table.read_bytes() == earlier and not (tmp_path / "r.parquet.tmp").exists()  # the earlier table, whole


def test_outputs_that_would_overwrite_what_the_run_reads_are_refused(tmp_path, questions_file):
    """-o naming an input, or a file of anything but results, is refused with nothing written (a user lost a
    manifest so: the results replaced it)."""
    (tmp_path / "a.txt").write_text(PARAGRAPH.format(n=1), encoding="utf-8")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"id": "a", "path": "a.txt", "questions": ["Who?"]}) + "\n", encoding="utf-8")
    important = tmp_path / "important.jsonl"
    important.write_text('{"customer": 1}\n{"customer": 2}\n', encoding="utf-8")
    before = {path: path.read_bytes() for path in tmp_path.iterdir()}
    endpoint = ["--endpoint", "http://127.0.0.1:9/v1"]  # never reached: every run is refused before
    cases = [
        ([str(manifest), "-o", str(manifest)], f"-o {manifest} is the input manifest, which this run reads"),
        ([str(manifest), "-o", str(tmp_path / "a.txt")], f"-o {tmp_path / 'a.txt'} is the document 'a', which"),
        ([str(tmp_path / "a.txt"), "--questions", str(questions_file), "-o", str(questions_file)],
         f"-o {questions_file} is the questions file"),
        ([str(manifest), "-o", str(tmp_path / "r.jsonl"), "--parquet", str(tmp_path / "r.jsonl")],
         f"--parquet {tmp_path / 'r.jsonl'} is the results file"),
        ([str(manifest), "-o", str(important)], f"{important} is not a batch results file: line 1 is not a result row"),
    ]
    for args, message in cases:
        run = subprocess.run(_batch_cmd(*args, *endpoint), env=_env(), cwd=REPO, capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 2 and run.stderr.startswith(f"error: {message}"), run.stderr
        assert len(run.stderr.splitlines()) == 1
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == before
    assert questions_file.read_text(encoding="utf-8") == "\n".join(QUESTIONS) + "\n"


def test_an_output_naming_a_document_of_the_input_folder_is_refused_as_one(tmp_path, questions_file):
    """-o (or --parquet) naming a file of the input folder that holds no batch results (no table) is one of the
    documents, and refused as such: with the folder's only file it read 'no documents found', with another file
    beside it 'not a batch results file', and --parquet wrote its table over the document."""
    docs = tmp_path / "docs"
    docs.mkdir()
    endpoint = ["--endpoint", "http://127.0.0.1:9/v1"]  # never reached: every run is refused before
    for files in (["a.txt"], ["a.txt", "b.txt"]):
        for name in files:
            (docs / name).write_text(name, encoding="utf-8")
        last = files[-1]
        cases = [(["-o", str(docs / "a.txt")], f"-o {docs / 'a.txt'} is the document 'a.txt'"),
                 (["-o", str(tmp_path / "r.jsonl"), "--parquet", str(docs / last)],
                  f"--parquet {docs / last} is the document '{last}'")]
        for args, message in cases:
            run = subprocess.run(_batch_cmd(str(docs), "--questions", str(questions_file), *args, *endpoint),
                                 env=_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
            assert run.returncode == 2, run.stderr
            assert run.stderr == f"error: {message}, which this run reads: give the results a file of their own\n"
        assert {p.name: p.read_text() for p in docs.iterdir()} == {name: name for name in files}  # untouched
        assert not (tmp_path / "r.jsonl").exists()
    # The folder's only file an earlier run's results: no documents, and the message says which file was left out.
    (docs / "b.txt").unlink()
    (docs / "a.txt").write_text(json.dumps({"id": "x.txt", "question": "Q?", "error": None}) + "\n")
    run = subprocess.run(_batch_cmd(str(docs), "--questions", str(questions_file), "-o", str(docs / "a.txt"),
                                    *endpoint), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr == f"error: no documents found in {docs} (besides this run's own output {docs / 'a.txt'})\n"


def test_a_rerun_does_not_take_its_own_outputs_in_the_input_folder_for_documents(tmp_path, questions_file):
    pytest.importorskip("pyarrow")
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(2):
        (docs / f"report{i}.txt").write_text(PARAGRAPH.format(n=i), encoding="utf-8")
    args = _batch_cmd(str(docs), "--questions", str(questions_file), "-o", str(docs / "results.jsonl"),
                      "--parquet", str(docs / "results.parquet"), "--workers", "0")
    server = ChatServer()
    try:
        runs = [subprocess.run([*args, "--endpoint", server.url + "/v1"], env=_env(), cwd=REPO, capture_output=True,
                               text=True, timeout=60) for _ in range(2)]
    finally:
        server.close()
    assert [run.returncode for run in runs] == [0, 0], runs[1].stderr
    assert "0 answered, 0 failed, 4 skipped" in runs[1].stdout and "0/0 documents" in runs[1].stdout
    assert sorted({r["id"] for r in read_results(docs / "results.jsonl")}) == ["report0.txt", "report1.txt"]
    assert len(server.requests) == 4


def test_sigterm_stops_the_run_as_ctrl_c_does(tmp_path, questions_file):
    """timeout, systemd and Kubernetes stop a job with SIGTERM: the run stops cleanly (summary, no traceback or
    leaked semaphores from the render workers), exits 143, and a rerun does the rest."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(8):
        (docs / f"report{i}.txt").write_text(PARAGRAPH.format(n=i), encoding="utf-8")
    output = tmp_path / "results.jsonl"
    server = ChatServer(delay_s=0.1)
    try:
        args = _batch_cmd(str(docs), "--questions", str(questions_file), "-o", str(output), "--workers", "1",
                          "--batch-size", "1", "--endpoint", server.url + "/v1")
        first = subprocess.Popen(args, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (output.exists() and output.read_bytes().count(b"\n") >= 1):
            time.sleep(0.02)
        os.killpg(first.pid, signal.SIGTERM)  # the whole group, as timeout and systemd do: the workers too
        out, err = first.communicate(timeout=30)
        assert first.returncode == 143, err
        assert out.startswith("batch interrupted") and "Traceback" not in err and "leaked" not in err, err
        done = len(read_results(output))
        assert 1 <= done < 16
        second = subprocess.run(args, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        server.close()
    assert second.returncode == 0 and f"{done} skipped" in second.stdout, second.stderr
    assert len(read_results(output)) == 16


def test_a_scanned_pdf_goes_to_the_engine_as_the_page_files_its_scans_were_made_into_as_read(
        tiny_model_dir, tmp_path, scanned_pdf, documents_rendered):
    """Each scan is kept as its page file as it is read (not all its pixels until rendered) and goes to the engine
    as that file: the bytes of the page rendered from all the pixels, in a worker process and in Ray's task alike,
    and the run's answers are the ones those pages get."""
    import pickle

    import numpy as np

    from glyphserve.batch.inputs import BatchDocument
    from glyphserve.batch.prefetch import RenderOptions, prepare_document
    from glyphserve.batch.ray_data import _document_row, _prepare_row
    from glyphserve.engine import AnswerRequest, EncodedPage, Engine, EngineConfig, GenerationSettings
    from glyphserve.ingest import ingest_bytes
    from glyphserve.render import FittedScan, render_document, resolve_config

    src = tmp_path / "scans.pdf"
    src.write_bytes(scanned_pdf)
    document = BatchDocument("scans", ("What does it say?", "Which colour is the box?"), path=src)
    render = RenderOptions(preset="glyph-zh", dpi=96)
    prepared = prepare_document(document, render)
    assert prepared.error is None, prepared.error
    (kept,) = documents_rendered
    assert [type(part) for part in kept.parts] == [FittedScan] * 3 and all(p.image is None for p in kept.parts)
    every_pixel = ingest_bytes(scanned_pdf, "scans.pdf")  # what reading it gave before: each scan's pixels
    expected = render_document(every_pixel, resolve_config(every_pixel.text, preset="glyph-zh", dpi=96)).pages
    assert all(isinstance(page, EncodedPage) for page in prepared.pages)
    assert [page.data for page in prepared.pages] == [page.png() for page in expected]
    assert all(np.array_equal(page.pixels(), old.image) for page, old in zip(prepared.pages, expected))
    ray_task = pickle.loads(_prepare_row(_document_row(document), render)["prepared"])
    assert [page.data for page in ray_task.pages] == [page.png() for page in expected]

    engine = Engine.load(EngineConfig(model=str(tiny_model_dir), max_num_seqs=2))
    options = BatchOptions(batch_size=2, max_new_tokens=MAX_NEW_TOKENS, workers=1, render=render)
    with ResultLog(tmp_path / "out.jsonl") as log:
        summary = BatchRunner(lambda: engine, log, options).run([document])
    assert summary.done == 2 and summary.failed == 0
    for record in read_results(tmp_path / "out.jsonl"):
        settings = GenerationSettings(max_tokens=MAX_NEW_TOKENS)
        alone = engine.answer(AnswerRequest([page.image for page in expected], record["question"], settings=settings))
        assert record["answer"] == alone.text and record["pages"] == 3
