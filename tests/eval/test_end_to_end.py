"""`glyphserve eval` end to end: real rendering, real backends, real report files."""

from __future__ import annotations

import json
import re

from PIL import Image

from glyphserve.cli import main
from glyphserve.eval import LocalBackend, RenderSetting, evaluate, generate, summarize


def test_extractive_niah_4k_through_the_cli(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--suite", "niah", "--lengths", "4k", "--samples", "3", "-o", str(out)]) == 0

    data = json.loads((out / "results.json").read_text())
    (row,) = data["summary"]
    assert (row["suite"], row["length"], row["samples"], row["setting"]) == ("niah", 4096, 3, "glyph-en 72dpi")
    assert row["accuracy"] == 1.0  # BM25 finds the needle sentence: the key is in the question
    assert 0.95 * 4096 < row["text_tokens"] < 1.05 * 4096
    # vision tokens come from the render manifest; Glyph's 72 dpi pages compress English ~2.5-3.5x
    assert row["vision_tokens"] > 0 and 2.0 < row["compression"] < 4.0
    assert data["meta"]["backend"] == "extractive"
    for sample in data["samples"]:
        assert sample["answers"][0] in sample["prediction"]
        assert sample["token_source"].startswith("estimate")

    report = (out / "report.md").read_text()
    assert "| niah | glyph-en 72dpi | 4k | 3 | 100.0% |" in report
    assert report in capsys.readouterr().out
    with Image.open(out / "accuracy.png") as chart:
        assert chart.format == "PNG" and chart.width > 600


def test_dpi_list_gives_one_row_per_setting(tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--suite", "mdqa", "--lengths", "4k", "--samples", "2", "--dpi", "72,96", "-o", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["summary"]
    assert [r["setting"] for r in rows] == ["glyph-en 72dpi", "glyph-en 96dpi"]
    # the same text at 96 dpi costs more vision tokens, so it compresses less
    assert rows[1]["vision_tokens"] > rows[0]["vision_tokens"]
    assert rows[0]["text_tokens"] == rows[1]["text_tokens"]


def test_user_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["eval", "--suite", "longbench", "-o", str(tmp_path)]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert main(["eval", "--suite", "nope", "-o", str(tmp_path)]) == 2
    assert "unknown nope" in capsys.readouterr().err
    assert main(["eval", "--lengths", "4q", "-o", str(tmp_path)]) == 2
    assert "--lengths" in capsys.readouterr().err
    assert main(["eval", "--backend", "local", "-o", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err


def test_an_output_that_is_a_file_is_refused_before_the_run(tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    assert main(["eval", "--lengths", "4k", "--samples", "1", "-o", str(existing)]) == 2
    assert capsys.readouterr().err == f"error: -o {existing} is a file: give a folder for the results\n"
    assert main(["eval", "--lengths", "4k", "--samples", "1", "-o", str(existing / "sub")]) == 2
    assert capsys.readouterr().err.startswith(f"error: -o {existing / 'sub'}: {existing} is a file")
    assert existing.read_text() == "keep me"


def test_local_backend_reads_the_rendered_pages(tiny_model_dir):
    backend = LocalBackend(model=str(tiny_model_dir), max_new_tokens=4)
    results = evaluate(generate("niah", [1024], 1, seed=0), backend, RenderSetting("glyph-en", 72))
    (result,) = results
    assert result.token_source.startswith("tokenizer")  # the model's own tokenizer counts the text
    assert result.vision_tokens > 0 and result.pages >= 1
    assert isinstance(result.prediction, str) and 0.0 <= result.score <= 1.0
    (row,) = summarize(results)
    assert row.samples == 1 and row.latency_s > 0


def test_documents_beyond_the_context_score_zero_and_are_reported(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--suite", "niah", "--lengths", "4k", "--samples", "1", "--model", str(tiny_model_dir),
            "--max-context", "600", "--max-new-tokens", "4", "-o", str(out)]
    assert main(args) == 0
    data = json.loads((out / "results.json").read_text())
    (sample,) = data["samples"]
    assert sample["score"] == 0.0 and "context" in sample["error"]
    assert data["summary"][0]["errors"] == 1
    assert "did not fit the backend's context" in (out / "report.md").read_text()
    assert {k: data["meta"][k] for k in ("model", "device", "max_new_tokens")} == {
        "model": str(tiny_model_dir), "device": "cpu", "max_new_tokens": 4}  # what answered, in the report


def test_errors_name_evals_flags_not_the_apis_fields(tiny_model_dir, tmp_path, capsys):
    """The engine's advice names request fields (max_tokens, truncate_pages, page_selection, max_context); what eval
    records and prints names the flags that do it, as ask and batch do."""
    out = tmp_path / "eval"
    model = ["eval", "--suite", "niah", "--lengths", "4k", "--samples", "1", "--model", str(tiny_model_dir),
             "--device", "cpu", "-o", str(out)]
    assert main([*model, "--max-model-len", "1000", "--max-new-tokens", "16"]) == 0
    (sample,) = json.loads((out / "results.json").read_text())["samples"]
    assert re.fullmatch(r"the prompt needs \d+ tokens \(\d+ pages\) plus --max-new-tokens 16 = \d+, but the context "
                        r"holds 1000: only the first (\d+) of \d+ pages fit\. Keep the first \1 \(--page-selection "
                        r"first\), or let the pages that match the question be chosen \(--page-selection retrieve\)",
                        sample["error"]), sample["error"]
    capsys.readouterr()
    assert main([*model, "--max-model-len", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --max-model-len must be at least 1")


def test_eval_takes_the_engine_flags_ask_batch_and_serve_take(tiny_model_dir, tmp_path, capsys):
    """--quantize and --max-model-len (--max-context's other name, as in ask, batch and serve) reach the engine."""
    out = tmp_path / "eval"
    args = ["eval", "--suite", "niah", "--lengths", "4k", "--samples", "1", "--model", str(tiny_model_dir),
            "--device", "cpu", "--dtype", "float32", "--quantize", "fp8", "--max-model-len", "600",
            "--max-new-tokens", "4", "-o", str(out)]
    assert main(args) == 0
    data = json.loads((out / "results.json").read_text())
    assert {k: data["meta"][k] for k in ("dtype", "quantize")} == {"dtype": "float32", "quantize": "fp8"}
    (sample,) = data["samples"]
    assert sample["score"] == 0.0 and "context holds 600" in sample["error"]
    capsys.readouterr()
    assert main(["eval", "--lengths", "4k", "--samples", "1", "--quantize", "fp8", "-o", str(out)]) == 2
    assert capsys.readouterr().err == ("error: --quantize needs --model or --random-weights (it quantizes the "
                                       "model's weights)\n")  # nothing to quantize under the extractive backend


def test_page_selection_beyond_the_context_shows_the_evidence(tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--suite", "niah,mdqa", "--lengths", "3x", "--samples", "4", "--max-context", "4096",
                 "--max-new-tokens", "64", "--page-selection", "first,retrieve,all", "-o", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    rows = {(r["suite"], r["setting"].split()[-1]): r for r in data["summary"]}
    assert set(rows) == {(s, m) for s in ("niah", "mdqa") for m in ("first", "retrieve", "all")}
    for suite in ("niah", "mdqa"):  # every page of 3x the context: refused, as a model with that context would
        assert rows[suite, "all"]["errors"] == rows[suite, "all"]["samples"] and rows[suite, "all"]["accuracy"] == 0
    data["samples"] = [s for s in data["samples"] if not s["setting"].endswith(" all")]
    for suite in ("niah", "mdqa"):
        # The first pages lose the evidence past the cut; retrieval shows it every time.
        assert rows[suite, "retrieve"]["evidence_shown"] == 1.0 > rows[suite, "first"]["evidence_shown"]
        assert 2.5 * 4096 < rows[suite, "retrieve"]["vision_tokens"] < 3.5 * 4096  # the pages need about 3x the context
    for sample in data["samples"]:
        assert sample["prompt_tokens"] <= 4096 - 64 and sample["pages_shown"] < sample["pages"]
    assert "3x of the 4,096-token context" in data["meta"]["notes"][0]
    assert "| evidence shown |" in (out / "report.md").read_text()


def test_local_backend_reads_a_selection_within_its_context(tiny_model_dir):
    backend = LocalBackend(model=str(tiny_model_dir), max_new_tokens=4, max_context=2048)
    samples = [s for s in generate("mdqa", [12_000], 2, seed=1)]
    results = evaluate(samples, backend, RenderSetting("glyph-en", 72), page_selection=["retrieve"])
    for result in results:
        # the tiny model answers nonsense; the page budget is what is checked: the engine took the prompt
        assert result.error is None and result.evidence_shown and result.prompt_tokens <= 2048 - 4
        assert 1 <= result.pages_shown < result.pages
