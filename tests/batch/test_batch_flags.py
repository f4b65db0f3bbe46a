"""``glyphserve batch``'s model, engine and sampling flags, shared with ask, serve and eval, each reaching what it
claims to set (the tiny model on CPU, a loopback OpenAI server), and its extractive answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glyphserve.batch import read_results
from glyphserve.cli import build_parser, main
from tests.batch.chat_server import ChatServer

PARAGRAPH = ("The river port of Alderney handled {n} barges in the spring of the year, most of them carrying grain "
             "and timber downstream to the estuary. Harbour master Ines Calloway kept the ledgers herself.")
NEEDLE = "The lock keeper's password is HERON-9."
QUESTION = "What is the lock keeper's password?"
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def long_manifest(tmp_path_factory) -> Path:
    """One document of many pages, the needle in its middle."""
    filler = "\n\n".join(PARAGRAPH.format(n=n) for n in range(160))
    path = tmp_path_factory.mktemp("long") / "manifest.jsonl"
    path.write_text(json.dumps({"id": "long", "text": f"{filler}\n\n{NEEDLE}\n\n{filler}", "questions": [QUESTION]}))
    return path


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory) -> Path:
    """A folder of two short reports; their questions beside it, in questions.txt."""
    folder = tmp_path_factory.mktemp("short") / "docs"
    folder.mkdir()
    for n in range(2):
        (folder / f"report{n}.txt").write_text(PARAGRAPH.format(n=n), encoding="utf-8")
    (folder.parent / "questions.txt").write_text("Who kept the ledgers?\nWhat did the barges carry?\n")
    return folder


def _batch(tmp_path: Path, source: Path, name: str, *flags: str) -> list[dict]:
    out = tmp_path / f"{name}.jsonl"
    questions = ["--questions", str(source.parent / "questions.txt")] if source.is_dir() else []
    assert main(["batch", str(source), *questions, "-o", str(out), "--workers", "0", *flags]) == 0
    return sorted(read_results(out), key=lambda r: (r["id"], r["question"]))


def _untimed(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "timings"} for row in rows]


def test_max_model_len_and_its_alias_bound_the_local_engines_context(tiny_model_dir, long_manifest, tmp_path):
    model = ["--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", str(MAX_NEW_TOKENS)]
    rows = {flag: _batch(tmp_path, long_manifest, flag.strip("-"), *model, flag, "1400", "--page-selection", "first")
            for flag in ("--max-model-len", "--max-context")}
    assert _untimed(rows["--max-model-len"]) == _untimed(rows["--max-context"])  # one flag by two names
    [row] = rows["--max-model-len"]
    assert row["error"] is None and 1 <= len(row["pages_shown"]) < row["pages"]
    assert row["prompt_tokens"] <= 1400 - MAX_NEW_TOKENS
    [whole] = _batch(tmp_path, long_manifest, "all", *model, "--max-model-len", "1400", "--page-selection", "all")
    assert whole["error"]["code"] == "context_length_exceeded" and "holds 1400" in whole["error"]["message"]


def test_max_model_len_bounds_the_pages_sent_to_a_server_and_the_key_has_serves_name(long_manifest, tmp_path):
    server = ChatServer(api_key="sekrit")  # reports no context: every page goes, unless --max-model-len says
    try:
        remote = ["--endpoint", server.url + "/v1", "--max-new-tokens", str(MAX_NEW_TOKENS)]
        [everything] = _batch(tmp_path, long_manifest, "every", *remote, "--api-key", "sekrit")
        [bounded] = _batch(tmp_path, long_manifest, "bounded", *remote, "--remote-api-key", "sekrit",
                           "--max-model-len", "4000")
    finally:
        server.close()
    assert everything["thinking"] == f"{everything['pages']} pages to read"
    assert bounded["error"] is None and len(bounded["pages_shown"]) < bounded["pages"]
    assert bounded["thinking"] == f"{len(bounded['pages_shown'])} pages to read"  # what the server was sent


def test_temperature_and_seed_reach_the_answers(tiny_model_dir, short_docs, tmp_path):
    model = ["--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", str(MAX_NEW_TOKENS)]
    greedy = _batch(tmp_path, short_docs, "greedy", *model)
    seeded = [_batch(tmp_path, short_docs, f"seed{n}", *model, "--temperature", "1.5", "--seed", seed)
              for n, seed in enumerate(("7", "7", "8"))]

    def answers(rows):
        return [r["answer"] for r in rows]

    assert all(r["error"] is None for rows in [greedy, *seeded] for r in rows)
    assert answers(seeded[0]) == answers(seeded[1])  # the same seed, the same answers
    assert answers(seeded[0]) != answers(seeded[2])  # another seed, others (random weights: near-uniform tokens)
    assert answers(seeded[0]) != answers(greedy)


def test_quantize_and_the_context_reach_the_engine_config(tiny_model_dir, tmp_path):
    from glyphserve.batch.commands import engine_loader

    parser, _ = build_parser(("glyphserve.batch.commands",))
    args = parser.parse_args(["batch", "docs", "-o", "r.jsonl", "--model", str(tiny_model_dir), "--device", "cpu",
                              "--quantize", "fp8", "--max-context", "1000"])
    args.backend = "local"
    engine = engine_loader(args, max_num_seqs=2)()
    try:
        assert engine.stats()["quantize"] == "fp8" and engine.max_context == 1000
    finally:
        engine.close()


def test_without_a_model_batch_says_why_it_does_not_answer_extractively(short_docs, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    questions = ["--questions", str(short_docs.parent / "questions.txt")]
    assert main(["batch", str(short_docs), *questions, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: choose who answers: --model PATH_OR_ID, --random-weights glm-4.1v-9b or "
                          "--endpoint URL") and "--backend extractive" in err and "a rerun skips" in err
    assert not out.exists()
    for flags, message in ((["--backend", "extractive", "--random-weights", "glm-4.1v-9b"], "takes no --model"),
                           (["--quantize", "fp8", "--backend", "extractive"], "--quantize needs --model"),
                           (["--temperature", "3", "--backend", "extractive"], "--temperature must be between 0 and 2"),
                           (["--backend", "extractive", "--ray"], "does not go with --backend extractive")):
        assert main(["batch", str(short_docs), *questions, "-o", str(out), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_backend_extractive_cites_the_passages_pages(short_docs, long_manifest, tmp_path, capsys):
    rows = _batch(tmp_path, short_docs, "extractive", "--backend", "extractive")
    summary = capsys.readouterr().out
    # No engine ran: the summary counts no engine tokens (the rows' are the passages' estimates).
    assert "no model ran: the answers are passages of the documents' text (extractive)" in summary
    assert "engine:" not in summary and "generated" not in summary
    assert [(r["id"], r["error"]) for r in rows] == [(f"report{n}.txt", None) for n in (0, 0, 1, 1)]
    ledgers = next(r for r in rows if r["id"] == "report1.txt" and "ledgers" in r["question"])
    assert ledgers["answer"].startswith("[page 1] ") and "Ines Calloway kept the ledgers" in ledgers["answer"]
    assert ledgers["pages_shown"] == [1] and ledgers["pages_used"] == 1 and ledgers["vision_tokens"] > 0
    [long] = _batch(tmp_path, long_manifest, "long", "--backend", "extractive")
    page = int(long["answer"].split("]")[0].removeprefix("[page "))
    assert NEEDLE in long["answer"] and page in long["pages_shown"] and 1 < page < long["pages"]


def test_a_scan_without_text_is_an_extractive_rows_error(scanned_pdf, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "scan.pdf").write_bytes(scanned_pdf)
    (tmp_path / "questions.txt").write_text("Who signed it?\n", encoding="utf-8")
    out = tmp_path / "r.jsonl"
    assert main(["batch", str(folder), "--questions", str(tmp_path / "questions.txt"), "-o", str(out),
                 "--workers", "0", "--backend", "extractive"]) == 0
    [row] = read_results(out)
    assert row["answer"] is None and row["error"]["code"] == "invalid_config"
    assert row["error"]["message"].startswith("the document has no text layer (scanned pages)")
