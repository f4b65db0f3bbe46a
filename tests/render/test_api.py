"""The public surface: documents, manifests, streaming, fonts, tokens and user errors."""

from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageFont

from glyphserve.errors import ConfigError, EmptyDocumentError
from glyphserve.render import (
    count_pages,
    count_text_tokens,
    estimated_pages,
    iter_pages,
    missing_glyphs_warning,
    preset,
    render_document,
    render_text,
    resolve_config,
    write_rendered,
)
from glyphserve.render.fonts import CharTable, resolve_font

EN = preset("glyph-en")


def long_text(n_lines: int = 200) -> str:
    return "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog, again and again." for i in range(n_lines))


def test_manifest_records_everything(tmp_path):
    text = long_text()
    doc = render_text(text, EN)
    m = doc.manifest()
    assert m["config"]["page-size"] == "595,842" and m["config"]["font-path"] == "Verdana.ttf"
    assert m["font"]["requested"] == "Verdana" and m["font"]["substitute"] is True
    assert m["font"]["used"].endswith("DejaVuSans.ttf")
    totals = m["totals"]
    assert totals["pages"] == len(doc.pages) >= 2
    assert totals["characters"] == len(text)
    assert totals["text_token_method"].startswith("estimate")
    assert totals["vision_tokens"] == sum(p["vision_tokens"] for p in m["pages"])
    assert totals["compression_ratio"] == pytest.approx(totals["text_tokens"] / totals["vision_tokens"], rel=1e-3)
    first = m["pages"][0]
    assert first["file"] == "page_001.png" and first["kind"] == "text"
    assert first["lines"][0] == {"text": text.split("\n")[0], "y": 25.0}
    # char spans tile the text: each page starts where the previous ended
    spans = [p["char_span"] for p in m["pages"]]
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert text[spans[1][0]:].lstrip("\n").startswith(m["pages"][1]["lines"][1]["text"][:20])
    json.dumps(m)  # serialisable

    out = write_rendered(doc, tmp_path / "out")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["manifest.json"] + [f"page_{i:03d}.png" for i in range(1, len(doc.pages) + 1)]
    with Image.open(out / "page_001.png") as img:
        assert img.mode == "L"  # a page with no colour is written grey
        assert np.array_equal(np.asarray(img.convert("RGB")), doc.pages[0].image)
    assert json.loads((out / "manifest.json").read_text())["totals"]["pages"] == len(doc.pages)



def test_text_tokens_estimate_or_tokenizer():
    n, method = count_text_tokens("a" * 400 + "中" * 30)
    assert n == 100 + 20 and "estimate" in method
    assert count_text_tokens("one two three", lambda s: s.split())[0] == 3

    class Tok:
        name_or_path = "toy"

        def encode(self, text, add_special_tokens=False):
            return list(text)

    assert count_text_tokens("abcd", Tok()) == (4, "tokenizer: toy")
    doc = render_text("one two three", EN, tokenizer=lambda s: s.split())
    assert doc.stats.text_tokens == 3 and doc.manifest()["totals"]["text_token_method"].startswith("tokenizer")


def test_iter_pages_streams_the_same_pages():
    text = long_text(250)
    full = render_text(text, EN, workers=1)
    streamed = list(iter_pages(text, EN))
    assert [p.char_span for p in streamed] == [p.char_span for p in full.pages]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(streamed, full.pages))


def test_pool_and_single_process_agree():
    text = long_text(700)
    one = render_text(text, EN, workers=1)
    two = render_text(text, EN, workers=2)
    assert len(one.pages) == len(two.pages) >= 6
    for a, b in zip(one.pages, two.pages):
        assert a.number == b.number and a.char_span == b.char_span
        assert np.array_equal(a.image, b.image)


def test_render_document_with_text_and_scanned_pages():
    from glyphserve.ingest import Document, ImagePart, TextPart

    scan = np.full((3000, 2000, 3), 200, dtype=np.uint8)
    doc = Document(kind="pdf", parts=[TextPart("First page text."), ImagePart(scan, 2), TextPart("Third page.")],
                   source_name="x.pdf", source_bytes=1, encoding=None)
    rendered = render_document(doc, EN)
    kinds = [p.kind for p in rendered.pages]
    assert kinds == ["text", "scan", "text"]
    assert [p.number for p in rendered.pages] == [1, 2, 3]
    scan_page = rendered.pages[1]
    assert scan_page.image.shape[0] <= 842 and scan_page.image.shape[1] <= 595
    assert scan_page.image.shape[0] / scan_page.image.shape[1] == pytest.approx(1.5, rel=0.01)
    # spans index Document.text (text parts joined with a blank line)
    start, end = rendered.pages[2].char_span
    assert doc.text[start:end] == "Third page."
    assert rendered.manifest()["source"] == "x.pdf"
    assert missing_glyphs_warning(rendered) is None
    scanned_only = Document(kind="pdf", parts=[ImagePart(scan, 1)], source_name="s.pdf", source_bytes=1,
                            encoding=None)
    assert missing_glyphs_warning(render_document(scanned_only, EN)) is None  # no text: no characters missing


