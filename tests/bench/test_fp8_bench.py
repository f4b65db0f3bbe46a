"""``glyphserve bench fp8`` on a machine without a GPU, and its report."""

from __future__ import annotations

import pytest
import torch

from glyphserve.bench.fp8 import language_model_shapes, to_markdown
from glyphserve.cli import main


def test_refuses_clearly_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "fp8", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_report_shows_measured_rows_and_failures():
    shapes, layers = language_model_shapes()
    assert layers == 40 and shapes["qkv"] == (4608, 4096, True) and shapes["down"] == (4096, 13696, False)
    results = {
        "device": "NVIDIA H200", "date": "2026-12-01", "torch": "2.11", "rows": [1], "copy_bandwidth_Bps": 4e12,
        "shapes": {"o": [4096, 4096, False]},
        "linear": [{"shape": "o", "m": 1, "method": "fp8", "ms": 0.008, "floor_ms": 0.004, "rel_error": 1.7e-3,
                    "rel_error_vs_bf16_weights": 3e-2}],
        "language_model": [{"m": 1, "method": "bf16", "ms": 5.0, "floor_ms": 4.0},
                           {"m": 1, "method": "fp8", "ms": 3.0, "floor_ms": 2.0}],
        "resize": {}, "errors": [{"what": "o m=1 scaled_mm", "error": "RuntimeError('no FP8 GEMM')"}],
    }
    markdown = to_markdown(results)
    assert "| 1 | 5.000 (1.25x) | 3.000 (1.50x) | - | 1.67x |" in markdown
    assert "| o [4096, 4096] | 1 | - | 0.008 (2.00x) | - | 1.7e-03 | - | 3.0e-02 |" in markdown
    assert "FAILED o m=1 scaled_mm" in markdown
