"""Types come from the content; names never decide between formats."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from glyphserve.errors import EncryptedFileError, UnsupportedTypeError
from glyphserve.ingest import ingest_bytes, sniff_type

OLE2 = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"


def _image(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, fmt)
    return buffer.getvalue()


def _random_bytes(size: int) -> bytes:
    return random.Random(1234).randbytes(size)


def test_pdf_named_txt_is_a_pdf(make_pdf):
    data = make_pdf([("text", ["Really a PDF."])])
    assert sniff_type(data) == "pdf"
    document = ingest_bytes(data, "notes.txt")
    assert document.kind == "pdf" and document.text == "Really a PDF."


def test_docx_named_pdf_is_a_docx(make_docx):
    data = make_docx(lambda document: document.add_paragraph("Really a DOCX."))
    assert sniff_type(data) == "docx"
    assert ingest_bytes(data, "paper.pdf").kind == "docx"


def test_text_that_mentions_a_pdf_header_is_text():
    data = b"Notes on file formats.\nA PDF starts with %PDF-1.7 and ends with an EOF marker.\n"
    assert sniff_type(data) == "text"
    assert ingest_bytes(data, "notes.pdf").text == data.decode()


@pytest.mark.parametrize(
    ("data", "kind", "message"),
    [
        (_image("PNG"), "png", "PNG image"),
        (_image("JPEG"), "jpeg", "JPEG image"),
        (_image("GIF"), "gif", "GIF image"),
        (b"\x7fELF\x02\x01\x01\x00" + bytes(56), "executable", "executable"),
        (b"MZ\x90\x00\x03\x00\x00\x00" + bytes(56), "executable", "executable"),
        (b"\x1f\x8b\x08\x00" + _random_bytes(64), "archive", "compressed archive"),
        (b"{\\rtf1\\ansi Hello}", "rtf", "RTF"),
        (OLE2 + "WordDocument".encode("utf-16-le") + bytes(64), "doc", "save it as DOCX or PDF"),
        (OLE2 + "Workbook".encode("utf-16-le") + bytes(64), "ole2", "legacy Microsoft Office"),
        (_random_bytes(4096), "binary", "binary data"),
        (bytes(range(256)) * 4, "binary", "binary data"),
    ],
    ids=["png", "jpeg", "gif", "elf", "exe", "gzip", "rtf", "doc", "xls", "random", "byte-ramp"],
)
def test_unsupported_types_are_named(data, kind, message):
    assert sniff_type(data) == kind
    with pytest.raises(UnsupportedTypeError, match=message) as info:
        ingest_bytes(data, "upload.txt")
    assert "supported types are PDF, DOCX, plain text and Markdown" in info.value.message
    assert info.value.http_status == 400


def test_password_protected_office_file_is_encrypted():
    data = OLE2 + "EncryptedPackage".encode("utf-16-le") + bytes(64)
    assert sniff_type(data) == "encrypted-office"
    with pytest.raises(EncryptedFileError, match="password"):
        ingest_bytes(data, "secret.docx")


def test_empty_is_its_own_kind():
    assert sniff_type(b"") == "empty"
