"""README.md documents every option of the user-facing commands (benchmarks keep theirs in ``--help``)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from glyphserve.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _options(parser: argparse.ArgumentParser, path: tuple[str, ...]):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name != "bench":
                    yield from _options(sub, (*path, name))
        elif action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield " ".join(path), action.option_strings


def test_every_command_option_is_in_the_readme():
    parser, _ = build_parser()
    missing = [f"{command} {'/'.join(names)}" for command, names in _options(parser, ())
               if not any(re.search(rf"(?<![\w-]){name}(?![\w-])", README) for name in names)]
    assert not missing, f"options missing from README.md: {missing}"


def test_serve_help_groups_the_image_limits_as_such():
    _, commands = build_parser()
    group = next(g for g in commands["serve"]._action_groups if any(a.dest == "max_images" for a in g._group_actions))
    assert "image" in group.title and "chat request" in group.description
