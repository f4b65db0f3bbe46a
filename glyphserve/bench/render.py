"""``glyphserve bench render``: the fast renderer against Glyph's official pipeline.

The official pipeline is ``glyphserve.render.reference``, a step-by-step re-implementation of
``scripts/word2png_function.py`` (reportlab paragraphs of 30 source lines -> PDF -> pdf2image
at the dpi -> crop -> PNG files with Pillow's defaults). Three comparisons on the same
deterministic documents (``workloads.make_workload_text``, ``glyph-en`` preset), each run
interleaved with the others so background load hits both sides alike, medians reported:

- in memory: the cropped pages as arrays (``render_reference`` / ``render_text``);
- with PNG files, in this process (``render_reference(out_dir=)`` / ``render_text(encode=True)``
  + ``write_rendered``);
- the command line end to end, whole processes (``python -m glyphserve.render.reference FILE -o
  DIR`` / ``glyphserve render FILE -o DIR``).

The fast side runs with the default worker count and with one worker (the default must never
lose to it). Fidelity is measured on texts with characters the font lacks, in both newline
modes, English and Chinese, dpi 72 and 96. A long document is streamed page by page
(``iter_pages``) at growing lengths to check that time grows linearly and memory does not.
Results go to ``docs/benchmarks/render-benchmark.{json,md}`` and the ``render_*`` entries of
``docs/benchmarks/targets.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from glyphserve.bench.engine import out_argument

DEFAULT_SIZES = ("W50", "W150", "W200")
LONG_SIZES = (250_000, 500_000, 1_000_000)
TARGET_WORKLOAD = "W150"
TARGETS = {"in_memory": 20.0, "png_files": 8.0, "cli": 4.0}  # speedups on TARGET_WORKLOAD
FIDELITY_SSIM = 0.99
CARD = "2-core CPU VM"
# Characters the fonts lack (each drawn as the font's missing-glyph box), as in a man page: hyphens,
# arrows, Hebrew, Arabic, an emoji, Devanagari, Thai and a private-use character.
MISSING = ["\u2010", "\u2192", "\u21d2", "\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627", "\U0001f600",
           "\u0915", "\u0e01", "\ue000"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("render", help="fast renderer vs the official reportlab + poppler pipeline",
                              description="Time the fast renderer against the official reportlab + poppler pipeline.")
    p.add_argument("--sizes", default=",".join(DEFAULT_SIZES),
                   help="workloads (W50, W150, W200) or character counts, comma-separated")
    p.add_argument("--runs", type=int, default=5, help="timed runs per mode and size (median reported)")
    p.add_argument("--workers", type=int, default=None, help="fast renderer processes (default: its own choice)")
    p.add_argument("--long", default=",".join(str(n) for n in LONG_SIZES),
                   help="character counts for the streamed long-document check ('' to skip)")
    p.add_argument("--no-cli", action="store_true", help="skip the end-to-end command-line comparison")
    p.add_argument("--fidelity-chars", type=int, default=30_000,
                   help="characters of the English fidelity texts (Chinese: a third)")
    out_argument(p, "render-benchmark.json/.md and targets.json")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = run_benchmark(
        sizes=[s.strip() for s in args.sizes.split(",") if s.strip()],
        runs=args.runs,
        workers=args.workers,
        long_sizes=[int(s) for s in args.long.split(",") if s.strip()],
        seed=args.seed,
        cli=not args.no_cli,
        fidelity_chars=args.fidelity_chars,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "render-benchmark.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    md = to_markdown(result)
    (out / "render-benchmark.md").write_text(md, encoding="utf-8")
    update_targets(out / "targets.json", result)
    print(md)
    return 0


def run_benchmark(sizes: list[str], runs: int, workers: int | None, long_sizes: list[int], seed: int = 0,
                  cli: bool = True, fidelity_chars: int = 30_000) -> dict:
    from glyphserve.bench.workloads import WORKLOADS, make_workload_text
    from glyphserve.render import preset, render_text
    from glyphserve.render.reference import render_reference

    config = preset("glyph-en")
    warm = make_workload_text(3000, seed, "en")
    render_reference(warm, config)
    render_text(warm, config, workers=1)
    if workers != 1:
        render_text(make_workload_text(60_000, seed, "en"), config, workers=workers)  # starts the pool, if any

    rows = []
    with tempfile.TemporaryDirectory(prefix="glyphserve-bench-") as scratch:
        for name in sizes:
            n = WORKLOADS[name] if name in WORKLOADS else int(name)
            text = make_workload_text(n, seed, "en")
            source = Path(scratch) / f"{n}.txt"
            source.write_text(text, encoding="utf-8")
            rows.append(_compare(name if name in WORKLOADS else f"{n} chars", text, source, config, runs, workers,
                                 Path(scratch), cli))

    return {
        "benchmark": "render",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "config": "glyph-en preset (595x842 pt, dpi 72, <br/> newlines), "
                  + ("Verdana (the official font)" if _official_font(config) else "DejaVu Sans standing in for Verdana"),
        "runs": runs,
        "workers": workers if workers is not None else "auto",
        "results": rows,
        "targets": {"workload": TARGET_WORKLOAD, **{f"{k}_speedup": v for k, v in TARGETS.items()},
                    "fidelity_ssim": FIDELITY_SSIM},
        "fidelity": fidelity_check(seed, fidelity_chars),
        "long_document": long_document_check(long_sizes, seed) if long_sizes else None,
    }


def _compare(label: str, text: str, source: Path, config, runs: int, workers: int | None, scratch: Path,
             cli: bool) -> dict:
    """One workload: every mode of both sides, in turn, ``runs`` times."""
    from glyphserve.render import render_text, write_rendered
    from glyphserve.render.reference import render_reference

    def fresh(name: str) -> Path:
        folder = scratch / name
        shutil.rmtree(folder, ignore_errors=True)
        return folder

    def fast_files(w: int | None) -> object:
        doc = render_text(text, config, workers=w, encode=True)
        write_rendered(doc, fresh("fast"))
        return doc

    modes = {
        "in_memory": {"reference": lambda: render_reference(text, config),
                      "fast": lambda: render_text(text, config, workers=workers),
                      "fast_1_worker": lambda: render_text(text, config, workers=1)},
        "png_files": {"reference": lambda: render_reference(text, config, out_dir=fresh("reference")),
                      "fast": lambda: fast_files(workers),
                      "fast_1_worker": lambda: fast_files(1)},
    }
    if cli:
        python = [sys.executable]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        worker_flag = [] if workers is None else ["--workers", str(workers)]
        modes["cli"] = {
            "reference": lambda: _process(python + ["-m", "glyphserve.render.reference", str(source), "-o",
                                                    str(fresh("reference"))], env),
            "fast": lambda: _process(python + ["-m", "glyphserve.cli", "render", str(source), "-o",
                                               str(fresh("fast"))] + worker_flag, env),
            "fast_1_worker": lambda: _process(python + ["-m", "glyphserve.cli", "render", str(source), "-o",
                                                        str(fresh("fast")), "--workers", "1"], env),
        }
    times: dict[str, dict[str, list[float]]] = {m: {side: [] for side in sides} for m, sides in modes.items()}
    outputs: dict[str, object] = {}
    for _ in range(runs):
        for mode, sides in modes.items():
            for side, fn in sides.items():
                gc.collect()
                t0 = time.perf_counter()
                out = fn()
                times[mode][side].append(time.perf_counter() - t0)
                outputs[f"{mode}/{side}"] = out
    ref, fast = outputs["in_memory/reference"], outputs["in_memory/fast"]
    row = {
        "workload": label,
        "characters": len(text),
        "pages": len(fast.pages),
        "reference_pages": len(ref.pages),
        "identical_line_breaks": [[ln.text for ln in p.lines] for p in ref.pages]
        == [[ln.text for ln in p.lines] for p in fast.pages],
    }
    for mode, sides in times.items():
        medians = {side: statistics.median(ts) for side, ts in sides.items()}
        row[mode] = {
            **{f"{side}_seconds": round(s, 4) for side, s in medians.items()},
            "speedup": round(medians["reference"] / medians["fast"], 2),
            "speedup_1_worker": round(medians["reference"] / medians["fast_1_worker"], 2),
            # the same comparison run by run (robust to the machine's speed drifting between runs)
            "paired_speedup": round(statistics.median(r / f for r, f in zip(sides["reference"], sides["fast"])), 2),
            "runs": {side: [round(t, 4) for t in ts] for side, ts in sides.items()},
        }
    return row


def _process(command: list[str], env: dict) -> None:
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _official_font(config) -> bool:
    from glyphserve.render.fonts import resolve_font

    return not resolve_font(config.font_path).substitute


def fidelity_check(seed: int, chars: int) -> list[dict]:
    """Per language, newline mode and dpi, on text with characters the font lacks: pages and page
    sizes equal to the reference's, per-page SSIM, and whether every line's text is the same."""
    import random

    import numpy as np
    from skimage.metrics import structural_similarity

    from glyphserve.bench.workloads import make_workload_text
    from glyphserve.render import MARKER_MARKUP, preset, render_text
    from glyphserve.render.reference import render_reference

    rows = []
    for lang, n in (("en", chars), ("zh", chars // 3)):
        rng = random.Random(seed + 2)
        base = make_workload_text(n, seed + 1, lang)
        # one of the missing characters every 40 characters on average
        text = "".join(base[i:i + 20] + (rng.choice(MISSING) if rng.random() < 0.5 else "")
                       for i in range(0, len(base), 20))
        for newline in ("br", "marker"):
            for dpi in (72, 96):
                config = preset(f"glyph-{lang}").replace(dpi=dpi, newline_markup=MARKER_MARKUP if newline == "marker"
                                                         else "<br/>")
                ref = render_reference(text, config)
                fast = render_text(text, config, workers=1)
                same_size = [a.image.shape == b.image.shape for a, b in zip(fast.pages, ref.pages)]
                scores = [float(structural_similarity(a.image.mean(axis=2), b.image.mean(axis=2), data_range=255))
                          for a, b in zip(fast.pages, ref.pages) if a.image.shape == b.image.shape]
                rows.append({
                    "language": lang, "newline": newline, "dpi": dpi, "characters": len(text),
                    "missing_chars": fast.stats.missing_chars,
                    "pages": len(fast.pages), "reference_pages": len(ref.pages),
                    "same_size_pages": sum(same_size),
                    "identical_lines": all([ln.text for ln in a.lines] == [ln.text for ln in b.lines]
                                           for a, b in zip(fast.pages, ref.pages)),
                    "ssim_min": round(min(scores), 4) if scores else None,
                    "ssim_median": round(float(np.median(scores)), 4) if scores else None,
                })
    return rows


def long_document_check(sizes: list[int], seed: int) -> dict:
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
    return {"cpu": model, "cores": cores, "platform": platform.platform(), "python": sys.version.split()[0],
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def versions() -> dict:
    import numpy
    import PIL
    import reportlab

    import glyphserve

    out = {"glyphserve": glyphserve.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__,
           "reportlab": reportlab.Version}
    for name in ("isal", "freetype"):
        try:
            module = __import__(name)
            out[name] = ".".join(map(str, module.version())) if name == "freetype" else module.__version__
        except Exception:  # optional in this report
            pass
    try:
        line = subprocess.run(["pdftoppm", "-v"], capture_output=True, text=True, timeout=10).stderr.splitlines()[0]
        out["poppler"] = line.split()[-1]
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    return out


def update_targets(path: Path, result: dict) -> None:
    """Record the ``render_*`` figures in targets.json, keeping everyone else's entries."""
    from glyphserve.bench.targets import record_targets

    row = next((r for r in result["results"] if r["workload"] == TARGET_WORKLOAD), None)
    entries: dict[str, dict] = {}
    date = result["date"][:10]
    source = "docs/benchmarks/render-benchmark.json"
    if row is not None:
        for mode, target in TARGETS.items():
            if mode in row:
                measured = row[mode]["speedup"]
                entries[f"render_{mode}_speedup"] = {"measured": measured, "target": target, "met": measured >= target,
                                                     "card": CARD, "date": date, "source": source}
    scores = [r["ssim_min"] for r in result.get("fidelity") or [] if r["ssim_min"] is not None]
    if scores:
        same = all(r["pages"] == r["reference_pages"] == r["same_size_pages"] and r["identical_lines"]
                   for r in result["fidelity"])
        entries["render_fidelity_min_ssim"] = {"measured": min(scores), "target": FIDELITY_SSIM,
                                               "met": min(scores) >= FIDELITY_SSIM and same, "card": CARD,
                                               "date": date, "source": source}
    record_targets(path, entries)


