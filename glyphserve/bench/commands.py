"""``glyphserve bench <name>``: benchmarks. Each module in ``BENCH_MODULES`` provides
``add_parser(subparsers)`` for its own subcommand; add engine/serve benchmarks there."""

from __future__ import annotations

import argparse
import importlib

BENCH_MODULES = ("glyphserve.bench.render", "glyphserve.bench.engine", "glyphserve.bench.serve",
                 "glyphserve.bench.attention", "glyphserve.bench.fp8", "glyphserve.bench.fp8_drift",
                 "glyphserve.bench.kernel_profile")


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Each option of a benchmark gives its default in --help where its help does not already say it: the
    benchmarks have many knobs, and the figures they write depend on every one."""
    for action in parser._actions:
        if (action.option_strings and not any(action.default is unset for unset in (None, False, argparse.SUPPRESS))
                and "default" not in (action.help or "")):
            action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (results written to --out, default docs/benchmarks/ under "
                                            "the current directory)",
                              description="Run a benchmark; each writes JSON and a Markdown table.")
    bench = p.add_subparsers(dest="bench", metavar="BENCH")
    for name in BENCH_MODULES:
        importlib.import_module(name).add_parser(bench)
    for parser in bench.choices.values():
        show_defaults(parser)

    def usage(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=usage)
