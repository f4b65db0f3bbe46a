"""``glyphserve bench <name>``: benchmarks. Each module in ``BENCH_MODULES`` provides
``add_parser(subparsers)`` for its own subcommand; add engine/serve benchmarks there."""

from __future__ import annotations

import argparse
import importlib

BENCH_MODULES = ("glyphserve.bench.render", "glyphserve.bench.engine", "glyphserve.bench.serve",
                 "glyphserve.bench.attention", "glyphserve.bench.fp8", "glyphserve.bench.fp8_drift",
                 "glyphserve.bench.kernel_profile")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (results written to docs/benchmarks/)",
                              description="Run a benchmark; each writes JSON and a Markdown table.")
    bench = p.add_subparsers(dest="bench", metavar="BENCH")
    for name in BENCH_MODULES:
        importlib.import_module(name).add_parser(bench)

    def usage(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=usage)
