"""Builders for real PDF and DOCX files, made at test time."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import docx
import pytest
from PIL import Image, ImageDraw, ImageFont
from reportlab.lib.pagesizes import A4
from reportlab.lib.pdfencrypt import StandardEncryption
from reportlab.lib.styles import getSampleStyleSheet
from reportlab.lib.utils import ImageReader
from reportlab.pdfgen import canvas
from reportlab.platypus import PageBreak, Paragraph, SimpleDocTemplate

# A page is ("text", [paragraph, ...]), ("scan", [line, ...]) or ("blank", []).
PageSpec = tuple[str, Sequence[str]]


def _scan_image(lines: Sequence[str]) -> Image.Image:
    """A page-sized picture of text, as a scanner would produce (no text layer)."""
    image = Image.new("RGB", (1240, 1754), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=40)
    for row, line in enumerate(lines):
        draw.text((100, 120 + row * 60), line, fill="black", font=font)
    return image


def _pdf(pages: Sequence[PageSpec], encrypt=None) -> bytes:
    """Text pages are laid out by reportlab's paragraph flow; each must fit on one page."""
    buffer = io.BytesIO()
    body = getSampleStyleSheet()["BodyText"]
    story = []
    for index, (kind, content) in enumerate(pages):
        if kind == "text":
            story.extend(Paragraph(text, body) for text in content)
        else:
            story.append(Paragraph("", body))  # keeps the page in the flow
        if index < len(pages) - 1:
            story.append(PageBreak())

    def on_page(page_canvas: canvas.Canvas, _doc) -> None:
        kind, content = pages[page_canvas.getPageNumber() - 1]
        if kind == "scan":
            page_canvas.drawImage(ImageReader(_scan_image(content)), 0, 0, *A4)

    template = SimpleDocTemplate(buffer, pagesize=A4, encrypt=encrypt)
    template.build(story, onFirstPage=on_page, onLaterPages=on_page)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def scan_image() -> Callable[[Sequence[str]], Image.Image]:
    return _scan_image


@pytest.fixture(scope="session")
def make_pdf() -> Callable[..., bytes]:
    """``make_pdf([("text", [...]), ("scan", [...]), ("blank", [])], user_password=None)``."""

    def build(pages: Sequence[PageSpec], user_password: str | None = None, owner_password=None):
        encrypt = None
        if user_password is not None or owner_password is not None:
            encrypt = StandardEncryption(user_password or "", ownerPassword=owner_password)
        return _pdf(pages, encrypt)

    return build


@pytest.fixture(scope="session")
def make_docx() -> Callable[[Callable[[docx.document.Document], None]], bytes]:
    """``make_docx(fill)``: a new document, ``fill(document)`` adds content, DOCX bytes out."""

    def build(fill: Callable[[docx.document.Document], None]) -> bytes:
        document = docx.Document()
        fill(document)
        buffer = io.BytesIO()
        document.save(buffer)
        return buffer.getvalue()

    return build
