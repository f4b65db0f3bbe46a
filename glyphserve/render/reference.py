"""Reference mode: Glyph's official pipeline, run for real (reportlab -> PDF -> pdftoppm).

This reproduces ``word2png_function.py`` of thu-coai/Glyph step by step so the fast
renderer can be checked against it (tests) and timed against it (benchmark). It is a
test/benchmark dependency (reportlab, pdf2image + poppler-utils, fontTools), imported
lazily and never used on the serving path. Besides the page images it reports reportlab's
own line breaks (the text and baseline of every line of every page).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from glyphserve.render.config import RenderConfig, has_cjk
from glyphserve.render.crop import crop_page
from glyphserve.render.fonts import FontFace, resolve_font
from glyphserve.render.text import LINES_PER_PARAGRAPH

RASTER_BATCH = 20  # the official script rasterises 20 pages per pdftoppm call
_ASCII = frozenset(map(chr, range(0x20, 0x7F))) | {"\xa0"}


@dataclass
class ReferenceLine:
    text: str  # what reportlab draws on the line (trailing spaces dropped)
    y: float  # baseline, px from the top of the page image


@dataclass
class ReferencePage:
    image: np.ndarray  # HxWx3 uint8, cropped like the official script
    lines: list[ReferenceLine] = field(default_factory=list)


@dataclass
class ReferenceDocument:
    pages: list[ReferencePage]
    seconds: float  # wall time of the whole pipeline
    layout_seconds: float  # reportlab alone (PDF bytes ready)
    font_file: str  # the TrueType file reportlab used (a converted subset for CFF fonts)


def render_reference(text: str, config: RenderConfig, *, font_face: FontFace | None = None,
                     out_dir: str | Path | None = None) -> ReferenceDocument:
    """Render ``text`` exactly like the official Glyph script (pages, crops and line breaks);
    with ``out_dir``, also write the pages there as it does (``page_001.png``, ..., Pillow's
    default PNG settings)."""
    from pdf2image import convert_from_bytes, pdfinfo_from_bytes
    from PIL import Image
    from reportlab.lib import colors
    from reportlab.platypus import Paragraph, SimpleDocTemplate

    t0 = time.perf_counter()
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    face = font_face or resolve_font(config.font_path).face
    font_name, font_file = _register_font(face, text, config.fallback_fonts)
    page_w, page_h = config.page_size
    story = _paragraphs(text, config, font_name)

    scale = config.scale
    recorded: dict[int, list[ReferenceLine]] = {}

    class _RecordingDoc(SimpleDocTemplate):
        def afterFlowable(self, flowable):  # noqa: N802 (reportlab's hook name)
            if not isinstance(flowable, Paragraph) or not hasattr(flowable, "blPara"):
                return
            top = self.frame._y + flowable.getSpaceAfter() + flowable.height
            first_baseline = top - flowable.style.fontSize
            out = recorded.setdefault(self.page, [])
            for i, line in enumerate(flowable.blPara.lines):
                baseline = first_baseline - i * flowable.style.leading
                out.append(ReferenceLine(_line_text(line), (page_h - baseline) * scale))

    bg = colors.HexColor(config.page_bg_color)

    def paint_bg(canvas, _doc):
        canvas.saveState()
        canvas.setFillColor(bg)
        canvas.rect(0, 0, page_w, page_h, stroke=0, fill=1)
        canvas.restoreState()

    buf = io.BytesIO()
    doc = _RecordingDoc(buf, pagesize=(page_w, page_h), leftMargin=config.margin_x, rightMargin=config.margin_x,
                        topMargin=config.margin_y, bottomMargin=config.margin_y)
    doc.build(story, onFirstPage=paint_bg, onLaterPages=paint_bg)
    pdf = buf.getvalue()
    t_layout = time.perf_counter() - t0

    total = int(pdfinfo_from_bytes(pdf)["Pages"])
    pages: list[ReferencePage] = []
    for start in range(1, total + 1, RASTER_BATCH):
        end = min(start + RASTER_BATCH - 1, total)
        for number, img in enumerate(convert_from_bytes(pdf, dpi=config.dpi, first_page=start, last_page=end), start):
            if config.horizontal_scale != 1.0:
                img = img.resize((int(img.width * config.horizontal_scale), img.height))
            arr = crop_page(np.asarray(img.convert("RGB")), config, last=number == total)
            pages.append(ReferencePage(arr, recorded.get(number, [])))
            if out_dir is not None:
                Image.fromarray(arr).save(Path(out_dir) / f"page_{number:03d}.png", "PNG")
    return ReferenceDocument(pages, time.perf_counter() - t0, t_layout, font_file)


def reference_line_breaks(text: str, config: RenderConfig) -> list[list[str]]:
    """reportlab's lines for each Paragraph of ``text`` (every 30 source lines), as if the
    page were endless: line breaking alone, without pagination, PDF or rasteriser."""
    from glyphserve.render.lines import frame_geometry

    name, _ = _register_font(resolve_font(config.font_path).face, text, config.fallback_fonts)
    width = frame_geometry(config)[3]
    out = []
    for para in _paragraphs(text, config, name):
        para.wrap(width, 1e12)
        out.append([_line_text(line) for line in para.blPara.lines])
    return out


def _paragraphs(text: str, config: RenderConfig, font_name: str) -> list:
    """The official story: one reportlab Paragraph per 30 source lines, Glyph's style."""
    from reportlab.lib import colors
    from reportlab.lib.enums import TA_CENTER, TA_JUSTIFY, TA_LEFT, TA_RIGHT
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
    from reportlab.platypus import Paragraph

    style = ParagraphStyle(
        name="Custom",
        parent=getSampleStyleSheet()["Normal"],
        fontName=font_name,
        fontSize=config.font_size,
        leading=config.line_height,
        textColor=colors.HexColor(config.font_color),
        backColor=colors.HexColor(config.para_bg_color),
        borderColor=colors.HexColor(config.para_border_color),
        borderWidth=config.border_width,
        borderPadding=config.border_padding,
        firstLineIndent=config.first_line_indent,
        wordWrap="CJK" if has_cjk(text) else None,
        leftIndent=config.left_indent,
        rightIndent=config.right_indent,
        alignment={"LEFT": TA_LEFT, "CENTER": TA_CENTER, "RIGHT": TA_RIGHT, "JUSTIFY": TA_JUSTIFY}[config.alignment],
        spaceBefore=config.space_before,
        spaceAfter=config.space_after,
    )
    cleaned = text.replace("\xad", "").replace("\u200b", "")
    processed = re.sub(r" {2,}", lambda m: "&nbsp;" * len(m.group()), escape(cleaned))
    parts = processed.split("\n")
    return [
        Paragraph(config.newline_markup.join(parts[i : i + LINES_PER_PARAGRAPH]), style)
        for i in range(0, len(parts), LINES_PER_PARAGRAPH)
    ]


