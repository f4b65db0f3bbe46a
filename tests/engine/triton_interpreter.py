"""Runs Python source in a fresh interpreter with Triton's CPU interpreter on (``TRITON_INTERPRET`` must be set
before triton is imported), so the tests check the CUDA kernels' arithmetic without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_interpreted(source: str) -> None:
    """Runs ``source``, which prints "interpreted ok" once every assertion held."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(source)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "interpreted ok" in result.stdout
