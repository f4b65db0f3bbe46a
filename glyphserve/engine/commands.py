"""``glyphserve make-tiny-model`` (``glyphserve ask`` lives in serve: without a model it answers extractively)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    tiny = subparsers.add_parser(
        "make-tiny-model",
        help="write a tiny random GLM-4.1V checkpoint (tests, smoke runs)",
        description="Write a tiny random checkpoint with GLM-4.1V's architecture, tokenizer tokens, processor and "
        "chat template; it loads with --model DIR like the real Glyph.",
    )
    tiny.add_argument("dir", type=Path, metavar="DIR",
                      help="a new or empty folder (an earlier tiny checkpoint there is replaced)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    tiny.set_defaults(func=_make_tiny)


def _make_tiny(args: argparse.Namespace) -> int:
    from glyphserve.engine.tiny import make_tiny_model

    print(make_tiny_model(args.dir, seed=args.seed))
    return 0