def _line_text(line) -> str:
    """The text reportlab draws on one line of ``blPara.lines``."""
    if isinstance(line, tuple):  # simple paragraph: (extra space, words)
        text = " ".join(line[1])
    else:  # FragLine: styled runs
        text = "".join(getattr(w, "text", "") for w in line.words)
    return text.rstrip(" ")


def _register_font(face: FontFace, text: str, fallback: bool = False) -> tuple[str, str]:
    """Register ``face`` with reportlab. CFF-outline fonts become a TrueType subset first, and
    with ``fallback`` the glyphs other fonts lend it are copied in (what the fast renderer's
    ``fallback-fonts`` means: as if the main font had them)."""
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    from glyphserve.render.fonts import CharTable, metrics

    main = metrics(face)
    chars = frozenset(text) | _ASCII  # printable ASCII always: fewer distinct subsets to build
    borrowed = frozenset(ch for ch in chars if CharTable(face, True)[ch][1] > 0) if fallback else frozenset()
    if _is_cff(face) or borrowed:
        chars = frozenset(ch for ch in chars if main.has(ord(ch)))  # the cache key: what the subset holds
        path, index = str(_truetype_font(face, chars, borrowed)), 0
    else:
        path, index = face.path, face.index
    name = "gs-" + hashlib.sha1(f"{path}#{index}".encode()).hexdigest()[:12]
    if name not in pdfmetrics.getRegisteredFontNames():
        pdfmetrics.registerFont(TTFont(name, path, subfontIndex=index))
    return name, path


