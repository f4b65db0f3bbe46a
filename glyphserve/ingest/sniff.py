"""Tell a file's type from its content; the name plays no part here."""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

from glyphserve.ingest.archive import check_entry_count
from glyphserve.ingest.textenc import DecodedText, decode_text

SUPPORTED = "PDF, DOCX, plain text and Markdown"

_PDF_MAGIC = re.compile(rb"%PDF-\d\.\d")
_PDF_SEARCH_BYTES = 1024  # PDF readers accept junk before the header
_OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")

# ELF, Mach-O (both byte orders, fat), WebAssembly; then gzip, xz, 7z, RAR, zstd.
_EXECUTABLE_MAGICS = (
    b"\x7fELF", b"\xfe\xed\xfa", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe",
    b"\xca\xfe\xba\xbe", b"\x00asm",
)
_ARCHIVE_MAGICS = (
    b"\x1f\x8b", b"\xfd7zXZ\x00", b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07", b"\x28\xb5\x2f\xfd",
)
# (label, test on the first bytes); labels are described in DESCRIPTIONS.
_MAGICS: tuple[tuple[str, Callable[[bytes], bool]], ...] = (
    ("png", lambda h: h.startswith(b"\x89PNG\r\n\x1a\n")),
    ("jpeg", lambda h: h.startswith(b"\xff\xd8\xff")),
    ("gif", lambda h: h[:6] in (b"GIF87a", b"GIF89a")),
    ("webp", lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP"),
    ("riff", lambda h: h[:4] == b"RIFF"),
    ("tiff", lambda h: h[:4] in (b"II*\x00", b"MM\x00*")),
    ("bmp", lambda h: h[:2] == b"BM" and len(h) >= 26 and h[6:10] == b"\x00\x00\x00\x00"),
    ("media", lambda h: h[4:8] == b"ftyp"),
    ("rtf", lambda h: h.startswith(b"{\\rtf")),
    ("postscript", lambda h: h.startswith(b"%!PS")),
    ("executable", lambda h: h.startswith(_EXECUTABLE_MAGICS)),
    ("executable", lambda h: h[:2] == b"MZ" and b"\x00" in h[:64]),
    ("archive", lambda h: h.startswith(_ARCHIVE_MAGICS)),
    ("archive", lambda h: h[:3] == b"BZh" and h[4:10] == b"1AY&SY"),
    ("sqlite", lambda h: h.startswith(b"SQLite format 3\x00")),
)

DESCRIPTIONS = {
    "pdf": "a PDF document",
    "docx": "a Word document (DOCX)",
    "text": "a text file",
    "empty": "an empty file",
    "png": "a PNG image",
    "jpeg": "a JPEG image",
    "gif": "a GIF image",
    "webp": "a WebP image",
    "tiff": "a TIFF image",
    "bmp": "a BMP image",
    "riff": "a RIFF audio or video file",
    "media": "an MP4/MOV/HEIC media file",
    "rtf": "an RTF document (save it as DOCX or PDF)",
    "postscript": "a PostScript file (convert it to PDF)",
    "executable": "an executable program",
    "archive": "a compressed archive",
    "sqlite": "an SQLite database",
    "zip": "a ZIP archive that is not a Word document",
    "xlsx": "an Excel workbook (XLSX)",
    "pptx": "a PowerPoint presentation (PPTX)",
    "opendocument": "an OpenDocument file (save it as DOCX or PDF)",
    "epub": "an EPUB e-book",
    "doc": "a legacy Word .doc file (save it as DOCX or PDF)",
    "ole2": "a legacy Microsoft Office file (.doc/.xls/.ppt; save it as DOCX or PDF)",
    "encrypted-office": "a password-protected Office document",
    "binary": "binary data",
}


@dataclass(frozen=True)
class Sniffed:
    kind: str  # a key of DESCRIPTIONS
    decoded: DecodedText | None = None  # the decoded text when kind == "text"


def sniff_type(data: bytes) -> str:
    """The content type of ``data``: "pdf", "docx", "text", "empty", or the label of an
    unsupported type ("png", "zip", "doc", "binary", ...; see ``DESCRIPTIONS``)."""
    return sniff(data).kind


def sniff(data: bytes, label: str = "the file") -> Sniffed:
    """Like :func:`sniff_type`, keeping the decoded text so it is decoded only once (``label`` names the
    file in the error for a zip archive too large to inspect)."""
    if not data:
        return Sniffed("empty")
    head = data[:_PDF_SEARCH_BYTES]
    pdf_header = _PDF_MAGIC.search(head)
    if pdf_header and pdf_header.start() == 0:
        return Sniffed("pdf")
    if pdf_header:
        # Junk before the header: a PDF with a prefix, or text that mentions "%PDF-1.x".
        decoded = decode_text(data)
        if decoded is None or b"%%EOF" in data[-2048:]:
            return Sniffed("pdf")
        return Sniffed("text", decoded)
    if data.startswith(_ZIP_MAGICS):
        check_entry_count(data, label)
        return Sniffed(_zip_kind(data))
    if data.startswith(_OLE2_MAGIC):
        return Sniffed(_ole2_kind(data))
    for label, test in _MAGICS:
        if test(head):
            return Sniffed(label)
    decoded = decode_text(data)
    if decoded is None:
        return Sniffed("binary")
    return Sniffed("text", decoded)


def _zip_kind(data: bytes) -> str:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
    except Exception:  # zipfile fails in many ways on damaged archives
        # Entry names are stored in plain text in the local headers.
        return "docx" if b"word/document.xml" in data else "zip"
    if "word/document.xml" in names:
        return "docx"
    if "xl/workbook.xml" in names:
        return "xlsx"
    if "ppt/presentation.xml" in names:
        return "pptx"
    # OpenDocument and EPUB files start with an uncompressed "mimetype" entry.
    if b"mimetypeapplication/vnd.oasis.opendocument" in data[:100]:
        return "opendocument"
    if b"mimetypeapplication/epub" in data[:100]:
        return "epub"
    return "zip"


def _ole2_kind(data: bytes) -> str:
    # OLE2 directory entries are UTF-16LE names; password-protected DOCX/XLSX files are
    # OLE2 containers holding an "EncryptedPackage" stream.
    if "EncryptedPackage".encode("utf-16-le") in data:
        return "encrypted-office"
    if "WordDocument".encode("utf-16-le") in data:
        return "doc"
    return "ole2"