def test_the_missing_glyphs_advice_names_what_its_reader_can_choose():
    from glyphserve.ingest import Document, TextPart

    doc = Document(kind="text", parts=[TextPart("नमस्ते दुनिया " * 40)], source_bytes=1)  # in no installed font
    rendered = render_document(doc, EN)
    assert "--font PATH" in missing_glyphs_warning(rendered)  # render's flags on the command line
    served = missing_glyphs_warning(rendered, command_line=False)  # a server's user has no such flag
    assert "are not in the font" in served and "--font" not in served and "the model cannot read them" in served
    chinese = render_document(Document(kind="text", parts=[TextPart("中文文本" * 100)], source_bytes=1), EN)
    assert missing_glyphs_warning(chinese, command_line=False).endswith("use the glyph-zh preset")


def test_a_sliver_of_a_scanned_page_is_centred_on_white_up_to_the_models_aspect_limit():
    from glyphserve.glm4v import MAX_ASPECT, vision_tokens
    from glyphserve.ingest import Document, ImagePart

    sliver = np.zeros((2000, 6, 3), dtype=np.uint8)  # a 6 x 2000 pt PDF page: 3 x 842 px on the preset's page
    wide = np.zeros((4, 1200, 3), dtype=np.uint8)
    doc = Document(kind="pdf", parts=[ImagePart(sliver, 1), ImagePart(wide, 2)], source_name="thin.pdf",
                   source_bytes=1, encoding=None)
    tall, flat = render_document(doc, EN).pages
    h, w = tall.image.shape[:2]
    assert h == 842 and w == -(-h // MAX_ASPECT) and h / w <= MAX_ASPECT
    assert tall.vision_tokens == vision_tokens(w, h)  # the processor takes it
    ink = np.flatnonzero(tall.image[h // 2, :, 0] == 0)
    assert len(ink) == 3 and ink[0] == (w - 3) // 2  # the page's own pixels, centred, the rest white
    assert (tall.image[:, :ink[0]] == 255).all() and (tall.image[:, ink[-1] + 1:] == 255).all()
    h, w = flat.image.shape[:2]
    assert w / h <= MAX_ASPECT and flat.vision_tokens == vision_tokens(w, h)


@pytest.mark.parametrize("preset_name, dpi, zh_page, config", [
    ("auto", None, None, None), ("glyph-zh", None, None, None), ("auto", 96, None, None),
    ("auto", None, (420.0, 595.0), None),  # a Glyph clone whose presets' pages differ: a file for each
    ("auto", 96, None, {"page-size": "500,700"}),  # a config's page (render --config)
])
def test_fitted_scans_are_the_pages_their_pixels_render_to(preset_name, dpi, zh_page, config, monkeypatch):
    from glyphserve.ingest import Document, ImagePart, TextPart
    from glyphserve.render import PRESETS, FittedScan, fit_scans

    if zh_page:
        monkeypatch.setitem(PRESETS, "glyph-zh", PRESETS["glyph-zh"].replace(page_size=zh_page))

    rng = np.random.default_rng(7)
    scans = [rng.integers(0, 256, (1684, 1190, 3), dtype=np.uint8),  # a colour A4 scan at 144 dpi: scaled down
             np.full((3000, 2000, 3), 90, dtype=np.uint8),  # grey
             np.zeros((2000, 6, 3), dtype=np.uint8),  # a sliver: centred on white
             rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)]  # smaller than the page: as it is
    read = [ImagePart(scan, n) for n, scan in enumerate(scans, 2)]
    fitted = list(map(fit_scans(preset_name, dpi, config), read))
    assert all(isinstance(part, FittedScan) and part.image is None for part in fitted)
    assert all(len(part.files) == (2 if zh_page else 1) for part in fitted)
    for text in ("English.", "中文"):  # whichever preset auto then picks
        settings = resolve_config(text, preset=preset_name, config=config, dpi=dpi)
        expected = render_document(Document(kind="pdf", parts=[TextPart(text), *read]), settings)
        got = render_document(Document(kind="pdf", parts=[TextPart(text), *fitted]), settings)
        assert got.manifest()["pages"] == expected.manifest()["pages"]
        assert [page.png() for page in got.pages] == [page.png() for page in expected.pages]
        assert all(page.pixels is None for page in got.pages[1:])  # kept as files, never decoded


def test_pages_are_counted_from_the_layout_as_rendering_makes_them():
    from glyphserve.ingest import Document, ImagePart, TextPart

    text = "\n\n".join(f"Paragraph {i}: the mill, the river and the road to town. " * 8 for i in range(60))
    doc = Document(kind="pdf", parts=[TextPart(text), ImagePart(np.full((300, 200, 3), 9, np.uint8), 2),
                                      TextPart("A last page.")], source_name="x.pdf", source_bytes=1, encoding=None)
    pages = len(render_document(doc, EN).pages)
    assert pages >= 5 and count_pages(doc, EN, stop_after=1000) == pages
    assert [count_pages(doc, EN, stop_after=n) for n in (0, 2, pages - 1)] == [1, 3, pages]  # one past, no further
    assert 0.5 < estimated_pages(doc, EN) / pages < 2
    checked = []
    assert count_pages(doc, EN, stop_after=2, check=lambda: checked.append(1)) == 3 and len(checked) == 3

    def out_of_time():
        raise TimeoutError("past the deadline")

    with pytest.raises(TimeoutError):  # a server's deadline ends the count
        count_pages(doc, EN, stop_after=1000, check=out_of_time)


def test_a_document_far_over_the_page_limit_is_counted_from_its_first_pages():
    from glyphserve.ingest import Document, TextPart

    ZH = preset("glyph-zh")
    counts = []
    for text, config in [("A" * (40 << 20), EN), ("x" + "\n" * (40 << 20), EN), ("中文&" * (1 << 20), ZH)]:
        doc = Document(kind="text", parts=[TextPart(text)], source_bytes=len(text))
        tracemalloc.start()
        try:
            counts.append(count_pages(doc, config, 100))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB"  # (laid out whole, 40 MiB of "A" took 4.9 GB)
        assert estimated_pages(doc, config) > 500 / 4  # (what makes a server with the default limit count them)
    # the last: every page re-wraps what the page before it carried over (80 s to the 500th page of a 1 MB
    # line), so its characters tell instead that it has more pages than that
    assert counts == [101, 101, 101]


def test_rendering_past_a_page_limit_stops_without_laying_out_the_rest():
    from glyphserve.ingest import Document, TextPart

    class Limit(Exception):
        pass

    def progress(done):
        if done > 3:
            raise Limit

    doc = Document(kind="text", parts=[TextPart("word " * (8 << 20))], source_bytes=40 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(Limit):
            render_document(doc, EN, workers=1, progress=progress)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB"


def test_render_ingested_file(tmp_path):
    from glyphserve.ingest import ingest_path

    path = tmp_path / "notes.md"
    path.write_text("# Title\n\nSome *markdown* text.\n", encoding="utf-8")
    rendered = render_document(ingest_path(path), EN)
    assert rendered.pages[0].lines[0].text == "# Title"


def test_fallback_fonts_cover_what_the_main_font_lacks():
    en = CharTable(resolve_font(EN.font_path).face, fallback=True)
    zh = CharTable(resolve_font(preset("glyph-zh").font_path).face, fallback=True)
    assert en["a"][1] == 0 and en["中"][1] > 0 and en["中"][0] > 0  # Han in English text -> Noto CJK
    assert zh["中"][1] == 0 and zh["✈"][1] > 0 and zh["𝔸"][1] > 0  # symbols Noto CJK lacks -> DejaVu
    # drawn with the fallback's glyphs, not as missing-glyph boxes: "中" in English text
    # comes out exactly as with the Chinese preset, whose main font is that fallback
    fallback = render_text("中文", EN.replace(fallback_fonts=True), workers=1)
    native = render_text("中文", preset("glyph-zh"), workers=1).pages[0].image
    assert np.array_equal(fallback.pages[0].image, native)
    # the manifest counts as missing only what is drawn as a box: here nothing (before, what the main font lacks)
    assert fallback.pages[0].missing_chars == fallback.stats.missing_chars == 0
    boxes = render_text("中文", EN, workers=1)
    assert boxes.pages[0].missing_chars == boxes.stats.missing_chars == 2 and boxes.stats.missing_examples


def test_zh_substitute_is_the_half_width_noto_face():
    font = resolve_font(preset("glyph-zh").font_path)
    assert font.substitute and font.manifest()["name"] == "Noto Sans Mono CJK SC"
    pil = ImageFont.truetype(font.face.path, 12, index=font.face.index)
    assert pil.getname()[0] == "Noto Sans Mono CJK SC"


def test_widths_equal_reportlab_string_width():
    pytest.importorskip("reportlab")
    from reportlab.pdfbase.pdfmetrics import registerFont, stringWidth
    from reportlab.pdfbase.ttfonts import TTFont

    from glyphserve.render.fonts import metrics

    face = resolve_font(EN.font_path).face
    registerFont(TTFont("test-dejavu", face.path))
    m = metrics(face)
    sample = "The quick brown fox, 1234567890 — ¿Qué? «ça» \xa0ẞ"
    for ch in sample:
        assert 0.001 * 9 * m.width(ord(ch)) == stringWidth(ch, "test-dejavu", 9)


@pytest.mark.parametrize("preset_name", ["glyph-en", "glyph-zh"])
def test_widths_read_with_freetype_equal_the_fonts_tables(preset_name):
    from fontTools.ttLib import TTFont

    from glyphserve.render.fonts import metrics

    face = resolve_font(preset(preset_name).font_path).face
    tt = TTFont(face.path, fontNumber=face.index, lazy=True)
    cmap, hmtx, upm = tt.getBestCmap(), tt["hmtx"], tt["head"].unitsPerEm
    m = metrics(face)
    for code in sorted(cmap)[::7]:
        assert m.has(code) and m.width(code) == pytest.approx(hmtx[cmap[code]][0] * 1000 / upm, abs=1e-9)
    assert not m.has(0xE000) and m.width(0xE000) == hmtx[tt.getGlyphOrder()[0]][0] * 1000 / upm


def test_user_errors():
    with pytest.raises(EmptyDocumentError):
        render_text("  \n\t ", EN)
    with pytest.raises(ConfigError, match="font file not found"):
        render_text("hello", EN.replace(font_path="/no/such/font.ttf"))
    with pytest.raises(ConfigError, match="not a readable"):
        bad = resolve_config("x", font=__file__)
        render_text("hello", bad)


def test_workers_asked_for_are_capped_at_the_cores_and_the_pages():
    from glyphserve.render.renderer import _worker_count

    assert _worker_count(100_000, "One short line.", EN) == 1  # one page: one process, however many asked
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    assert _worker_count(100_000, long_text(700), EN) == cores


def test_a_render_worker_that_dies_is_an_error_at_once_and_the_next_render_works():
    """A worker killed mid-render (out of memory), or one that never starts (a script without a main guard, whose
    workers import it again): the render spun forever at full CPU waiting for its replies."""
    import signal
    import threading
    import time

    from glyphserve.errors import RenderWorkerError
    from glyphserve.render import workers as pool_module

    text = long_text(400)
    render_text(text, EN, workers=2)  # the pool exists
    pool = pool_module._POOL

    def kill_when_busy():
        deadline = time.monotonic() + 30
        while not any(pool.outstanding) and time.monotonic() < deadline:
            time.sleep(0.001)
        for proc in pool.procs:
            os.kill(proc.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    with pytest.raises(RenderWorkerError, match="main guard|__main__"):
        render_text(text, EN, workers=2)
    killer.join()
    assert len(render_text(text, EN, workers=2).pages) == len(render_text(text, EN, workers=1).pages)


def test_a_pool_whose_pipe_broke_is_replaced_even_before_its_dead_worker_is_reaped():
    """CI: the render after a worker died reused the pool (the killed process not yet reaped read as alive) and
    failed with a raw BrokenPipeError on its first send."""
    import signal

    from glyphserve.errors import RenderWorkerError
    from glyphserve.render.workers import WorkerPool, worker_pool

    pool = WorkerPool(1)
    try:
        os.kill(pool.procs[0].pid, signal.SIGKILL)
        pool.procs[0].join(timeout=10)
        with pytest.raises(RenderWorkerError, match="main guard|__main__"):
            pool.send(0, len, "abc")
        assert not pool.alive and pool.outstanding == [0]
    finally:
        pool.close()

    pool = worker_pool(1)
    pool.broken = True  # as after a failed send or receive, whatever the processes' state
    assert worker_pool(1) is not pool and worker_pool(1).alive