@lru_cache(maxsize=16)
def _is_cff(face: FontFace) -> bool:
    """Whether the font's outlines are CFF (PostScript) ones, which reportlab cannot embed."""
    from fontTools.ttLib import TTFont

    font = TTFont(face.path, fontNumber=face.index, lazy=True)
    return "CFF " in font or "CFF2" in font


@lru_cache(maxsize=32)
def _truetype_font(face: FontFace, chars: frozenset[str], borrowed: frozenset[str]) -> Path:
    """A TrueType-outline (glyf) copy of ``face`` holding just ``chars``, plus the ``borrowed``
    characters' glyphs from the fallback fonts, scaled to its units per em.

    reportlab only embeds TrueType outlines; Noto Sans CJK is CFF. Cubic outlines are
    converted to quadratic ones with cu2qu (error under 1/1000 em), metrics kept as they are.
    The file is named by its contents and kept in the temporary folder for later runs.
    """
    digest = hashlib.sha1(("v2|" + "".join(sorted(chars)) + "|" + "".join(sorted(borrowed))
                           + f"|{face.path}#{face.index}").encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"glyphserve-ref-{digest}.ttf"
    if out.is_file():
        return out
    from fontTools import subset
    from fontTools.ttLib import TTFont, newTable

    from glyphserve.render.fonts import CharTable

    logging.getLogger("fontTools.subset").setLevel(logging.ERROR)  # it reports each table it drops
    font = TTFont(face.path, fontNumber=face.index)
    options = subset.Options()
    options.notdef_outline = True
    options.name_IDs = ["*"]
    options.layout_features = []
    options.hinting = False
    options.desubroutinize = True
    subsetter = subset.Subsetter(options)
    subsetter.populate(unicodes={ord(c) for c in chars - borrowed})
    subsetter.subset(font)

    order = font.getGlyphOrder()
    if "glyf" in font:
        glyphs = {name: font["glyf"][name] for name in order}
    else:
        glyph_set = font.getGlyphSet()
        glyphs = {name: _quadratic(glyph_set, name, 1.0, cubic=True) for name in order}
    metrics = dict(font["hmtx"].metrics)
    cmap = dict(font.getBestCmap() or {})
    upm = font["head"].unitsPerEm
    table = CharTable(face, True)
    lenders: dict[int, TTFont] = {}
    for ch in sorted(borrowed):
        slot = table[ch][1]
        if slot not in lenders:
            lender_face = table.faces[slot]
            lenders[slot] = TTFont(lender_face.path, fontNumber=lender_face.index, lazy=True)
        lender = lenders[slot]
        source = lender.getBestCmap()[ord(ch)]
        scale = upm / lender["head"].unitsPerEm
        name = f"borrowed{ord(ch):x}"
        glyph = _quadratic(lender.getGlyphSet(), source, scale, cubic="glyf" not in lender)
        glyphs[name] = glyph
        order.append(name)
        metrics[name] = (round(lender["hmtx"][source][0] * scale), 0)
        cmap[ord(ch)] = name

    glyf = newTable("glyf")
    glyf.glyphOrder = order
    glyf.glyphs = glyphs
    font.setGlyphOrder(order)
    for name in ("CFF ", "VORG", "vhea", "vmtx", "glyf", "loca"):  # horizontal text only
        if name in font:
            del font[name]
    font["glyf"] = glyf
    font["loca"] = newTable("loca")
    for name, glyph in glyphs.items():
        glyph.recalcBounds(glyf)
        metrics[name] = (metrics[name][0], getattr(glyph, "xMin", 0))
    font["hmtx"].metrics = metrics
    _set_cmap(font, cmap)
    maxp = font["maxp"]
    maxp.tableVersion = 0x00010000
    for attr in ("maxZones", "maxTwilightPoints", "maxStorage", "maxFunctionDefs", "maxInstructionDefs",
                 "maxStackElements", "maxSizeOfInstructions", "maxComponentElements", "maxComponentDepth"):
        setattr(maxp, attr, 0)
    maxp.maxZones = 1
    font["head"].glyphDataFormat = 0
    font["post"].formatType = 3.0
    font.sfntVersion = "\x00\x01\x00\x00"
    # reportlab shares one font object between all files with the same PostScript name:
    # give every subset its own, or later subsets would silently use the first one's glyphs.
    font["name"].setName(f"GlyphserveRef-{digest}", 6, 3, 1, 0x409)
    font["name"].setName(f"GlyphserveRef-{digest}", 6, 1, 0, 0)
    partial = out.with_suffix(f".{os.getpid()}.tmp")
    font.save(partial)
    partial.replace(out)
    return out


def _quadratic(glyph_set, name: str, scale: float, cubic: bool):
    """One glyph as a simple TrueType glyph: components drawn in, scaled, cubic curves
    converted (and turned to TrueType's winding)."""
    from fontTools.pens.cu2quPen import Cu2QuPen
    from fontTools.pens.recordingPen import DecomposingRecordingPen
    from fontTools.pens.transformPen import TransformPen
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    recording = DecomposingRecordingPen(glyph_set)
    glyph_set[name].draw(recording)
    pen = TTGlyphPen(None)
    target = Cu2QuPen(pen, max_err=1.0, reverse_direction=True) if cubic else pen
    recording.replay(TransformPen(target, (scale, 0, 0, scale, 0, 0)) if scale != 1 else target)
    return pen.glyph()


def _set_cmap(font, cmap: dict[int, str]) -> None:
    """A Windows Unicode cmap: format 4 for the BMP, plus format 12 when there is more."""
    from fontTools.ttLib import newTable
    from fontTools.ttLib.tables._c_m_a_p import CmapSubtable

    table = newTable("cmap")
    table.tableVersion = 0
    bmp = CmapSubtable.newSubtable(4)
    bmp.platformID, bmp.platEncID, bmp.language = 3, 1, 0
    bmp.cmap = {code: name for code, name in cmap.items() if code <= 0xFFFF}
    table.tables = [bmp]
    if any(code > 0xFFFF for code in cmap):
        full = CmapSubtable.newSubtable(12)
        full.platformID, full.platEncID, full.language = 3, 10, 0
        full.cmap = dict(cmap)
        table.tables.append(full)
    font["cmap"] = table


def main(argv: list[str] | None = None) -> int:
    """``python -m glyphserve.render.reference INPUT -o DIR``: a text file to page PNGs through
    the official pipeline, as a command (what ``bench render`` times end to end)."""
    import argparse

    from glyphserve.render.config import resolve_config

    parser = argparse.ArgumentParser(prog="python -m glyphserve.render.reference",
                                     description="Glyph's official rendering pipeline (reportlab + pdftoppm).")
    parser.add_argument("input", help="a UTF-8 text file")
    parser.add_argument("-o", "--output", required=True, help="folder for page_001.png ...")
    parser.add_argument("--preset", default="auto", choices=("auto", "glyph-en", "glyph-zh"))
    parser.add_argument("--dpi", type=float)
    parser.add_argument("--newline", choices=("br", "marker"))
    args = parser.parse_args(argv)
    text = Path(args.input).read_text(encoding="utf-8")
    render_reference(text, resolve_config(text, preset=args.preset, dpi=args.dpi, newline=args.newline),
                     out_dir=args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