def to_markdown(result: dict) -> str:
    m = result["machine"]
    v = result["versions"]
    t = result["targets"]
    lines = [
        "# Render benchmark: fast renderer vs the official Glyph pipeline",
        "",
        f"{result['date']} on {m['cpu']} ({m['cores']} cores, load average {m['load_average']}), Python "
        f"{m['python']}; " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        f"Config: {result['config']}. Official = `glyphserve.render.reference`, the steps of `word2png_function.py` "
        "(reportlab paragraphs of 30 lines -> PDF -> pdf2image -> crop -> Pillow PNG files). Fast = "
        f"`render_text` (workers: {result['workers']}; the 1-worker column for comparison). Medians of "
        f"{result['runs']} interleaved runs; text from `make_workload_text(n, seed=0, 'en')`. Targets on "
        f"{t['workload']}: in memory >= {t['in_memory_speedup']:g}x, PNG files >= {t['png_files_speedup']:g}x, "
        f"command line >= {t['cli_speedup']:g}x.",
        "",
        "| workload | pages | mode | official s | fast s | speedup | paired | 1 worker | identical lines |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    labels = {"in_memory": "in memory", "png_files": "PNG files", "cli": "command line"}
    for r in result["results"]:
        for mode, label in labels.items():
            if mode not in r:
                continue
            x = r[mode]
            lines.append(
                f"| {r['workload']} | {r['pages']} | {label} | {x['reference_seconds']:.3f} | {x['fast_seconds']:.3f} "
                f"| **{x['speedup']:.1f}x** | {x['paired_speedup']:.1f}x | {x['speedup_1_worker']:.1f}x | "
                f"{'yes' if r['identical_line_breaks'] else 'NO'} |")
    lines += [
        "",
        "Fidelity on text with characters the font lacks (SSIM of each fast page against the official page, "
        "greyscale, same size):",
        "",
        "| language | newline | dpi | characters | missing | pages (fast / official) | same-size pages "
        "| identical lines | SSIM min | SSIM median |",
        "|---|---|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    for r in result.get("fidelity") or []:
        lines.append(f"| {r['language']} | {r['newline']} | {r['dpi']} | {r['characters']:,} | {r['missing_chars']} | "
                     f"{r['pages']} / {r['reference_pages']} | {r['same_size_pages']} | "
                     f"{'yes' if r['identical_lines'] else 'NO'} | {r['ssim_min']} | {r['ssim_median']} |")
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
