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
