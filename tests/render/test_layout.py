"""Line filling: properties of the layout engine, and line for line equality with reportlab."""

from __future__ import annotations

import tracemalloc
from contextlib import contextmanager
from itertools import islice

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glyphserve.render import MARKER_MARKUP, preset
from glyphserve.render.config import has_cjk
from glyphserve.render.fonts import CharTable, WidthMap, resolve_font
from glyphserve.render.layout import break_paragraph, fills_pages, paginate
from glyphserve.render.lines import LayoutContext
from glyphserve.render.text import paragraph_ranges, prepare

EN = preset("glyph-en")
ZH = preset("glyph-zh")


def layout_context(text: str, config=EN) -> LayoutContext:
    return LayoutContext(config, WidthMap(CharTable(resolve_font(config.font_path).face)), has_cjk(text))


def our_line_breaks(text: str, config=EN) -> list[list[str]]:
    ctx = layout_context(text, config)
    prepared = prepare(text)
    return [[ln.text.rstrip(" ") for ln in break_paragraph(prepared, a, b, ctx).lay_out()]
            for a, b in paragraph_ranges(prepared)]


# ---------------------------------------------------------------- strategies

ascii_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJ.,;'()-0123456789", min_size=1, max_size=14)
long_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=90, max_size=260)
odd_word = st.sampled_from(["&", "<b>", "R&D", "a>b", "café\xa0au", "\u00e9t\u00e9", "x\xa0", "[12]"])
separator = st.sampled_from([" "] * 12 + ["  ", "   ", "\t", " \u3000 "])


@st.composite
def western_line(draw, words=ascii_word):
    n = draw(st.integers(0, 70))
    parts = []
    for _ in range(n):
        parts.append(draw(words))
        parts.append(draw(separator))
    return "".join(parts[:-1]) if parts and draw(st.booleans()) else "".join(parts)


@st.composite
def western_text(draw, words=ascii_word, max_lines=40):
    return "\n".join(draw(st.lists(western_line(words), min_size=1, max_size=max_lines)))


mixed_words = st.one_of(ascii_word, ascii_word, ascii_word, ascii_word, long_word, odd_word)
han = st.characters(min_codepoint=0x4E00, max_codepoint=0x4F00)
cjk_piece = st.one_of(han, han, han, han, st.sampled_from(list("，。、！？：；）（“”") + [" ", "  ", "&", "<"]),
                      ascii_word.map(lambda w: f" {w} "), long_word)
cjk_text = st.lists(st.lists(cjk_piece, max_size=300).map("".join), min_size=1, max_size=35).map("\n".join)

ref_settings = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------- equality with reportlab


@pytest.mark.usefixtures("reference_available")
@ref_settings
@given(text=western_text(mixed_words), marker=st.booleans(), indent=st.sampled_from([0, 0, 12.5]))
def test_western_line_breaks_equal_reportlabs(text, marker, indent):
    from glyphserve.render.reference import reference_line_breaks

    cfg = EN.replace(first_line_indent=indent, newline_markup=MARKER_MARKUP if marker else "<br/>")
    assert our_line_breaks(text, cfg) == reference_line_breaks(text, cfg)


@pytest.mark.usefixtures("reference_available")
@ref_settings
@given(text=cjk_text, marker=st.booleans())
def test_cjk_line_breaks_equal_reportlabs(text, marker):
    from glyphserve.render.reference import reference_line_breaks

    text = "中" + text  # CJK wrapping is chosen for the whole document by any Han character
    cfg = ZH.replace(newline_markup=MARKER_MARKUP if marker else "<br/>")
    assert our_line_breaks(text, cfg) == reference_line_breaks(text, cfg)


# ------------------------------------------------------------ properties


