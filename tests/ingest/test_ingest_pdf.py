"""PDF ingestion on real files built with reportlab."""

from __future__ import annotations

import io

import numpy as np
import pypdfium2 as pdfium
import pytest
from reportlab.lib.pagesizes import A4
from reportlab.lib.utils import ImageReader
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.cidfonts import UnicodeCIDFont
from reportlab.pdfgen import canvas

from glyphserve.errors import CorruptFileError, EmptyDocumentError, EncryptedFileError
from glyphserve.ingest import ImagePart, TextPart, ingest_bytes

LOREM = "lorem ipsum dolor sit amet consectetur adipiscing elit " * 6


def test_paragraphs_and_page_order_survive(make_pdf):
    data = make_pdf(
        [
            ("text", ["Alpha opens the first page. " + LOREM, "Bravo is the second one. " + LOREM]),
            ("text", ["Charlie starts page two. " + LOREM, "Delta."]),
            ("text", ["Echo on page three."]),
        ]
    )
    document = ingest_bytes(data, "report.pdf")

    assert document.kind == "pdf"
    assert document.encoding is None
    assert document.source_bytes == len(data)
    assert len(document.parts) == 1 and isinstance(document.parts[0], TextPart)
    text = document.text
    positions = [text.index(word) for word in ("Alpha", "Bravo", "Charlie", "Delta", "Echo")]
    assert positions == sorted(positions)
    paragraphs = [block.replace("\n", " ") for block in text.split("\n\n")]
    first_words = [block.split()[0] for block in paragraphs]
    assert first_words == ["Alpha", "Bravo", "Charlie", "Delta.", "Echo"]
    # A long paragraph keeps its source lines as lines.
    assert paragraphs[0].startswith("Alpha opens the first page. lorem ipsum")
    assert text.split("\n\n")[0].count("\n") >= 2
    assert "\r" not in text


def test_line_structure_from_positions():
    buffer = io.BytesIO()
    page = canvas.Canvas(buffer, pagesize=A4)
    for row, line in enumerate(["one", "two ends with a hyphen-", "ated word", "three"]):
        page.drawString(72, 800 - row * 14, line)
    for row, line in enumerate(["after a wider gap", "still the same paragraph"]):
        page.drawString(72, 730 - row * 14, line)
    page.drawString(320, 800, "second column")  # jumps back up
    page.save()

    assert ingest_bytes(buffer.getvalue()).text == (
        "one\ntwo ends with a hyphen-\nated word\nthree\n\n"
        "after a wider gap\nstill the same paragraph\n\nsecond column"
    )


def test_scanned_page_becomes_an_image(make_pdf):
    document = ingest_bytes(make_pdf([("scan", ["A scanned page", "with no text layer"])]))

    assert document.kind == "pdf"
    assert len(document.parts) == 1
    part = document.parts[0]
    assert isinstance(part, ImagePart)
    assert part.source_page == 1
    assert part.image.dtype == np.uint8 and part.image.ndim == 3 and part.image.shape[2] == 3
    height, width, _ = part.image.shape
    assert max(height, width) <= 2000
    assert (width, height) == pytest.approx((595 * 2, 842 * 2), abs=2)  # A4 at 144 dpi
    assert (part.image < 128).any() and (part.image > 250).mean() > 0.5  # dark ink on white
    assert document.text == ""


def test_a_pdf_is_read_a_page_at_a_time(make_pdf, monkeypatch):
    from glyphserve.ingest import pdf

    rendered = []
    render = pdf._render
    monkeypatch.setattr(pdf, "_render", lambda page: rendered.append(page) or render(page))
    parts = pdf.read_pdf(make_pdf([("text", ["Before."]), ("scan", ["one"]), ("scan", ["two"]), ("scan", ["three"])]),
                         "scans.pdf")
    assert next(parts) == TextPart("Before.") and len(rendered) == 1  # its run of text pages ends at the first scan
    assert next(parts).source_page == 2 and len(rendered) == 1  # given before the next page is rendered
    assert next(parts).source_page == 3 and len(rendered) == 2
    assert [part.source_page for part in parts] == [4] and len(rendered) == 3


