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
def test_bench_render_writes_json_and_markdown(tmp_path):
    from argparse import Namespace

    from glyphserve.bench.render import run

    assert run(Namespace(sizes="4000", runs=1, workers=1, long="3000,6000", out=str(tmp_path), seed=0)) == 0
    result = json.loads((tmp_path / "render-benchmark.json").read_text())
    row = result["results"][0]
    assert row["characters"] == 4000 and row["identical_line_breaks"] and row["speedup"] > 1
    assert result["machine"]["cores"] >= 1 and "reportlab" in result["versions"]
    assert {(r["language"], r["dpi"]) for r in result["fidelity"]} == {("en", 72), ("en", 96), ("zh", 72), ("zh", 96)}
    assert all(r["ssim_min"] >= 0.9 for r in result["fidelity"])
    assert "| 4000 chars |" in (tmp_path / "render-benchmark.md").read_text()
