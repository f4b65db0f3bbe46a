"""Rendering legibility: Tesseract reads a small rendered page back (skipped without Tesseract)."""

from __future__ import annotations

import pytest

from glyphserve.eval import ocr
from glyphserve.eval.metrics import character_error_rate
from glyphserve.render import render_text, resolve_config

LANGUAGES = ocr.tesseract_languages()


@pytest.mark.skipif("eng" not in LANGUAGES, reason="tesseract with English data is not installed")
def test_small_english_page_reads_back_at_96_dpi():
    text = "The quiet engineer carried a wooden lantern across the northern valley.\n" * 3
    (page,) = render_text(text, resolve_config(text, preset="glyph-en", dpi=96)).pages
    reference = ocr.page_reference(page)
    assert reference.split("\n")[0].startswith("The quiet engineer")
    read = ocr.ocr_image(page.image, "eng", upscale=2)
    assert character_error_rate(read, reference) < 0.05


@pytest.mark.skipif("chi_sim" not in LANGUAGES, reason="tesseract with chi_sim data is not installed")
def test_small_chinese_page_reads_back():
    text = "我们今天参观了古老的图书馆，大家都非常喜欢这个安静的地方。"
    (page,) = render_text(text, resolve_config(text, preset="glyph-zh", dpi=96)).pages
    read = ocr.ocr_image(page.image, "chi_sim", upscale=2)
    assert character_error_rate(read, ocr.page_reference(page), zh=True) < 0.15


def test_missing_language_data_is_a_clear_error():
    if not LANGUAGES:
        with pytest.raises(ocr.OCRUnavailableError, match="apt-get install tesseract-ocr"):
            ocr.require_tesseract({"eng"})
    else:
        with pytest.raises(ocr.OCRUnavailableError, match="tesseract-ocr-xx-fake"):
            ocr.require_tesseract({"xx_fake"})