def test_mixed_pages_keep_reading_order(make_pdf):
    document = ingest_bytes(
        make_pdf(
            [
                ("text", ["First text page."]),
                ("scan", ["scanned middle page"]),
                ("text", ["Last text page."]),
            ]
        )
    )

    kinds = [type(part) for part in document.parts]
    assert kinds == [TextPart, ImagePart, TextPart]
    assert document.parts[0].text == "First text page."
    assert document.parts[1].source_page == 2
    assert document.parts[2].text == "Last text page."
    assert document.text == "First text page.\n\nLast text page."


def test_blank_pages_are_skipped_and_text_pages_merge(make_pdf):
    document = ingest_bytes(
        make_pdf([("text", ["Before the blank."]), ("blank", []), ("text", ["After the blank."])])
    )

    assert document.parts == [TextPart("Before the blank.\n\nAfter the blank.")]


def test_only_blank_pages_is_empty(make_pdf):
    # ("scan", []) is a scanned sheet of white paper: an image with nothing on it.
    with pytest.raises(EmptyDocumentError, match="blank"):
        ingest_bytes(make_pdf([("blank", []), ("scan", [])]), "blank.pdf")


def test_pdf_without_pages_is_empty():
    buffer = io.BytesIO()
    pdfium.PdfDocument.new().save(buffer)
    with pytest.raises(EmptyDocumentError):
        ingest_bytes(buffer.getvalue(), "nothing.pdf")


def test_small_text_on_a_full_page_scan_is_still_a_scan(scan_image):
    # Scanners often stamp a page number or header as real text on top of the image.
    buffer = io.BytesIO()
    page = canvas.Canvas(buffer, pagesize=A4)
    page.drawImage(ImageReader(scan_image(["the real content is in the image"])), 0, 0, *A4)
    page.drawString(280, 20, "- 7 -")
    page.save()

    (part,) = ingest_bytes(buffer.getvalue()).parts

    assert isinstance(part, ImagePart)


def test_chinese_text_layer():
    pdfmetrics.registerFont(UnicodeCIDFont("STSong-Light"))
    buffer = io.BytesIO()
    page = canvas.Canvas(buffer, pagesize=A4)
    page.setFont("STSong-Light", 14)
    page.drawString(72, 760, "长文本渲染成图像")
    page.drawString(72, 742, "然后由视觉语言模型读取")
    page.save()

    assert ingest_bytes(buffer.getvalue()).text == "长文本渲染成图像\n然后由视觉语言模型读取"


def test_user_password_is_reported_as_encrypted(make_pdf):
    data = make_pdf([("text", ["secret"])], user_password="hunter2")
    with pytest.raises(EncryptedFileError, match="password") as info:
        ingest_bytes(data, "secret.pdf")
    assert info.value.http_status == 400
    assert "'secret.pdf'" in info.value.message


def test_owner_password_only_opens(make_pdf):
    data = make_pdf([("text", ["Readable but not editable."])], owner_password="owner")
    assert ingest_bytes(data).text == "Readable but not editable."


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:200],
        lambda data: b"%PDF-1.4\n" + bytes(range(256)) * 8,
        lambda data: data[:9] + b"\x00" * (len(data) - 9),
    ],
    ids=["truncated", "garbage-body", "zeroed"],
)
def test_corrupt_pdf(make_pdf, damage):
    data = damage(make_pdf([("text", ["Some text that will be lost."])]))
    with pytest.raises(CorruptFileError, match="PDF"):
        ingest_bytes(data, "broken.pdf")


def test_junk_before_the_header_is_accepted(make_pdf):
    data = b"Content-Type: application/pdf\r\n\r\n" + make_pdf([("text", ["Prefixed."])])
    assert ingest_bytes(data).text == "Prefixed."