@settings(max_examples=150, deadline=None)
@given(text=western_text(st.one_of(ascii_word, ascii_word, ascii_word, long_word)))
def test_line_filling_properties(text):
    ctx = layout_context(text)
    prepared = prepare(text)
    sw = ctx.space
    all_text = []
    for a, b in paragraph_ranges(prepared):
        lines = break_paragraph(prepared, a, b, ctx).lay_out()
        for i, line in enumerate(lines):
            all_text.append(line.text)
            # no line is wider than the frame, except by reportlab's 5% space shrinkage
            if line.word_count > 1:
                assert line.extra >= -0.05 * sw * line.word_count - 1e-9
            # greedy: the next line's first word would not have fitted on this one
            nxt = lines[i + 1] if i + 1 < len(lines) else None
            if nxt is not None and not line.hard_break and line.text and nxt.text:
                first = nxt.text.split(" ")[0]
                whole = f" {first} " in f" {text.replace(chr(10), ' ')} ".replace("\xa0", " ")
                if whole and ctx.word_width(first.replace("\xa0", " ")) <= ctx.later_width:
                    used = line.max_width - line.extra
                    limit = line.max_width + 0.05 * sw * line.word_count
                    assert used + sw + ctx.word_width(first.replace("\xa0", " ")) > limit - 1e-9
    # concatenating the lines gives back the text (whitespace normalised away)
    assert "".join(all_text).replace(" ", "").replace("\xa0", "") == "".join(text.split())


def test_break_markup_edge_cases():
    # a trailing empty source line adds no line; an empty middle line does
    assert our_line_breaks("a\n") == [["a"]]
    assert our_line_breaks("a\n\nb") == [["a", "", "b"]]
    # a paragraph that is a lone <br/> draws nothing
    assert our_line_breaks("\n") == [[]]
    # 31 source lines: two paragraphs
    assert [len(p) for p in our_line_breaks("\n".join("x" * 31))] == [30, 1]


def test_cjk_kinsoku_keeps_closing_punctuation_on_the_line():
    ctx = layout_context("中", ZH)
    per_line = int(ctx.later_width // (ctx.k * ctx.widths["中"]))
    # "。" may not start a line (reportlab's list; "，" is not on it)
    lines = our_line_breaks("中" * per_line + "。後", ZH)[0]
    assert lines[0].endswith("。") and lines[1] == "後"
    lines = our_line_breaks("中" * per_line + "，後", ZH)[0]
    assert lines[1] == "，後"


def test_page_split_quirks_of_reportlab():
    # reportlab resumes a split paragraph at the <br/> ending its last kept line: the
    # continuation starts with an empty line (pages of 81 lines at the released settings)
    text = "\n".join(f"line {i} text" for i in range(120))
    ctx = layout_context(text)
    pages = list(paginate(prepare(text), ctx))
    first = [ln.text for _, _, ln in pages[0].lines]
    second = [ln.text for _, _, ln in pages[1].lines]
    assert len(first) == 81 and first[-1] == "line 80 text"
    assert second[0] == "" and second[1] == "line 81 text"


# ------------------------------------------------------- long paragraphs, lazily


def page_lines(text: str, config) -> list[list[tuple]]:
    ctx = layout_context(text, config)
    return [[(ln.text, ln.extra, ln.max_width, ln.word_count, bool(ln.hard_break), ln.red, ln.source_end())
             for _, _, ln in page.lines] for page in paginate(prepare(text), ctx)]


@contextmanager
def small_windows(plain: int = 4):
    """Every window the layout reads a long paragraph in, a few characters or lines wide (``plain``: those of
    ``western.plain_line``)."""
    from glyphserve.render import cjk, layout, lines, text, western

    sizes = {(cjk, "CHUNK"): 7, (cjk, "_BATCH"): 2, (layout, "PLAIN_MAX"): 0,
             (western, "_LONG_WORD"): 5, (western, "_PLAIN_WINDOW"): plain,
             (lines, "_STRIP_CHUNK"): 2, (text, "_REMOVED_CHUNK"): 3}
    saved = {key: getattr(*key) for key in sizes}
    for (module, name), size in sizes.items():
        setattr(module, name, size)
    try:
        yield
    finally:
        for (module, name), size in saved.items():
            setattr(module, name, size)


SMALL_PAGE = {"page_size": (300.0, 120.0)}  # six lines: paragraphs continue page after page


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=western_text(mixed_words), marker=st.booleans(), indent=st.sampled_from([0, 12.5]),
       soft=st.sampled_from(["", "\xad", "\u200b"]))
