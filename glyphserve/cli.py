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
# The module registering each command: ``glyphserve CMD ...`` imports only that one, so a command's
# start-up does not pay for every package's imports. Anything else builds the whole parser.
COMMAND_OWNERS = {
    "render": "glyphserve.render.commands",
    "ask": "glyphserve.serve.commands",
    "make-tiny-model": "glyphserve.engine.commands",
    "serve": "glyphserve.serve.commands",
    "doctor": "glyphserve.serve.commands",
    "batch": "glyphserve.batch.commands",
    "eval": "glyphserve.eval.commands",
    "bench": "glyphserve.bench.commands",
}


def build_parser(modules: tuple[str, ...] = COMMAND_MODULES) -> tuple[argparse.ArgumentParser, dict]:
    """The parser with the commands of ``modules``, and those commands by name."""
    parser = argparse.ArgumentParser(
        prog="glyphserve",
        description="Render long documents into pages and answer questions about them with Glyph.",
    )
    parser.add_argument("--version", action="version", version=f"glyphserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(subparsers)
    return parser, subparsers.choices


def command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The deepest (sub)command's parser that ``argv`` names (``bench engine``: bench's ``engine``)."""
    for word in argv:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is not None and word in sub.choices:
            parser = sub.choices[word]
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    owner = COMMAND_OWNERS.get(argv[0]) if argv else None
    parser, commands = build_parser((owner,) if owner else COMMAND_MODULES)
    if owner and argv[0] not in commands:
        parser, _ = build_parser()  # the command moved to another module: find it the slow way
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # refused with the command's own usage line, not the top level's
        command_parser(parser, argv).error(f"unrecognized arguments: {' '.join(unknown)}")
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
