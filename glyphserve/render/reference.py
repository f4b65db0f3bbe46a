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


def render_reference(text: str, config: RenderConfig, *, font_face: FontFace | None = None) -> ReferenceDocument:
    """Render ``text`` exactly like the official Glyph script (pages, crops and line breaks)."""
    from pdf2image import convert_from_bytes, pdfinfo_from_bytes
    from reportlab.lib import colors
    from reportlab.platypus import Paragraph, SimpleDocTemplate

    t0 = time.perf_counter()
    face = font_face or resolve_font(config.font_path).face
    font_name, font_file = _register_font(face, text)
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
    return ReferenceDocument(pages, time.perf_counter() - t0, t_layout, font_file)


def reference_line_breaks(text: str, config: RenderConfig) -> list[list[str]]:
    """reportlab's lines for each Paragraph of ``text`` (every 30 source lines), as if the
    page were endless: line breaking alone, without pagination, PDF or rasteriser."""
    from glyphserve.render.lines import frame_geometry

    name, _ = _register_font(resolve_font(config.font_path).face, text)
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


def _register_font(face: FontFace, text: str) -> tuple[str, str]:
    """Register ``face`` with reportlab; CFF-outline fonts become a TrueType subset first."""
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    from glyphserve.render.fonts import metrics

    if metrics(face).is_cff:
        path, index = str(_truetype_subset(face, frozenset(text) | frozenset(" \xa0\\n"))), 0
    else:
        path, index = face.path, face.index
    name = "gs-" + hashlib.sha1(f"{path}#{index}".encode()).hexdigest()[:12]
    if name not in pdfmetrics.getRegisteredFontNames():
        pdfmetrics.registerFont(TTFont(name, path, subfontIndex=index))
    return name, path


@lru_cache(maxsize=32)
def _truetype_subset(face: FontFace, chars: frozenset[str]) -> Path:
    """A TrueType-outline (glyf) copy of ``face`` holding just ``chars``.

    reportlab only embeds TrueType outlines; Noto Sans CJK is CFF. The cubic outlines are
    converted to quadratic ones with cu2qu (error under 1/1000 em), metrics kept as they are.
    """
    from fontTools import subset
    from fontTools.pens.cu2quPen import Cu2QuPen
    from fontTools.pens.ttGlyphPen import TTGlyphPen
    from fontTools.ttLib import TTFont, newTable

    font = TTFont(face.path, fontNumber=face.index)
    options = subset.Options()
    options.notdef_outline = True
    options.name_IDs = ["*"]
    options.layout_features = []
    options.hinting = False
    options.desubroutinize = True
    subsetter = subset.Subsetter(options)
    subsetter.populate(unicodes={ord(c) for c in chars})
    subsetter.subset(font)

    glyph_set = font.getGlyphSet()
    order = font.getGlyphOrder()
    glyf = newTable("glyf")
    glyf.glyphOrder = order
    glyf.glyphs = {}
    for name in order:
        pen = TTGlyphPen(glyph_set)
        glyph_set[name].draw(Cu2QuPen(pen, max_err=1.0, reverse_direction=True))
        glyf.glyphs[name] = pen.glyph()
    del font["CFF "]
    if "VORG" in font:
        del font["VORG"]
    font["glyf"] = glyf
    font["loca"] = newTable("loca")
    maxp = font["maxp"]
    maxp.tableVersion = 0x00010000
    for attr in ("maxZones", "maxTwilightPoints", "maxStorage", "maxFunctionDefs", "maxInstructionDefs",
                 "maxStackElements", "maxSizeOfInstructions", "maxComponentElements"):
        setattr(maxp, attr, 0)
    maxp.maxZones = 1
    maxp.maxComponentDepth = 0
    font["head"].glyphDataFormat = 0
    post = font["post"]
    post.formatType = 3.0
    font.sfntVersion = "\x00\x01\x00\x00"
    digest = hashlib.sha1(("".join(sorted(chars)) + f"{face.path}#{face.index}").encode()).hexdigest()[:16]
    # reportlab shares one font object between all files with the same PostScript name:
    # give every subset its own, or later subsets would silently use the first one's glyphs.
    font["name"].setName(f"GlyphserveRef-{digest}", 6, 3, 1, 0x409)
    font["name"].setName(f"GlyphserveRef-{digest}", 6, 1, 0, 0)
    out = Path(tempfile.gettempdir()) / f"glyphserve-ref-{digest}.ttf"
    font.save(out)
    return out

