"""Entry points: bytes, a path or pasted text to a :class:`Document`."""

from __future__ import annotations

import os
import re
from pathlib import Path

from glyphserve.errors import (
    CorruptFileError,
    EmptyDocumentError,
    EncryptedFileError,
    FileTooLargeError,
    GlyphserveError,
    NotFoundError,
    UnsupportedTypeError,
)
from glyphserve.ingest.document import Document, ImagePart, TextPart
from glyphserve.ingest.pdf import read_pdf
from glyphserve.ingest.sniff import DESCRIPTIONS, SUPPORTED, sniff
from glyphserve.ingest.word import read_docx

DEFAULT_MAX_BYTES = 50 * 2**20
MARKDOWN_SUFFIXES = (".md", ".markdown", ".mdown", ".mkd", ".mkdn")

_NEWLINES = re.compile(r"\r\n?")
_LONE_SURROGATES = re.compile("[\ud800-\udfff]")


def ingest_bytes(
    data: bytes | bytearray | memoryview,
    filename: str | None = None,
    *,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> Document:
    """Read a PDF, DOCX, text or Markdown file; its type is sniffed from the content.

    ``filename`` only tells Markdown from plain text and names the file in messages.
    ``max_bytes=None`` lifts the size limit. Raises a :class:`GlyphserveError` subclass
    for anything the user can fix (unsupported, corrupt, encrypted, empty, too large).
    """
    data = bytes(data)  # also accepts bytearray and memoryview
    source_name = (re.split(r"[\\/]", filename)[-1] or None) if filename else None  # drop folders
    label = f"'{source_name}'" if source_name else "the file"
    _check_size(len(data), max_bytes, label)
    sniffed = sniff(data)
    encoding = None
    if sniffed.kind == "text":
        kind = "markdown" if _is_markdown(source_name) else "txt"
        encoding = sniffed.decoded.encoding
        parts = [TextPart(normalize_text(sniffed.decoded.text))]
    elif sniffed.kind == "pdf":
        kind = "pdf"
        parts = _parse(read_pdf, data, label, "PDF")
    elif sniffed.kind == "docx":
        kind = "docx"
        parts = [TextPart(normalize_text(_parse(read_docx, data, label, "Word document")))]
    elif sniffed.kind == "empty":
        raise EmptyDocumentError(f"{label} is empty")
    elif sniffed.kind == "encrypted-office":
        raise EncryptedFileError(
            f"{label} is a password-protected Office document; "
            "remove the password and upload it again"
        )
    else:
        raise UnsupportedTypeError(
            f"{label} is {DESCRIPTIONS[sniffed.kind]}, which is not supported; "
            f"supported types are {SUPPORTED}"
        )
    if not any(isinstance(part, ImagePart) or part.text.strip() for part in parts):
        hint = " (images in Word documents are not read)" if kind == "docx" else ""
        raise EmptyDocumentError(f"{label} contains no text{hint}")
    return Document(
        kind=kind, parts=parts, source_name=source_name, source_bytes=len(data), encoding=encoding
    )


def ingest_path(path: str | os.PathLike, *, max_bytes: int | None = DEFAULT_MAX_BYTES) -> Document:
    """Read a file from disk; the size limit is checked before any of it is read."""
    path = Path(path)
    try:
        if path.is_dir():
            raise UnsupportedTypeError(f"'{path}' is a directory; give a file")
        _check_size(path.stat().st_size, max_bytes, f"'{path.name}'")
        with path.open("rb") as handle:
            # Read one byte past the limit so a file that grew since stat() is still caught.
            data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise NotFoundError(f"no such file: '{path}'") from exc
    except OSError as exc:
        raise GlyphserveError(f"cannot read '{path}': {exc.strerror or exc}") from exc
    return ingest_bytes(data, path.name, max_bytes=max_bytes)


def ingest_text(text: str, *, max_bytes: int | None = DEFAULT_MAX_BYTES) -> Document:
    """Pasted text, newline-normalised; raises :class:`EmptyDocumentError` when blank."""
    text = normalize_text(text)
    size = len(text.encode("utf-8"))
    _check_size(size, max_bytes, "the text")
    if not text.strip():
        raise EmptyDocumentError("the text is empty")
    return Document(kind="text", parts=[TextPart(text)], source_bytes=size)


def normalize_text(text: str) -> str:
    """``\\r\\n`` and ``\\r`` to ``\\n``, no leading BOM, lone surrogates to U+FFFD;
    otherwise unchanged (the renderer handles layout)."""
    text = _NEWLINES.sub("\n", text).removeprefix("\ufeff")
    return _LONE_SURROGATES.sub("\ufffd", text)


def _parse(reader, data: bytes, label: str, what: str):
    """Run a parser; any failure that is not already a user error means a damaged file."""
    try:
        return reader(data, label)
    except (GlyphserveError, MemoryError):
        raise
    except Exception as exc:  # parsers fail in many ways on damaged input
        raise CorruptFileError(
            f"{label} looks like a {what} but could not be read (damaged or truncated): "
            f"{type(exc).__name__}: {str(exc)[:200]}"
        ) from exc


def _check_size(size: int, max_bytes: int | None, label: str) -> None:
    if max_bytes is not None and size > max_bytes:
        raise FileTooLargeError(
            f"{label} is {_format_size(size)}, over the upload limit of "
            f"{_format_size(max_bytes)}; raise it with --max-upload-mb"
        )


def _format_size(size: int) -> str:
    if size >= 2**20:
        return f"{size / 2**20:.1f} MiB"
    if size >= 2**10:
        return f"{size / 2**10:.1f} KiB"
    return f"{size} bytes"


def _is_markdown(name: str | None) -> bool:
    return bool(name) and name.lower().endswith(MARKDOWN_SUFFIXES)
