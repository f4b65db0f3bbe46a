"""Helpers for the renderer tests (a uniquely named module, importable from the tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CORPUS_DIR = Path(__file__).resolve().parents[3] / "shared" / "corpus"


def corpus_excerpt(name: str, start: int, length: int) -> str | None:
    path = CORPUS_DIR / name
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8")[start : start + length]


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    assert a.shape == b.shape, f"page sizes differ: {a.shape} vs {b.shape}"
    return float(structural_similarity(a.mean(axis=2), b.mean(axis=2), data_range=255))
