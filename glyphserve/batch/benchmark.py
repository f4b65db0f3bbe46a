"""Documents per minute of ``glyphserve batch`` at several batch sizes, in one process.

    python -m glyphserve.batch.benchmark --random-weights glm-4.1v-9b \\
        --documents 32 --questions 2 --batch-sizes 1,2,4,8 --out docs/benchmarks/batch-h100.md

Writes W50-sized documents (``glyphserve.bench.workloads``), measures how fast the render
workers alone prepare them, loads the engine once, warms it up, then runs the real batch
runner (render processes + batched answers + fsynced results) at each batch size. Every
answer runs to ``--max-new-tokens`` (EOS ignored) so the sizes do the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from glyphserve.batch.inputs import BatchDocument, collect_documents
from glyphserve.batch.prefetch import Prefetcher, RenderOptions
from glyphserve.batch.results import ResultLog
from glyphserve.batch.runner import BatchOptions, BatchRunner

QUESTIONS = (
    "Summarise the main events of the text in three sentences.",
    "Which names and numbers appear most often, and where?",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glyphserve.batch.benchmark",
                                     description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model")
    source.add_argument("--random-weights", metavar="ARCH")
    parser.add_argument("--workload", default="W50", help="document size: W50, W150 or W200 (thousand characters)")
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--questions", type=int, default=2, choices=range(1, len(QUESTIONS) + 1))
    parser.add_argument("--batch-sizes", default="1,2,4,8", help="comma-separated; the first is the baseline")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--no-cache", action="store_true", help="engine caches off (default on, as in batch)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, help="Markdown report to write (plus a .json next to it)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    use_cache = not args.no_cache

    from glyphserve.bench.workloads import WORKLOADS, make_workload_text
    from glyphserve.engine import Engine, EngineConfig

    with tempfile.TemporaryDirectory(prefix="glyphserve-batch-bench-") as tmp:
        folder = Path(tmp) / "docs"
        folder.mkdir()
        for i in range(args.documents):
            text = make_workload_text(WORKLOADS[args.workload], seed=i)
            (folder / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
        documents = collect_documents(str(folder), list(QUESTIONS[: args.questions]))
        render_per_minute, pages = _render_only(documents, args.workers)
        print(f"render workers alone: {render_per_minute:.1f} docs/min, {pages / len(documents):.1f} pages/doc",
              file=sys.stderr)

        config = EngineConfig(model=args.model, random_weights=args.random_weights, dtype=args.dtype,
                              max_num_seqs=max(sizes))
        started = time.perf_counter()
        engine = Engine.load(config)
        load_s = time.perf_counter() - started

        def measure(size: int, caches: bool, name: str) -> dict:
            engine.clear_caches()  # no run may reuse what an earlier one encoded
            return _row(size, caches, _run(engine, documents, size, caches, args, Path(tmp) / name))

        _run(engine, documents[: max(sizes)], max(sizes), use_cache, args, Path(tmp) / "warmup.jsonl")
        rows = [measure(size, use_cache, f"b{size}.jsonl") for size in sizes]
        best = max(rows, key=lambda r: r["documents_per_minute"])["batch_size"]
        # The best size again with the engine's caches flipped: tells whether batch should keep them.
        rows.append(measure(best, not use_cache, "flipped.jsonl"))
        stats = engine.stats()

    report = {
        "device": stats.get("device_name"),
        "dtype": stats.get("dtype"),
        "model": args.model or f"random weights ({args.random_weights})",
        "workload": args.workload,
        "documents": args.documents,
        "questions_per_document": args.questions,
        "pages_per_document": round(pages / len(documents), 2),
        "max_new_tokens": args.max_new_tokens,
        "render_workers": args.workers,
        "render_only_documents_per_minute": round(render_per_minute, 1),
        "engine_load_s": round(load_s, 1),
        "runs": rows,
    }
    markdown = _markdown(report)
    print(markdown)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown, encoding="utf-8")
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def _render_only(documents: list[BatchDocument], workers: int) -> tuple[float, int]:
    prefetcher = Prefetcher(documents, RenderOptions(), workers=workers, window=2 * workers)
    started = time.perf_counter()
    pages = 0
    try:
        for prepared in prefetcher.start():
            if prepared.error is not None:
                raise SystemExit(f"rendering {prepared.document.id} failed: {prepared.error.message}")
            pages += len(prepared.pages)
    finally:
        prefetcher.close()
    return len(documents) / (time.perf_counter() - started) * 60, pages


def _run(engine, documents, size: int, use_cache: bool, args: argparse.Namespace, output: Path):
    options = BatchOptions(batch_size=size, max_new_tokens=args.max_new_tokens, workers=args.workers,
                           use_cache=use_cache, ignore_eos=True)
    with ResultLog(output) as log:
        summary = BatchRunner(lambda: engine, log, options).run(documents)
    if summary.failed:
        raise SystemExit(f"{summary.failed} items failed at batch size {size}; see {output}")
    print(f"batch size {size}, caches {'on' if use_cache else 'off'}: {summary.text()}", file=sys.stderr)
    return summary


def _row(size: int, use_cache: bool, summary) -> dict:
    return {
        "batch_size": size,
        "engine_caches": use_cache,
        "final_batch_size": summary.batch_size,
        "elapsed_s": round(summary.elapsed_s, 2),
        "documents_per_minute": round(summary.documents_per_minute, 2),
        "answered": summary.done,
        "vision_tokens": summary.vision_tokens,
        "prompt_tokens": summary.prompt_tokens,
        "new_tokens": summary.new_tokens,
    }


def _markdown(report: dict) -> str:
    runs = report["runs"]
    base = runs[0]
    best = max(runs, key=lambda r: r["documents_per_minute"])
    lines = [
        f"# Batch throughput: {report['documents']} {report['workload']} documents x "
        f"{report['questions_per_document']} questions",
        "",
        f"Device: {report['device']} ({report['dtype']}); model: {report['model']}; "
        f"{report['pages_per_document']} pages per document; answers of exactly {report['max_new_tokens']} tokens; "
        f"{report['render_workers']} render workers (alone they prepare "
        f"{report['render_only_documents_per_minute']} docs/min); engine loaded in {report['engine_load_s']} s.",
        "Measured with `python -m glyphserve.batch.benchmark`: the `glyphserve batch` runner end to end "
        "(render processes, batched answers, results fsynced per line), after a warm-up run.",
        "",
        "| batch size | engine caches | docs/min | speed-up | wall s | answered | prompt tokens | generated tokens |",
        "|---:|:---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in runs:
        speedup = row["documents_per_minute"] / base["documents_per_minute"] if base["documents_per_minute"] else 0.0
        size = str(row["batch_size"])
        if row["final_batch_size"] != row["batch_size"]:
            size += f" (fell to {row['final_batch_size']})"
        lines.append(
            f"| {size} | {'on' if row['engine_caches'] else 'off'} | {row['documents_per_minute']:.2f} | "
            f"{speedup:.2f}x | {row['elapsed_s']:.1f} | {row['answered']} | {row['prompt_tokens']} | "
            f"{row['new_tokens']} |"
        )
    lines += [
        "",
        f"Best: batch size {best['batch_size']} (caches {'on' if best['engine_caches'] else 'off'}), "
        f"{best['documents_per_minute']:.2f} docs/min vs {base['documents_per_minute']:.2f} at batch size "
        f"{base['batch_size']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