def test_western_layout_in_small_windows_is_the_layout_whole(text, marker, indent, soft):
    cfg = EN.replace(first_line_indent=indent, newline_markup=MARKER_MARKUP if marker else "<br/>", **SMALL_PAGE)
    text = text.replace("e", "e" + soft)
    whole = page_lines(text, cfg)
    with small_windows():
        assert page_lines(text, cfg) == whole


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(words=st.lists(st.one_of(ascii_word, ascii_word, long_word), min_size=1, max_size=150),
       window=st.sampled_from([4, 37, 150]))
def test_one_long_line_in_small_windows_is_the_line_whole(words, window):
    cfg = EN.replace(**SMALL_PAGE)
    text = " ".join(words)
    whole = page_lines(text, cfg)
    with small_windows(window):
        assert page_lines(text, cfg) == whole


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=cjk_text, marker=st.booleans())
def test_cjk_layout_in_small_windows_is_the_layout_whole(text, marker):
    cfg = ZH.replace(newline_markup=MARKER_MARKUP if marker else "<br/>", **SMALL_PAGE)
    text = "中" + text
    whole = page_lines(text, cfg)
    with small_windows():
        assert page_lines(text, cfg) == whole


def test_a_cjk_chunk_never_takes_one_space_of_a_run_of_spaces():
    # "\t\t" is one unit, so the first chunk leaves room for one more character: the first space of a run of 12
    # (all U+00A0) was cut off into a chunk of its own, where it was a lone space (U+0020)
    from glyphserve.render import cjk

    text = "中\t\t" + "中" * (cjk.CHUNK - 5) + " " * 12 + "中" * 50
    drawn = "".join(line[0] for page in page_lines(text, ZH) for line in page)
    assert drawn.count("\xa0") == 12 and drawn.count(" ") == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=cjk_text, marker=st.booleans(), height=st.sampled_from([60.0, 120.0, 842.0]))
def test_cjk_pages_proved_from_the_characters_are_never_more_than_the_layout_makes(text, marker, height):
    cfg = ZH.replace(newline_markup=MARKER_MARKUP if marker else "<br/>", page_size=(300.0, height))
    text = "中" + text
    ctx = layout_context(text, cfg)
    pages = sum(1 for _ in islice(paginate(prepare(text), ctx), 300))
    assert pages == 300 or not fills_pages(prepare(text), ctx, pages + 1)


# 40 MiB texts as a hostile upload would send them (each made when its test runs)
HUGE = {
    "a line without spaces": (lambda: "A" * (40 << 20), EN),
    "a line of words": (lambda: "word " * (8 << 20), EN),
    "empty lines": (lambda: "x" + "\n" * (40 << 20), EN),
    "CJK without spaces": (lambda: "中" * (13 << 20), ZH),
    "CJK with spaces": (lambda: "中文 text " * (4 << 20), ZH),
    "CJK with entities": (lambda: "中文&" * (13 << 20), ZH),
}


@pytest.mark.parametrize("name", HUGE)
def test_a_huge_text_is_laid_out_only_as_far_as_its_pages_go(name):
    make, config = HUGE[name]
    text = make()
    ctx = layout_context(text, config)
    tracemalloc.start()
    try:
        pages = list(islice(paginate(prepare(text), ctx), 12))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(pages) == 12 and all(len(list(page.lines)) > 5 for page in pages)
    # a copy of a huge word at most (laid out whole, the line without spaces took 4.9 GB)
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB"
