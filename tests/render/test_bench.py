"""The render benchmark's workloads and report (smoke-sized)."""

from __future__ import annotations

import json

import pytest

from glyphserve.bench.workloads import WORKLOADS, make_workload_text


def test_workloads_are_deterministic_and_exact():
    assert WORKLOADS == {"W50": 50_000, "W150": 150_000, "W200": 200_000}
    for lang in ("en", "zh"):
        text = make_workload_text(12_345, seed=7, lang=lang)
        assert len(text) == 12_345 and text == make_workload_text(12_345, seed=7, lang=lang)
        assert text != make_workload_text(12_345, seed=8, lang=lang)
        assert "\n" in text
    with pytest.raises(ValueError):
        make_workload_text(10, lang="fr")


@pytest.mark.usefixtures("reference_available")
def test_bench_render_writes_json_markdown_and_targets(tmp_path):
    from argparse import Namespace

    from glyphserve.bench.render import run

    (tmp_path / "targets.json").write_text(json.dumps({"engine_x": {"measured": 1}}))
    assert run(Namespace(sizes="4000", runs=1, workers=1, long="3000,6000", out=str(tmp_path), seed=0,
                         no_cli=False, fidelity_chars=2400)) == 0
    result = json.loads((tmp_path / "render-benchmark.json").read_text())
    row = result["results"][0]
    assert row["characters"] == 4000 and row["identical_line_breaks"]
    for mode in ("in_memory", "png_files", "cli"):
        assert row[mode]["speedup"] > 0 and len(row[mode]["runs"]["reference"]) == 1
    assert row["in_memory"]["speedup"] > 1
    assert result["machine"]["cores"] >= 1 and "reportlab" in result["versions"]
    fidelity = result["fidelity"]
    assert {(r["language"], r["newline"], r["dpi"]) for r in fidelity} == {
        (lang, nl, dpi) for lang in ("en", "zh") for nl in ("br", "marker") for dpi in (72, 96)}
    for r in fidelity:
        assert r["missing_chars"] > 0 and r["identical_lines"]
        assert r["pages"] == r["reference_pages"] == r["same_size_pages"] and r["ssim_min"] >= 0.99
    assert "| 4000 chars |" in (tmp_path / "render-benchmark.md").read_text()
    targets = json.loads((tmp_path / "targets.json").read_text())
    assert targets["engine_x"] == {"measured": 1}  # others' entries are kept
    assert targets["render_fidelity_min_ssim"]["met"] is True and targets["render_fidelity_min_ssim"]["card"]
