"""The cases where a renderer most easily parts from Glyph's official one, each checked against
the reference pipeline (reportlab + pdftoppm, run for real) on English and Chinese text, with
both newline modes and at dpi 72 and 96: characters the font lacks (drawn as its missing-glyph
box, or from fallback fonts when asked), the background every 30-line paragraph paints over
the descenders above it, control characters, runs of spaces, and marker-mode page widths."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tests.render.render_helpers import compare

from glyphserve.render import MARKER_MARKUP, preset, render_text
from glyphserve.render.fonts import CharTable, resolve_font

pytestmark = pytest.mark.usefixtures("reference_available")

WORDS = "glyph page jumpy quirky gypsy pygmy foggy queue happy yoga the of and to render pixels".split()
# Lacked by every main font here: Devanagari, Thai, a private-use character. Lacked by Verdana or
# DejaVu Sans (the English font) but found in a fallback: Hangul, kana. Lacked by the Chinese font:
# Hebrew, Arabic, an emoji (found in DejaVu Sans). Lacked by Verdana alone: the rest.
MISSING = ["क", "ก", "\ue000", "가", "あ", "שלום", "مرحبا", "\U0001F600", "non\u2010breaking", "→", "⇒", "☃"]
CONTROLS = ["\x07", "\x1b", "\x00", "\x7f", "\x9f", "\ufeff", "\u200e", "\x0b", "\x0c", "\x85", "\x1f", "\r"]
CHINESE = "长文本压缩把文字渲染成图片再由视觉语言模型阅读每一页都与官方渲染器相同"


def _line(rng: random.Random, extra: list[str], share: float, words: int) -> str:
    return " ".join(rng.choice(extra) if rng.random() < share else rng.choice(WORDS) for _ in range(words))


def missing_glyphs(rng: random.Random) -> str:
    return "\n".join(_line(rng, MISSING, 0.3, rng.randint(3, 25)) for _ in range(35))


def paragraph_backgrounds(rng: random.Random) -> str:
    # descenders on every line, across the boundaries of three paragraphs (30 source lines each)
    return "\n".join("gjpqy " + _line(rng, ["jpg", "ygg"], 0.5, rng.randint(1, 8)) for _ in range(65))


def control_characters(rng: random.Random) -> str:
    lines = [_line(rng, CONTROLS, 0.3, rng.randint(2, 20)) for _ in range(34)]
    return "\n".join(lines[:-3] + ["\x07" * 40, "\x07 \x1b\x07 x", "\x00start and end\x07"])


def space_runs(rng: random.Random) -> str:
    # runs of 2 to 7 spaces become &nbsp; runs; lines that overflow into reportlab's space
    # shrinkage get a negative word spacing, which applies to them too
    def line() -> str:
        parts = [rng.choice(WORDS) for _ in range(rng.randint(2, 30))]
        return "".join(p + " " * rng.choice([1, 1, 1, 2, 3, 7]) for p in parts)
    return "\n".join(([" " * rng.randint(0, 6)] * 2 + [line()])[rng.randint(0, 2)] + line() for _ in range(34))


def right_edge(rng: random.Random) -> str:
    # long lines that reach the frame's right edge (where the crop measures the page width)
    return "\n".join(_line(rng, ["gypsy", "WWW", "jjj"], 0.2, rng.randint(20, 60)) for _ in range(14))


CASES = {
    "missing-glyphs": (missing_glyphs, False),
    "missing-glyphs-fallback": (missing_glyphs, True),
    "paragraph-backgrounds": (paragraph_backgrounds, False),
    "control-characters": (control_characters, False),
    "space-runs": (space_runs, False),
    "marker-widths": (right_edge, False),
}


def case_text(case: str, language: str) -> str:
    make, _ = CASES[case]
    text = make(random.Random(case))
    if language == "zh":  # Chinese sentences on every other line: CJK wrapping, Chinese font
        rng = random.Random(case + "zh")
        lines = text.split("\n")
        text = "\n".join(line if i % 2 else "".join(rng.sample(CHINESE, 20)) + line for i, line in enumerate(lines))
    return text


@pytest.mark.parametrize(("newline", "dpi"), [("br", 72), ("marker", 72), ("br", 96), ("marker", 96)])
@pytest.mark.parametrize("language", ["en", "zh"])
@pytest.mark.parametrize("case", list(CASES))
def test_case_equals_the_reference(case, language, newline, dpi):
    fallback = CASES[case][1]
    config = preset(f"glyph-{language}").replace(
        dpi=dpi, newline_markup=MARKER_MARKUP if newline == "marker" else "<br/>", fallback_fonts=fallback)
    # English: the same pixels but for rounding; Noto Sans CJK (the Chinese font, and a fallback)
    # has CFF outlines that go through cu2qu for reportlab, which moves a few edge pixels a little
    compare(case_text(case, language), config, max_diff=80 if language == "zh" or fallback else 8)


def test_missing_glyphs_are_boxes_with_the_fonts_advance_and_are_counted():
    text = "a\u0915b\ue000c \x07 d"
    config = preset("glyph-zh").replace(font_path=preset("glyph-en").font_path)  # Western text, English font
    table = CharTable(resolve_font(config.font_path).face)
    doc = render_text(text, config, workers=1)
    page = doc.pages[0]
    assert page.lines[0].text == text  # nothing dropped, nothing collapsed
    lacking = [ch for ch in text if table.lacks(ch)]
    assert page.missing_chars == len(lacking) >= 3
    assert doc.manifest()["pages"][0]["missing_chars"] == len(lacking)
    assert doc.manifest()["totals"]["missing_chars"] == len(lacking)
    assert "U+E000 \ue000" in doc.manifest()["totals"]["missing_examples"]
    # each is drawn with the font's glyph 0: the same ink for every one of them
    box = render_text("\ue000", config, workers=1).pages[0].image
    assert np.array_equal(render_text("\x07", config, workers=1).pages[0].image, box)
    assert (box < 128).any()


def test_fallback_fonts_draw_what_the_main_font_lacks_from_another_font():
    config = preset("glyph-en")
    default = CharTable(resolve_font(config.font_path).face)
    fallback = CharTable(resolve_font(config.font_path).face, fallback=True)
    assert default["あ"][1] == 0 and fallback["あ"][1] > 0  # kana: a box, or Noto Sans CJK's glyph
    assert fallback["\ue000"][1] == 0  # no font has it: still the box
    boxes = render_text("あいう", config, workers=1)
    drawn = render_text("あいう", config.replace(fallback_fonts=True), workers=1)
    # missing_chars counts boxes: all three without fallbacks, none drawn from one, the private-use one still
    assert boxes.pages[0].missing_chars == 3 and drawn.pages[0].missing_chars == 0
    assert render_text("あ\ue000", config.replace(fallback_fonts=True), workers=1).stats.missing_chars == 1
    assert not np.array_equal(boxes.pages[0].image, drawn.pages[0].image)
    assert drawn.manifest()["config"]["fallback-fonts"] is True
