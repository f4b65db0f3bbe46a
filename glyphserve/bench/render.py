"""``glyphserve bench render``: the fast renderer against Glyph's official pipeline.

Both render the same deterministic documents (``workloads.make_workload_text``) with the
``glyph-en`` preset, side by side in one process, runs interleaved so background load
hits both alike; medians are reported. A long document is also streamed page by page
(``iter_pages``) at several lengths to check that time grows linearly and memory does not.
Results go to ``docs/benchmarks/render-benchmark.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_SIZES = ("W50", "W150", "W200")
LONG_SIZES = (250_000, 500_000, 1_000_000)
TARGET_SPEEDUP = 20.0  # on W150


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("render", help="fast renderer vs the official reportlab + poppler pipeline",
                              description="Time the fast renderer against the official reportlab + poppler pipeline.")
    p.add_argument("--sizes", default=",".join(DEFAULT_SIZES),
                   help="workloads (W50, W150, W200) or character counts, comma-separated")
    p.add_argument("--runs", type=int, default=5, help="timed runs per mode and size (median reported)")
    p.add_argument("--workers", type=int, default=None, help="fast renderer processes (default: auto)")
    p.add_argument("--long", default=",".join(str(n) for n in LONG_SIZES),
                   help="character counts for the streamed long-document check ('' to skip)")
    p.add_argument("--out", default="docs/benchmarks", help="folder for render-benchmark.json/.md")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = run_benchmark(
        sizes=[s.strip() for s in args.sizes.split(",") if s.strip()],
        runs=args.runs,
        workers=args.workers,
        long_sizes=[int(s) for s in args.long.split(",") if s.strip()],
        seed=args.seed,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "render-benchmark.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    md = to_markdown(result)
    (out / "render-benchmark.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


def run_benchmark(sizes: list[str], runs: int, workers: int | None, long_sizes: list[int], seed: int = 0) -> dict:
    from glyphserve.bench.workloads import WORKLOADS, make_workload_text
    from glyphserve.render import preset, render_text
    from glyphserve.render.reference import render_reference

    config = preset("glyph-en")
    warm = make_workload_text(3000, seed, "en")
    render_reference(warm, config)
    render_text(warm, config, workers=workers)
    render_text(make_workload_text(60_000, seed, "en"), config, workers=workers)  # starts the pool, if any

    rows = []
    for name in sizes:
        n = WORKLOADS[name] if name in WORKLOADS else int(name)
        text = make_workload_text(n, seed, "en")
        ref_times, fast_times = [], []
        ref = fast = None
        for _ in range(runs):
            gc.collect()
            t0 = time.perf_counter()
            ref = render_reference(text, config)
            ref_times.append(time.perf_counter() - t0)
            gc.collect()
            t0 = time.perf_counter()
            fast = render_text(text, config, workers=workers)
            fast_times.append(time.perf_counter() - t0)
        same_lines = [[ln.text for ln in p.lines] for p in ref.pages] == [
            [ln.text for ln in p.lines] for p in fast.pages]
        ref_s, fast_s = statistics.median(ref_times), statistics.median(fast_times)
        rows.append({
            "workload": name if name in WORKLOADS else f"{n} chars",
            "characters": n,
            "pages": len(fast.pages),
            "reference_pages": len(ref.pages),
            "identical_line_breaks": same_lines,
            "reference_seconds": round(ref_s, 4),
            "fast_seconds": round(fast_s, 4),
            "reference_pages_per_second": round(len(ref.pages) / ref_s, 2),
            "fast_pages_per_second": round(len(fast.pages) / fast_s, 2),
            "speedup": round(ref_s / fast_s, 2),
            "reference_runs": [round(t, 4) for t in ref_times],
            "fast_runs": [round(t, 4) for t in fast_times],
        })

    return {
        "benchmark": "render",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "config": "glyph-en preset (595x842 pt, dpi 72, DejaVu Sans standing in for Verdana, <br/> newlines)",
        "runs": runs,
        "workers": workers if workers is not None else "auto",
        "results": rows,
        "target": {"workload": "W150", "speedup": TARGET_SPEEDUP},
        "fidelity": fidelity_check(seed),
        "long_document": long_document_check(long_sizes, seed, workers) if long_sizes else None,
    }


def fidelity_check(seed: int) -> list[dict]:
    """Per-page SSIM of the fast pages against the official ones, per language and dpi,
    with the share of pages whose line breaks are identical."""
    import numpy as np
    from skimage.metrics import structural_similarity

    from glyphserve.bench.workloads import make_workload_text
    from glyphserve.render import preset, render_text
    from glyphserve.render.reference import render_reference

    rows = []
    for lang, chars in (("en", 40_000), ("zh", 12_000)):
        text = make_workload_text(chars, seed + 1, lang)
        for dpi in (72, 96):
            config = preset(f"glyph-{lang}").replace(dpi=dpi)
            ref = render_reference(text, config)
            fast = render_text(text, config, workers=1)
            scores, same = [], 0
            for a, b in zip(fast.pages, ref.pages):
                same += [ln.text for ln in a.lines] == [ln.text for ln in b.lines]
                if a.image.shape == b.image.shape:
                    scores.append(float(structural_similarity(a.image.mean(axis=2), b.image.mean(axis=2),
                                                              data_range=255)))
            rows.append({"language": lang, "dpi": dpi, "characters": chars, "pages": len(fast.pages),
                         "reference_pages": len(ref.pages), "same_size_pages": len(scores),
                         "identical_line_break_pages": same,
                         "ssim_min": round(min(scores), 4) if scores else None,
                         "ssim_median": round(float(np.median(scores)), 4) if scores else None})
    return rows


def long_document_check(sizes: list[int], seed: int, workers: int | None) -> dict:
    """Stream documents of growing length page by page: seconds and peak traced memory."""
    import tracemalloc

    from glyphserve.bench.workloads import make_workload_text
    from glyphserve.render import iter_pages, preset

    config = preset("glyph-en")
    rows = []
    for n in sizes:
        text = make_workload_text(n, seed, "en")
        gc.collect()
        t0 = time.perf_counter()
        pages = sum(1 for _ in iter_pages(text, config))
        seconds = time.perf_counter() - t0
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for _ in iter_pages(text, config):
            pass
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        rows.append({"characters": n, "pages": pages, "seconds": round(seconds, 3),
                     "microseconds_per_char": round(seconds / n * 1e6, 3),
                     "peak_traced_mib": round(peak / 2**20, 1)})
    first, last = rows[0], rows[-1]
    return {
        "mode": "iter_pages (one process, pages streamed and dropped)",
        "rows": rows,
        "time_ratio_per_char": round(last["microseconds_per_char"] / first["microseconds_per_char"], 2),
        "memory_ratio": round(last["peak_traced_mib"] / max(first["peak_traced_mib"], 0.1), 2),
    }


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "platform": platform.platform(), "python": sys.version.split()[0]}


def versions() -> dict:
    import numpy
    import PIL
    import reportlab

    import glyphserve

    out = {"glyphserve": glyphserve.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__,
           "reportlab": reportlab.Version}
    try:
        import freetype

        out["freetype"] = ".".join(map(str, freetype.version()))
    except Exception:  # optional in this report
        pass
    try:
        line = subprocess.run(["pdftoppm", "-v"], capture_output=True, text=True, timeout=10).stderr.splitlines()[0]
        out["poppler"] = line.split()[-1]
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    return out


def to_markdown(result: dict) -> str:
    m = result["machine"]
    v = result["versions"]
    lines = [
        "# Render benchmark: fast renderer vs the official Glyph pipeline",
        "",
        f"{result['date']} on {m['cpu']} ({m['cores']} cores), Python {m['python']}; "
        + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        f"Config: {result['config']}. Reference = reportlab -> PDF -> pdftoppm (pdf2image) -> crop, exactly as "
        f"`word2png_function.py`; fast = `glyphserve.render.render_text` (workers: {result['workers']}). "
        f"Medians of {result['runs']} interleaved runs; text from `make_workload_text(n, seed=0, 'en')`.",
        "",
        "| workload | characters | pages | reference s | fast s | reference pages/s | fast pages/s | speedup "
        "| identical line breaks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['workload']} | {r['characters']:,} | {r['pages']} | {r['reference_seconds']:.3f} | "
            f"{r['fast_seconds']:.3f} | {r['reference_pages_per_second']:.1f} | {r['fast_pages_per_second']:.1f} | "
            f"**{r['speedup']:.1f}x** | {'yes' if r['identical_line_breaks'] else 'NO'} |"
        )
    lines += [
        "",
        "Fidelity (SSIM of each fast page against the official page, greyscale, same size):",
        "",
        "| language | dpi | characters | pages (fast / official) | pages with identical line breaks "
        "| same-size pages | SSIM min | SSIM median |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in result.get("fidelity") or []:
        lines.append(f"| {r['language']} | {r['dpi']} | {r['characters']:,} | {r['pages']} / {r['reference_pages']} | "
                     f"{r['identical_line_break_pages']} | {r['same_size_pages']} | {r['ssim_min']} | "
                     f"{r['ssim_median']} |")
    long_doc = result.get("long_document")
    if long_doc:
        lines += [
            "",
            f"Long documents, {long_doc['mode']}:",
            "",
            "| characters | pages | seconds | µs per character | peak traced memory MiB |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in long_doc["rows"]:
            lines.append(f"| {r['characters']:,} | {r['pages']} | {r['seconds']:.2f} | "
                         f"{r['microseconds_per_char']:.2f} | {r['peak_traced_mib']:.1f} |")
        lines += ["", f"Time per character, longest vs shortest: x{long_doc['time_ratio_per_char']} "
                      f"(1.0 = linear); peak memory ratio: x{long_doc['memory_ratio']} (bounded when ~1)."]
    return "\n".join(lines) + "\n"
