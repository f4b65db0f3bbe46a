"""The fast renderer against the official pipeline run for real (reportlab + pdftoppm) on real
texts and every official setting: same pages, same line breaks, same pixels (SSIM >= 0.99)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.render.render_helpers import compare, corpus_excerpt

from glyphserve.bench.workloads import make_workload_text
from glyphserve.render import MARKER_MARKUP, FontSubstituteWarning, preset, render_text, resolve_config

pytestmark = pytest.mark.usefixtures("reference_available")

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


@pytest.mark.parametrize("dpi", [72, 96])
@pytest.mark.parametrize("newline", ["br", "marker"])
def test_english(dpi, newline):
    cfg = preset("glyph-en").replace(dpi=dpi, newline_markup=MARKER_MARKUP if newline == "marker" else "<br/>")
    compare(english_text(), cfg, max_diff=8)  # unhinted FreeType at Splash's positions: the same pixels but for rounding


@pytest.mark.parametrize("dpi", [72, 96])
def test_chinese(dpi):
    # Noto Sans CJK is CFF: the reference converts it to TrueType outlines (cu2qu), so a
    # few edge pixels differ a little from drawing the CFF outlines directly.
    compare(chinese_text(), preset("glyph-zh").replace(dpi=dpi), max_diff=80)


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
    text = english_text()[:5000]
    with pytest.warns(FontSubstituteWarning, match="Verdana.ttf"):  # no ../config/Verdana.ttf here
        config = resolve_config(text, config=path, allow_font_substitute=True)
    assert (config.dpi, config.margin_x, config.first_line_indent) == (96, 20, 14)
    compare(text, config)


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
    compare(english_text()[:2500], cfg, max_diff=8)


def test_fast_images_are_plain_rgb_arrays():
    page = render_text("Hello, Glyph.", preset("glyph-en"), workers=1).pages[0]
    assert page.image.dtype == np.uint8 and page.image.ndim == 3 and page.image.shape[2] == 3
    assert page.image.flags.c_contiguous
