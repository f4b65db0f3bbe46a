"""The command line as a module: ``python -m glyphserve`` runs the same commands as the ``glyphserve`` script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from glyphserve import __version__

REPO = Path(__file__).resolve().parents[1]


def test_python_m_glyphserve_runs_the_commands(tmp_path):
    version = subprocess.run([sys.executable, "-m", "glyphserve", "--version"], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"glyphserve {__version__}"
    (tmp_path / "a.txt").write_text("One short line of text.", encoding="utf-8")
    rendered = subprocess.run([sys.executable, "-m", "glyphserve", "render", str(tmp_path / "a.txt"), "-o",
                               str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    assert (tmp_path / "out" / "page_001.png").is_file()


def test_the_full_parser_does_not_load_torch():
    """`glyphserve --help` (or a mistyped command) builds every command's parser: none may import torch, which
    costs seconds on a small machine."""
    code = ("import json, sys; from glyphserve.cli import build_parser; build_parser(); "
            "print(json.dumps(list(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    heavy = {"torch", "transformers", "fastapi", "gradio"} & set(json.loads(loaded.stdout))
    assert not heavy, f"building the parser imports {sorted(heavy)}"


def test_an_unknown_option_is_refused_with_its_commands_usage(capsys):
    import pytest

    from glyphserve.cli import main

    for argv, usage, unknown in ((["eval", "--bogus", "1"], "usage: glyphserve eval ", "--bogus 1"),
                                 (["bench", "engine", "--bogus"], "usage: glyphserve bench engine ", "--bogus"),
                                 (["--bogus"], "usage: glyphserve [-h]", "--bogus")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith(usage), err
        assert err.rstrip().endswith(f"error: unrecognized arguments: {unknown}")


def _options(parser) -> dict:
    """The parser's options by each of their names."""
    return dict(parser._option_string_actions)


def _every_option(parser, path=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _every_option(sub, (*path, name))
        elif action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield " ".join(path), action


def test_the_answering_commands_share_one_definition_of_each_model_engine_and_sampling_flag():
    """serve, ask, batch and eval: a flag has the same names, help, default and choices wherever it applies
    (a new user found --max-context, --quantize, --temperature and --seed missing from some, named otherwise in
    others)."""
    from glyphserve.cli import build_parser

    _, commands = build_parser()
    options = {name: _options(commands[name]) for name in ("serve", "ask", "batch", "eval")}
    # serve's own --served-model-name and --api-key name itself and its key: not aliases of the remote flags there.
    own = {"serve": {"--served-model-name", "--api-key"}}
    for flag in ("--model", "--random-weights", "--dtype", "--device", "--quantize", "--max-model-len", "--max-context",
                 "--endpoint", "--remote-model", "--served-model-name", "--remote-api-key", "--api-key"):
        actions = {name: opts[flag] for name, opts in options.items() if flag in opts and flag not in own.get(name, ())}
        assert set(actions) >= {"ask", "batch", "eval"}, f"{flag}: only in {sorted(actions)}"
        names = {name: set(a.option_strings) - own["serve"] for name, a in actions.items()}
        assert len({frozenset(n) for n in names.values()}) == 1, f"{flag}: {names}"
        for attribute in ("choices", "type", "metavar"):  # (what a user sees; ask's key goes to args.api_key)
            assert len({repr(getattr(a, attribute)) for a in actions.values()}) == 1, f"{flag} {attribute} differs"
        if flag not in ("--model", "--max-model-len", "--max-context", "--endpoint"):  # (what they add, below)
            assert len({a.help for a in actions.values()}) == 1, f"{flag}: {[a.help for a in actions.values()]}"
            assert len({repr(a.default) for a in actions.values()}) == 1, f"{flag} default differs"
    for name in ("ask", "batch", "eval"):  # the remote flags' other names, where the command has no flags of its own
        assert options[name]["--served-model-name"] is options[name]["--remote-model"]
        assert options[name]["--api-key"] is options[name]["--remote-api-key"]
    context = [opts["--max-model-len"].help for opts in options.values()]
    assert all(h.startswith("context length: prompt + answer tokens (default: the model's, at most 32768)")
               for h in context)  # eval then says what it means to its other answerers
    for flag in ("--max-new-tokens", "--temperature", "--top-p", "--seed", "--ignore-eos", "--no-cache",
                 "--page-selection", "--preset", "--dpi", "--newline"):
        ask, batch = options["ask"][flag], options["batch"][flag]
        assert (ask.option_strings, ask.default, ask.type, ask.choices) == \
               (batch.option_strings, batch.default, batch.type, batch.choices), flag
        assert batch.help.startswith(ask.help), flag  # (batch's --page-selection adds what a refusal does)
    assert options["eval"]["--max-new-tokens"].default == 1024  # eval's answers run through Glyph's thinking


def test_every_option_with_a_default_says_it_in_its_help(capsys):
    """Every command's --help gives each option's default (serve --help did not show --port's 7860; the
    benchmarks' --out, docs/benchmarks under the current directory, was nowhere)."""
    import argparse

    import pytest

    from glyphserve.cli import build_parser, main

    parser, _ = build_parser()
    unsaid = [f"{command} {action.option_strings[0]}" for command, action in _every_option(parser)
              if not any(action.default is unset for unset in (None, False, argparse.SUPPRESS)) and action.default != []
              and "default" not in (action.help or "")]
    assert not unsaid, f"options whose help does not give their default: {unsaid}"

    def help_text(*argv: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--help"])
        assert exit_.value.code == 0
        return " ".join(capsys.readouterr().out.split())  # (as one line: argparse wraps the help)

    serve = help_text("serve")
    for said in ("--port PORT port of the UI and the API (default 7860)", "(default 127.0.0.1;",
                 "(default $XDG_DATA_HOME/glyphserve, else ~/.local/share/glyphserve, or ./data where that cannot be "
                 "written)", "(default: $GLYPHSERVE_API_KEY)"):
        assert said in serve, said
    for bench in ("render", "engine", "serve", "attention", "fp8", "fp8-drift", "profile"):
        assert "(default: docs/benchmarks/ under the current directory" in help_text("bench", bench), bench
