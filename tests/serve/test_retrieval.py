"""Where a passage sits on the rendered pages (the extractive backend's citations)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from glyphserve.serve.retrieval import PageLayout, crop_rows, pages_for_span


def test_pages_for_span_and_crop_rows_on_a_synthetic_page():
    source = "alpha beta\ngamma delta\nepsilon zeta\neta theta"
    lines = [("alpha beta", 20.0), ("gamma delta", 40.0), ("epsilon zeta", 60.0), ("eta theta", 80.0)]
    pages = [PageLayout(1, (0, 23), lines[:2], 50), PageLayout(2, (23, len(source)), lines[2:], 100)]
    start = source.index("epsilon")
    assert pages_for_span(pages, start, start + 12) == [2]
    assert pages_for_span(pages, 0, len(source)) == [1, 2]
    page = PageLayout(1, (0, len(source)), lines, 100)
    top, bottom = crop_rows(page, source, start, start + len("epsilon zeta"))
    assert top < 60 < bottom < 80 and top > 40


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract-ocr is not installed")
def test_crop_of_a_rendered_page_shows_the_passage(tmp_path):
    from PIL import Image

    from glyphserve.render import render_text, resolve_config

    text = "\n\n".join(f"Paragraph {i}: " + "filler words about nothing much " * 6 for i in range(30))
    text += "\n\nThe secret harbour code is LIGHTHOUSE.\n\n" + "\n\n".join(f"Tail {i} " * 30 for i in range(10))
    rendered = render_text(text, resolve_config(text, preset="glyph-en", dpi=96))
    pages = [PageLayout(p.number, tuple(p.char_span), [(ln.text, ln.y) for ln in p.lines], p.image.shape[0])
             for p in rendered.pages]
    start = text.index("The secret harbour")
    end = start + len("The secret harbour code is LIGHTHOUSE.")
    (number, *_) = pages_for_span(pages, start, end)
    top, bottom = crop_rows(pages[number - 1], text, start, end)
    assert bottom - top < 80  # a row or two, not the page
    crop = Image.fromarray(rendered.pages[number - 1].image[top:bottom])
    crop = crop.resize((crop.width * 2, crop.height * 2))
    crop.save(tmp_path / "crop.png")
    ocr = subprocess.run(["tesseract", str(tmp_path / "crop.png"), "-", "--psm", "6"],
                         capture_output=True, text=True, check=True).stdout
    assert "LIGHTHOUSE" in ocr


def test_an_extractive_answer_cut_to_max_tokens_cites_what_it_keeps():
    """Three passages cut to a client's max_tokens: the passages it keeps whole, the last at a word, and their
    citations; a passage cut down to its page label is left out with its citation; not sent, all of them."""
    from glyphserve.engine.types import AnswerRequest
    from glyphserve.render import count_text_tokens, render_text, resolve_config
    from glyphserve.serve.backends import ChatJob, ExtractiveBackend

    text = "\n\n".join(f"The harbour keeps boat {i} in basin {i}, " + "beside the old mill and the tower " * 4
                       for i in range(3))
    rendered = render_text(text, resolve_config(text, preset="glyph-en", dpi=96))
    pages = [PageLayout(p.number, tuple(p.char_span), [(ln.text, ln.y) for ln in p.lines], p.image.shape[0])
             for p in rendered.pages]
    backend = ExtractiveBackend(None)

    def ask(limit):
        return backend.answer(ChatJob(AnswerRequest(pages=[], question="Which harbour basin keeps the boat?"),
                                      context=text, context_pages=pages, answer_tokens=limit))

    whole = ask(None)
    assert whole.answer.finish_reason == "stop" and len(whole.citations) == 3
    pieces = whole.answer.text.split("\n\n")
    for limit in range(1, count_text_tokens(whole.answer.text)[0] + 1):
        reply = ask(limit)
        kept = reply.answer.text.split("\n\n") if reply.answer.text else []
        assert count_text_tokens(reply.answer.text)[0] <= limit and reply.answer.finish_reason == (
            "stop" if kept == pieces else "length")
        assert not kept or kept[:-1] == pieces[: len(kept) - 1] and pieces[len(kept) - 1].startswith(kept[-1])
        assert [c.start for c in reply.citations] == [c.start for c in whole.citations[: len(kept)]]
        assert all(len(k) > len("[page 1] ") for k in kept)
