"""Helpers for the renderer tests (a uniquely named module, importable from the tests)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

CORPUS_DIR = Path(__file__).resolve().parents[3] / "shared" / "corpus"
# config/config_zh.json of thu-coai/Glyph
OFFICIAL_ZH = {
    "page-size": "595,842", "dpi": 72, "margin-x": 10, "margin-y": 10,
    "font-path": "../config/SourceHanSansHWSC-VF.ttf", "font-size": 9, "line-height": 10,
    "font-color": "#000000", "alignment": "LEFT", "horizontal-scale": 1.0, "first-line-indent": 0,
    "left-indent": 0, "right-indent": 0, "space-after": 0, "space-before": 0, "border-width": 0,
    "border-padding": 0, "page-bg-color": "#FFFFFF", "para-bg-color": "#FFFFFF",
    "auto-crop-width": True, "auto-crop-last-page": True,
}


def corpus_excerpt(name: str, start: int, length: int) -> str | None:
    path = CORPUS_DIR / name
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8")[start : start + length]


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    assert a.shape == b.shape, f"page sizes differ: {a.shape} vs {b.shape}"
    return float(structural_similarity(a.mean(axis=2), b.mean(axis=2), data_range=255))


def compare(text: str, config, *, ssim_min: float = 0.99, max_diff: int | None = None) -> list[float]:
    """Render ``text`` fast and with the reference pipeline: the same pages, page sizes, lines
    (text and baseline) and pixels (per-page SSIM >= ``ssim_min``; with ``max_diff``, no
    pixel further apart than that). Returns the SSIMs."""
    from glyphserve.render import render_text
    from glyphserve.render.reference import render_reference

    ref = render_reference(text, config)
    fast = render_text(text, config, workers=1)
    assert len(fast.pages) == len(ref.pages)
    scores = []
    for ours, theirs in zip(fast.pages, ref.pages):
        assert [ln.text for ln in ours.lines] == [ln.text for ln in theirs.lines]
        assert [ln.y for ln in ours.lines] == pytest.approx([ln.y for ln in theirs.lines], abs=1e-6)
        assert ours.image.shape == theirs.image.shape
        if max_diff is not None:
            diff = np.abs(ours.image.astype(np.int16) - theirs.image.astype(np.int16))
            assert int(diff.max()) <= max_diff, f"page {ours.number}: {int((diff > max_diff).sum())} pixels differ"
        scores.append(ssim(ours.image, theirs.image))
    assert min(scores) >= ssim_min, scores
    return scores


def official_repo() -> Path | None:
    """The clone of thu-coai/Glyph named by GLYPHSERVE_GLYPH_REPO, when it holds Verdana."""
    value = os.environ.get("GLYPHSERVE_GLYPH_REPO")
    if value and (Path(value) / "config" / "Verdana.ttf").is_file():
        return Path(value)
    return None


def fake_glyph_repo(root: Path, with_zh_font: bool = False) -> Path:
    """A folder laid out like a clone of thu-coai/Glyph, DejaVu Sans playing its fonts."""
    from glyphserve.render.fonts import DEJAVU_SANS

    config = root / "config"
    config.mkdir()
    (config / "config_en.json").write_text(json.dumps({**OFFICIAL_ZH, "font-path": "../config/Verdana.ttf"}))
    (config / "config_zh.json").write_text(json.dumps(OFFICIAL_ZH))
    shutil.copy(DEJAVU_SANS, config / "Verdana.ttf")
    if with_zh_font:
        shutil.copy(DEJAVU_SANS, config / "SourceHanSansHWSC-VF.ttf")
    return root
