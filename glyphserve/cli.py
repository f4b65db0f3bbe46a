"""The ``glyphserve`` command line.

Each layer owns its subcommands in a ``commands`` module with a ``register(subparsers)``
function; heavy imports happen inside the handlers so ``glyphserve --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from glyphserve import __version__
from glyphserve.errors import GlyphserveError

COMMAND_MODULES = (
    "glyphserve.render.commands",
    "glyphserve.engine.commands",
    "glyphserve.serve.commands",
    "glyphserve.batch.commands",
    "glyphserve.eval.commands",
    "glyphserve.bench.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glyphserve",
        description="Render long documents into pages and answer questions about them with Glyph.",
    )
    parser.add_argument("--version", action="version", version=f"glyphserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except GlyphserveError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
