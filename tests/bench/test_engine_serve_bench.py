"""CPU smoke runs of ``glyphserve bench engine`` and ``glyphserve bench serve`` on the tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glyphserve.cli import main


def test_engine_bench_measures_every_row_and_a_baseline_tree(tiny_model_dir, tmp_path):
    repo = Path(__file__).resolve().parents[2]
    code = main(["bench", "engine", "--model", str(tiny_model_dir), "--device", "cpu", "--workload", "1000",
                 "--grow", "2000", "--new-tokens", "3", "--repeats", "1", "--rows", "1,2", "--max-context", "2048",
                 "--quantize", "fp8", "--baseline-tree", str(repo), "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "engine-cpu.json").read_text())
    assert result["cold"]["vision_misses"] > 0 and result["cold"]["prefix_reused_tokens"] == 0
    assert result["cold_cropped"]["vision_misses"] > 0
    assert result["follow"]["prefix_reused_tokens"] > 0 and result["warm"]["prefix_reused_tokens"] > 0
    assert [r["rows"] for r in result["rows"]] == [1, 2] and all(r["step_ms"] > 0 for r in result["rows"])
    assert [r["rows"] for r in result["rows_sampled"]] == [1, 2]  # the same rows, every one sampled
    assert result["baseline"]["rows_sampled"][0]["step_ms"] > 0
    assert result["pool_blocks"]["16"] < 16 * result["pool_blocks"]["1"]  # the document's prefix held once
    assert result["baseline"]["cold"]["wall_s"] > 0  # measured again by the child process
    assert result["quantized"]["cold"]["vision_misses"] > 0 and result["quantized"]["grow_cold"]["wall_s"] > 0
    assert [r["rows"] for r in result["quantized"]["rows"]] == [1, 2]
    assert all(r["step_ms"] > 0 for r in result["quantized"]["rows"])
    markdown = (tmp_path / "engine-cpu.md").read_text()
    assert "| W200 cold |" in markdown and "## Targets" in markdown
    assert "With fp8 weights: W50 cold" in markdown and "; W200 cold" in markdown
    assert "Decode step by rows with fp8 weights: 1: " in markdown
    assert "Decode step by rows, every row sampled (temperature 0.8, top_p 0.95, seed 1): 1: " in markdown
    assert "(baseline " in markdown.split("every row sampled")[1].split("\n")[0]


def test_cropped_documents_end_on_pages_of_heights_of_their_own():
    from glyphserve.bench.engine import render_documents

    full = render_documents(30_000, range(3), None)
    cropped = render_documents(30_000, range(3), None, shorten=250)
    assert {p.shape[0] for doc in full for p in doc} == {842}  # full pages (widths cropped to the text's)
    assert len({doc[-1].shape[0] for doc in cropped}) == 3 and all(doc[-1].shape[0] < 842 for doc in cropped)


def test_serve_bench_counts_every_answer(tiny_model_dir, tmp_path):
    code = main(["bench", "serve", "--model", str(tiny_model_dir), "--device", "cpu", "--workload", "1000",
                 "--documents", "2", "--sessions", "3", "--questions", "2", "--new-tokens", "3", "--max-num-seqs", "2",
                 "--startup-timeout", "120", "--step-trace", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "serve-cpu.json").read_text())
    assert result["sequential"]["answers"] == result["concurrent"]["answers"] == 6
    assert result["concurrent"]["p95_s"] >= result["concurrent"]["p50_s"] > 0
    markdown = (tmp_path / "serve-cpu.md").read_text()
    assert "answers/min" in markdown
    steps = result["engines"][0]["step_kinds"]  # the concurrent round's steps (serve --step-trace)
    kinds = steps["kinds"].values()
    assert sum(k["decode_rows"] for k in kinds) == 6 * 2  # every answer token after its first
    assert sum(k["chunk_tokens"] for k in kinds) > 0 and 0 <= steps["outside_s"] <= steps["span_s"]
    assert "The engine's steps in that round (`--step-trace`" in markdown and "| eager prompt passes |" in markdown
    launched = sum(k["steps"] for kind, k in steps["kinds"].items() if kind != "none")
    assert launched == result["engines"][0]["steps"]  # the round's steps (the counters' window), not the run's


def test_scale_run_compares_one_engine_with_ray_serve_replicas(tiny_model_dir, tmp_path):
    pytest.importorskip("ray")
    code = main(["bench", "serve", "--model", str(tiny_model_dir), "--device", "cpu", "--workload", "1000",
                 "--documents", "2", "--sessions", "4", "--questions", "1", "--new-tokens", "3", "--max-batch", "2",
                 "--no-sequential", "--repeats", "3", "--scale-replicas", "2", "--startup-timeout", "300",
                 "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "serve-cpu-ray2-scale.json").read_text())
    assert result["one_engine"]["concurrent"]["answers"] == result["ray"]["concurrent"]["answers"] == 4
    rates = result["ray"]["concurrent_rounds_answers_per_min"]
    assert len(rates) == 3 and result["ray"]["concurrent"]["answers_per_min"] == sorted(rates)[1]  # the median
    assert result["one_engine"]["sequential"] is None and result["one_engine"]["replicas"] is None
    replicas = result["ray"]["replicas"]  # those that answered: each document's questions on one of them
    placed = [d for r in replicas for d in r["recent_documents"]]
    assert len(placed) == len(set(placed)) == 2 and sum(r["requests"] for r in replicas) >= 3 * 4 + 2
    assert result["scaling"] > 0
    engines = result["ray"]["engines"]  # each replica's engine counters over the concurrent phase
    assert sum(e["requests"] for e in engines) == 4
    assert all(e["decode_steps"] > 0 and 1 <= e["rows_per_step"] <= 2 for e in engines if e["requests"])
    markdown = (tmp_path / "serve-cpu-ray2-scale.md").read_text()
    assert "Scaling:" in markdown and "2 Ray Serve replicas, 4 sessions at once" in markdown
    assert "3 rounds of the concurrent phase" in markdown
