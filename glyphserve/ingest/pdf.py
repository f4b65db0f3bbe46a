"""PDF pages to text (the text layer, with line and paragraph breaks) or page images.

A page with a usable text layer becomes text; a page without one (a scan, or text drawn
as outlines) is rendered to an image so the model can read it directly; blank pages are
dropped (a page with no content and no annotations without rendering it). Consecutive text pages
merge into one :class:`TextPart`. Parts are yielded as they are read, so the pixels of all pages are never held at once.
The page count is checked against the limit before any page is opened.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from glyphserve.errors import (
    CorruptFileError,
    EmptyDocumentError,
    EncryptedFileError,
    FileTooLargeError,
    TooManyPagesError,
)
from glyphserve.ingest.document import PART_SEPARATOR, ImagePart, TextPart
from glyphserve.ingest.limits import MAX_IMAGE_SIDE, IngestLimits

RENDER_DPI = 144

_LOCK = threading.Lock()  # PDFium is not thread-safe (in a parser process only one file is read at a time)
_PARAGRAPH_GAP = 0.3  # extra space between lines, in line heights, that starts a paragraph
_SHORT_TEXT = 50  # chars: a page with less text than this that is mostly images is a scan
_IMAGE_COVERAGE = 0.5
_MAX_BAD_CHARS = 0.3  # share of unmapped glyphs above which the text layer is unusable
_BLANK_TOLERANCE = 48  # per-channel difference from the background that counts as ink
_BLANK_INK_SHARE = 1e-5  # a page with less ink than this is blank (scanner specks)


_Box = tuple[float, float, float, float]  # left, bottom, right, top in PDF points (y up)


@dataclass(frozen=True)
class _Line:
    text: str
    first: _Box | None  # loose box of its first visible char
    last: _Box | None  # ... and of its last (another visual line when PDFium joined a hyphen)


def read_pdf(data: bytes, name: str, limits: IngestLimits = IngestLimits()) -> Iterator[TextPart | ImagePart]:
    """The parts of a PDF in page order, each as soon as it is read (a page image when its page is, a run of text
    pages when it ends); raises on encrypted, corrupt or empty files, and on files over ``limits`` (the page count
    is checked before any page is opened)."""
    with _LOCK:
        pdf = _open(data, name)
        try:
            pages = len(pdf)
            if pages > limits.max_pdf_pages:
                raise TooManyPagesError(
                    f"{name} has {pages:,} pages, over this server's limit of {limits.max_pdf_pages:,} "
                    "(--max-pdf-pages); split it into smaller files"
                )
            yield from _read_pages(pdf, name, limits)
        finally:
            pdf.close()


def _open(data: bytes, name: str) -> pdfium.PdfDocument:
    try:
        return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        if exc.err_code in (pdfium_c.FPDF_ERR_PASSWORD, pdfium_c.FPDF_ERR_SECURITY):
            raise EncryptedFileError(
                f"{name} is password-protected; remove the password and upload it again"
            ) from exc
        if _has_no_pages(data):
            raise EmptyDocumentError(f"{name} has no pages") from exc
        raise CorruptFileError(f"{name} is not a readable PDF (damaged or truncated)") from exc


def _has_no_pages(data: bytes) -> bool:
    """Whether PDFium opens ``data`` as a document of zero pages (pypdfium2 refuses those). Asked of the handle,
    not of ``FPDF_GetLastError``: that code is left over from earlier calls in some builds (CI read "data format
    error" for a well-formed empty PDF)."""
    handle = pdfium_c.FPDF_LoadMemDocument64(data, len(data), None)
    if not handle:
        return False
    try:
        return pdfium_c.FPDF_GetPageCount(handle) == 0
    finally:
        pdfium_c.FPDF_CloseDocument(handle)


def _read_pages(pdf: pdfium.PdfDocument, name: str, limits: IngestLimits) -> Iterator[TextPart | ImagePart]:
    texts: list[str] = []  # the current run of text pages
    images = characters = 0
    for index in range(len(pdf)):
        page = pdf[index]
        try:
            content = _read_page(page, index + 1)
        except pdfium.PdfiumError as exc:
            raise CorruptFileError(f"page {index + 1} of {name} could not be read") from exc
        finally:
            page.close()
        if isinstance(content, str):
            characters += len(content)
            if characters > limits.max_characters:
                raise FileTooLargeError(
                    f"{name} holds more than {limits.max_characters:,} characters of text, this server's "
                    "limit (--max-characters)"
                )
            texts.append(content)
        elif isinstance(content, ImagePart):
            images += 1
            if images > limits.max_scan_pages:
                raise TooManyPagesError(
                    f"{name} has more than {limits.max_scan_pages} pages without a text layer "
                    "(scans), this server's limit (--max-scan-pages); run OCR on it or split it into smaller files"
                )
            if texts:
                yield TextPart(PART_SEPARATOR.join(texts))
                texts = []
            yield content
    if texts:
        yield TextPart(PART_SEPARATOR.join(texts))
    elif not images:
        raise EmptyDocumentError(f"{name} has no text and only blank pages")


def _read_page(page: pdfium.PdfPage, number: int) -> str | ImagePart | None:
    """The page's text, its image when it has no usable text layer, or None when blank."""
    if _empty(page):
        return None
    textpage = page.get_textpage()
    try:
        text = _page_text(textpage)
    finally:
        textpage.close()
    usable = _usable(text)
    if usable and (len(text) >= _SHORT_TEXT or not _mostly_images(page)):
        return text
    image = _render(page)
    if not _is_blank(image):
        return ImagePart(image=image, source_page=number)
    return text if usable else None  # e.g. a page of invisible text


def _empty(page: pdfium.PdfPage) -> bool:
    """No content (no page objects) and no annotations: blank without rendering it."""
    raw = page.raw
    return pdfium_c.FPDFPage_CountObjects(raw) == 0 and pdfium_c.FPDFPage_GetAnnotCount(raw) == 0


def _page_text(textpage: pdfium.PdfTextPage) -> str:
    """Source lines kept as lines; a blank line where the vertical gap shows a paragraph."""
    lines = _lines(textpage)
    if not lines:
        return ""
    gaps = [
        prev.last[1] - cur.first[3]
        for prev, cur in zip(lines, lines[1:])
        if prev.last and cur.first and cur.first[3] < prev.last[3]
    ]
    # The lower quartile is plain line spacing even when most gaps are paragraph breaks.
    typical = statistics.quantiles(gaps, n=4)[0] if len(gaps) >= 4 else min(gaps, default=0.0)
    out = [lines[0].text]
    for prev, cur in zip(lines, lines[1:]):
        out.append("\n\n" if _starts_paragraph(prev, cur, typical) else "\n")
        out.append(cur.text)
    return "".join(out)


def _lines(textpage: pdfium.PdfTextPage) -> list[_Line]:
    """Non-empty lines of the text layer, each with the box of its first visible char."""
    raw = textpage.get_text_range()
    lines = []
    offset = max(pdfium_c.FPDFText_GetTextIndexFromCharIndex(textpage, 0), 0)
    for line in raw.split("\r\n"):
        text = _clean(line)
        if text:
            start = len(line) - len(line.lstrip())
            end = len(line.rstrip()) - 1
            first = _char_box(textpage, offset + _utf16_len(line[:start]), line[start])
            last = _char_box(textpage, offset + _utf16_len(line[:end]), line[end])
            lines.append(_Line(text, first, last))
        offset += _utf16_len(line) + 2
    return lines


def _char_box(textpage: pdfium.PdfTextPage, text_index: int, char: str) -> _Box | None:
    """Loose box of the char at a text index; None when the index maps to another char."""
    char_index = pdfium_c.FPDFText_GetCharIndexFromTextIndex(textpage, text_index)
    if char_index < 0 or pdfium_c.FPDFText_GetUnicode(textpage, char_index) != ord(char):
        return None
    try:
        box = textpage.get_charbox(char_index, loose=True)
    except pdfium.PdfiumError:
        return None
    return box if box[3] > box[1] else None


def _starts_paragraph(prev: _Line, cur: _Line, typical_gap: float) -> bool:
    above, below = prev.last, cur.first
    if not (above and below):
        return False
    height = min(above[3] - above[1], below[3] - below[1])
    if below[1] > above[3] + height:  # jumped up: a new column or text block
        return True
    if below[3] >= above[3]:  # same visual line
        return False
    return above[1] - below[3] > typical_gap + _PARAGRAPH_GAP * height


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _clean(line: str) -> str:
    """Drop control chars and trailing space; PDFium joins a line that ends in a hyphen
    to the next one with U+FFFE in its place, so put the hyphen and line break back."""
    line = line.replace("\ufffe", "-\n")
    return "".join(c for c in line if c in "\t\n" or c >= " ").rstrip()


def _usable(text: str) -> bool:
    """Text layer present and mostly real characters (not unmapped glyphs)."""
    visible = [c for c in text if not c.isspace()]
    if not visible:
        return False
    bad = sum(c == "\ufffd" or "\ue000" <= c <= "\uf8ff" for c in visible)
    return bad <= len(visible) * _MAX_BAD_CHARS


def _mostly_images(page: pdfium.PdfPage) -> bool:
    left, bottom, right, top = page.get_bbox()
    area = max((right - left) * (top - bottom), 1e-6)
    covered = 0.0
    for obj in page.get_objects(filter=[pdfium_c.FPDF_PAGEOBJ_IMAGE], max_depth=4):
        l, b, r, t = obj.get_bounds()
        covered += max(0.0, min(r, right) - max(l, left)) * max(0.0, min(t, top) - max(b, bottom))
    return covered >= area * _IMAGE_COVERAGE


def _render(page: pdfium.PdfPage) -> np.ndarray:
    width, height = page.get_size()
    scale = min(RENDER_DPI / 72, MAX_IMAGE_SIDE / max(width, height, 1.0))
    bitmap = page.render(scale=scale, rev_byteorder=True, fill_color=(255, 255, 255, 255))
    try:
        return np.array(bitmap.to_numpy()[:, :, :3], dtype=np.uint8)  # copy out of PDFium
    finally:
        bitmap.close()


def _is_blank(image: np.ndarray) -> bool:
    """Nothing but the background colour, up to a few specks (checked on every other pixel)."""
    pixels = image[::2, ::2].reshape(-1, 3)
    background = np.array(
        [np.bincount(pixels[::16, channel], minlength=256).argmax() for channel in range(3)]
    )
    low = np.clip(background - _BLANK_TOLERANCE, 0, 255).astype(np.uint8)
    high = np.clip(background + _BLANK_TOLERANCE, 0, 255).astype(np.uint8)
    ink = ((pixels < low) | (pixels > high)).any(axis=1)
    return int(np.count_nonzero(ink)) <= pixels.shape[0] * _BLANK_INK_SHARE
