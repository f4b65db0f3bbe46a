"""Eval outputs: ``results.json`` (everything), ``report.md`` (tables) and ``accuracy.png`` (chart)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from glyphserve.eval.ocr import LegibilityRow
from glyphserve.eval.runner import SampleResult, SuiteRow


def format_length(tokens: int) -> str:
    if tokens % 1024 == 0:
        return f"{tokens // 1024}k"
    return f"{tokens / 1024:.1f}k" if tokens > 10 * 1024 else str(tokens)


def accuracy_table(rows: Sequence[SuiteRow], selection: bool = False) -> str:
    """One line per row; with ``selection`` also the mean pages shown and the share of samples whose evidence
    pages were all shown."""
    extra = " pages shown | evidence shown |" if selection else ""
    lines = [
        "| suite | rendering | length | samples | accuracy | text tokens | vision tokens | compression "
        "| answer s | render s |" + extra,
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if selection else ""),
    ]
    for r in rows:
        line = (
            f"| {r.suite} | {r.setting} | {format_length(r.length)} | {r.samples} | {r.accuracy:.1%} | "
            f"{r.text_tokens:,.0f} | {r.vision_tokens:,.0f} | {r.compression:.2f}x | "
            f"{r.latency_s:.3f} | {r.render_s:.2f} |"
        )
        if selection:
            evidence = "-" if r.evidence_shown is None else f"{r.evidence_shown:.0%}"
            line += f" {r.pages_shown:.1f} | {evidence} |"
        lines.append(line)
    return "\n".join(lines)


def legibility_table(rows: Sequence[LegibilityRow]) -> str:
    lines = [
        "| preset | dpi | font | pages | reference chars | CER | CER, page upscaled 2x "
        "| vision tokens / page | OCR s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        upscaled = f"{r.cer_upscaled:.1%}" if r.cer_upscaled is not None else "-"
        lines.append(
            f"| {r.preset} | {r.dpi} | {r.font} | {r.pages} | {r.chars:,} | {r.cer:.1%} | {upscaled} | "
            f"{r.vision_tokens_per_page:,.0f} | {r.ocr_s:.1f} |"
        )
    return "\n".join(lines)


def markdown(meta: dict[str, Any], rows: Sequence[SuiteRow], legibility: Sequence[LegibilityRow]) -> str:
    parts = [f"# glyphserve eval: backend `{meta['backend']}`", ""]
    parts.append(", ".join(f"{k}: {v}" for k, v in meta.items() if k != "notes"))
    notes = list(meta.get("notes", []))
    notes += [f"{r.suite} {format_length(r.length)} ({r.setting}): {r.errors} of {r.samples} sample(s) did not fit "
              "the backend's context and scored 0 (see results.json)" for r in rows if r.errors]
    for note in notes:
        parts += ["", f"- {note}"]
    if rows:
        parts += ["", "## Accuracy", "", accuracy_table(rows, "page_selection" in meta)]
    if legibility:
        parts += ["", "## Rendering legibility (Tesseract character error rate)", "", legibility_table(legibility)]
    return "\n".join(parts) + "\n"


def chart(rows: Sequence[SuiteRow], path: Path, title: str) -> None:
    """Accuracy (left) and compression (right) against document length, one line per suite and setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, comp_ax) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    series: dict[tuple[str, str], list[SuiteRow]] = {}
    for r in rows:
        series.setdefault((r.suite, r.setting), []).append(r)
    several_settings = len({r.setting for r in rows}) > 1
    for (suite, setting), points in series.items():
        label = f"{suite} ({setting})" if several_settings else suite
        lengths = [p.length for p in points]
        acc_ax.plot(lengths, [100 * p.accuracy for p in points], marker="o", label=label)
        comp_ax.plot(lengths, [p.compression for p in points], marker="o", label=label)
    ticks = sorted({r.length for r in rows})
    for ax, ylabel in ((acc_ax, "accuracy (%)"), (comp_ax, "text tokens per vision token")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [format_length(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("document length (text tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    acc_ax.set_ylim(-3, 103)
    comp_ax.set_ylim(bottom=0)
    acc_ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    out_dir: Path,
    meta: dict[str, Any],
    rows: Sequence[SuiteRow],
    results: Sequence[SampleResult],
    legibility: Sequence[LegibilityRow],
) -> list[Path]:
    """Write the outputs into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": meta,
        "summary": [asdict(r) for r in rows],
        "legibility": [asdict(r) for r in legibility],
        "samples": [asdict(r) for r in results],
    }
    written = [out_dir / "results.json", out_dir / "report.md"]
    written[0].write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    written[1].write_text(markdown(meta, rows, legibility), encoding="utf-8")
    if rows and importlib.util.find_spec("matplotlib") is not None:
        written.append(out_dir / "accuracy.png")
        chart(rows, written[-1], f"glyphserve eval, backend: {meta['backend']}")
    elif rows:
        print("note: accuracy.png needs matplotlib (pip install matplotlib); the tables are written", file=sys.stderr)
    return written
