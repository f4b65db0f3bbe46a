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

# Triton 3.6's interpreter hands a kernel's scalar arguments over as one-element numpy arrays and makes loop bounds
# of them with int(array), which numpy 2.4 refuses for arrays of one dimension; the project's kernels take runtime
# loop counts (on the GPU they beat compile-time ones: gemv_kernel), so the bound is read with .item() instead.
PRELUDE = """
import triton.runtime.interpreter as _interpreter
assert hasattr(_interpreter, "_patch_lang_tensor"), "this Triton's interpreter needs a new shim (tests/engine)"
_patch_lang_tensor = _interpreter._patch_lang_tensor
def _index_by_item(tensor, scope):
    _patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))
_interpreter._patch_lang_tensor = _index_by_item
"""


def run_interpreted(source: str) -> None:
    """Runs ``source``, which prints "interpreted ok" once every assertion held."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(source)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "interpreted ok" in result.stdout
