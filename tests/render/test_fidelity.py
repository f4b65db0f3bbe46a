"""The fast renderer against the official pipeline run for real (reportlab + pdftoppm):
same pages, same line breaks, same pixels (SSIM >= 0.90; in practice ~1.0)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.render.render_helpers import corpus_excerpt, ssim

from glyphserve.bench.workloads import make_workload_text
from glyphserve.render import MARKER_MARKUP, load_glyph_config, preset, render_text

pytestmark = pytest.mark.usefixtures("reference_available")

SSIM_MIN = 0.90


def english_text() -> str:
    return corpus_excerpt("glyph_demo_case1.txt", 0, 9000) or make_workload_text(9000, 1, "en")


def chinese_text() -> str:
    return corpus_excerpt("glyph_demo_case2.txt", 0, 3000) or (
        "长文本压缩：Glyph 把文字渲染成图片，再由视觉语言模型阅读。\n" + make_workload_text(3000, 1, "zh"))


def synthetic_text() -> str:
    """Entities, runs of spaces, tabs, empty lines, an over-long word, short and long lines."""
    lines = [
        "R&D <costs> rose   by 3%\tin Q3 -- see \"notes\" [1].",
        "",
        "   indented line with  double  spaces",
        "x" * 180 + " tail",
        *[f"item {i}: " + "lorem ipsum dolor sit amet " * (i % 7) for i in range(70)],
    ]
    return "\n".join(lines)


def compare(text: str, config) -> list[float]:
    from glyphserve.render.reference import render_reference

    ref = render_reference(text, config)
    fast = render_text(text, config, workers=1)
    assert len(fast.pages) == len(ref.pages)
    scores = []
    for ours, theirs in zip(fast.pages, ref.pages):
        assert [ln.text for ln in ours.lines] == [ln.text for ln in theirs.lines]
        assert [round(ln.y, 6) for ln in ours.lines] == pytest.approx([round(ln.y, 6) for ln in theirs.lines], abs=1e-6)
        assert ours.image.shape == theirs.image.shape
        scores.append(ssim(ours.image, theirs.image))
    assert min(scores) >= SSIM_MIN, scores
    return scores


@pytest.mark.parametrize("dpi", [72, 96])
@pytest.mark.parametrize("newline", ["br", "marker"])
def test_english(dpi, newline):
    cfg = preset("glyph-en").replace(dpi=dpi, newline_markup=MARKER_MARKUP if newline == "marker" else "<br/>")
    scores = compare(english_text(), cfg)
    assert min(scores) > 0.99  # unhinted FreeType at Splash's positions: pixel for pixel in practice


@pytest.mark.parametrize("dpi", [72, 96])
def test_chinese(dpi):
    # Noto Sans CJK is CFF: the reference converts it to TrueType outlines (cu2qu), so a
    # few edge pixels differ from drawing the CFF outlines directly.
    scores = compare(chinese_text(), preset("glyph-zh").replace(dpi=dpi))
    assert min(scores) > 0.98


def test_chinese_marker_mode():
    compare(chinese_text()[:1500], preset("glyph-zh").replace(newline_markup=MARKER_MARKUP))


def test_synthetic_edge_cases_span_pages():
    scores = compare(synthetic_text(), preset("glyph-en"))
    assert len(scores) >= 2


def test_official_config_file_with_other_settings(tmp_path):
    path = tmp_path / "config_en.json"
    path.write_text(json.dumps({
        "page-size": "500,700", "dpi": 96, "margin-x": 20, "margin-y": 15,
        "font-path": "../config/Verdana.ttf", "font-size": 10, "line-height": 12.5, "font-color": "#202020",
        "alignment": "LEFT", "horizontal-scale": 1.0, "first-line-indent": 14, "left-indent": 0,
        "right-indent": 0, "space-after": 0, "space-before": 0, "border-width": 0, "border-padding": 0,
        "page-bg-color": "#FAFAFA", "para-bg-color": "#FAFAFA", "auto-crop-width": True, "auto-crop-last-page": True,
    }), encoding="utf-8")
    compare(english_text()[:5000], load_glyph_config(path))


@pytest.mark.parametrize(
    "changes",
    [
        {"alignment": "JUSTIFY"},
        {"alignment": "CENTER"},
        {"alignment": "RIGHT", "dpi": 96},
        {"left_indent": 20, "right_indent": 30, "first_line_indent": 15},
        {"space_before": 8, "space_after": 5},
        {"border_width": 1.5, "border_padding": 4, "para_border_color": "#FF8800", "para_bg_color": "#EEEEFF"},
        {"horizontal_scale": 0.8},
    ],
    ids=["justify", "center", "right-96dpi", "indents", "paragraph-spacing", "border-background", "h-scale"],
)
def test_other_official_settings(changes):
    compare(english_text()[:6000], preset("glyph-en").replace(**changes))


def test_crop_off_and_colours():
    cfg = preset("glyph-en").replace(auto_crop_width=False, auto_crop_last_page=False, font_color="#1F3F7F",
                                     page_bg_color="#FFFFF0", para_bg_color="#FFFFF0")
    scores = compare(english_text()[:2500], cfg)
    assert min(scores) > 0.99


def test_fast_images_are_plain_rgb_arrays():
    page = render_text("Hello, Glyph.", preset("glyph-en"), workers=1).pages[0]
    assert page.image.dtype == np.uint8 and page.image.ndim == 3 and page.image.shape[2] == 3
    assert page.image.flags.c_contiguous
