"""Entry points: bytes, a path or pasted text to a :class:`Document`."""

from __future__ import annotations

import os
import re
import sys
import unicodedata
from pathlib import Path

from glyphserve.errors import (
    EmptyDocumentError,
    EncryptedFileError,
    FileTooLargeError,
    GlyphserveError,
    NotFoundError,
    UnsupportedTypeError,
)
from glyphserve.ingest.document import Document, ImagePart, TextPart
from glyphserve.ingest.limits import IngestLimits
from glyphserve.ingest.parsing import Keep, parse_file
from glyphserve.ingest.sniff import DESCRIPTIONS, SUPPORTED, sniff

MARKDOWN_SUFFIXES = (".md", ".markdown", ".mdown", ".mkd", ".mkdn")
MAX_NAME_CHARS = 200

_NEWLINES = re.compile(r"\r\n?")
_LONE_SURROGATES = re.compile("[\ud800-\udfff]")
_UNNAMED = {"Cc", "Cs", "Co", "Cn"}  # controls (NUL, newlines, escapes), surrogates, private use, unassigned
_JOINERS = {"\u200c", "\u200d"}  # zero-width non-joiner and joiner: part of how some words and emoji are written
# Letters and symbols that show nothing (Hangul fillers, the blank braille pattern): a name of them alone is blank.
_BLANKS = {"\u115f", "\u1160", "\u3164", "\uffa0", "\u2800"}
_BIDI_CONTROLS = set("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # "gpj.exe" tricks


def ingest_bytes(
    data: bytes | bytearray | memoryview,
    filename: str | None = None,
    *,
    limits: IngestLimits = IngestLimits(),
    label: str | None = None,
    keep: Keep | None = None,
) -> Document:
    """Read a PDF, DOCX, text or Markdown file; its type is sniffed from the content.

    ``filename`` only tells Markdown from plain text and names the file in messages (cleaned by
    :func:`clean_filename`) unless ``label`` names the source there (e.g. standard input). ``keep`` makes each PDF
    page image into what the document keeps of it, as the page is read (``glyphserve.render.fit_scans``: the pages
    it will render to). Raises a :class:`GlyphserveError` subclass for anything the user can fix (unsupported,
    corrupt, encrypted, empty, over ``limits``).
    """
    data = bytes(data)  # also accepts bytearray and memoryview
    source_name = clean_filename(filename)
    label = label or (f"'{source_name}'" if source_name else "the file")
    _check_size(len(data), limits.max_bytes, label)
    sniffed = sniff(data, label)
    encoding = None
    if sniffed.kind == "text":
        kind = "markdown" if _is_markdown(source_name) else "txt"
        encoding = sniffed.decoded.encoding
        parts = [TextPart(normalize_text(sniffed.decoded.text))]
    elif sniffed.kind in ("pdf", "docx"):
        kind = sniffed.kind
        parts = parse_file(kind, data, label, limits, keep)
        if kind == "docx":
            parts = [TextPart(normalize_text(part.text)) for part in parts]
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


def ingest_path(path: str | os.PathLike, *, limits: IngestLimits = IngestLimits(),
                keep: Keep | None = None) -> Document:
    """Read a file from disk; the size limit is checked before any of it is read. ``keep`` as for
    :func:`ingest_bytes`."""
    path = Path(path)
    max_bytes = limits.max_bytes
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
    return ingest_bytes(data, path.name, limits=limits, keep=keep)


def ingest_source(source: str, *, limits: IngestLimits = IngestLimits(), keep: Keep | None = None) -> Document:
    """A file named on a command line, or ``-`` for standard input (read up to the size limit). ``keep`` as for
    :func:`ingest_bytes`."""
    if source != "-":
        return ingest_path(source, limits=limits, keep=keep)
    stdin = sys.stdin.buffer
    data = stdin.read() if limits.max_bytes is None else stdin.read(limits.max_bytes + 1)
    _check_size(len(data), limits.max_bytes, "standard input")
    return ingest_bytes(data, None, limits=limits, label="standard input", keep=keep)


def ingest_text(text: str, *, limits: IngestLimits = IngestLimits()) -> Document:
    """Pasted text, newline-normalised; raises :class:`EmptyDocumentError` when blank."""
    text = normalize_text(text)
    size = len(text.encode("utf-8"))
    _check_size(size, limits.max_bytes, "the text")
    if not text.strip():
        raise EmptyDocumentError("the text is empty")
    return Document(kind="text", parts=[TextPart(text)], source_bytes=size)


def normalize_text(text: str) -> str:
    """``\\r\\n`` and ``\\r`` to ``\\n``, no leading BOM, lone surrogates to U+FFFD;
    otherwise unchanged (the renderer handles layout)."""
    text = _NEWLINES.sub("\n", text).removeprefix("\ufeff")
    return _LONE_SURROGATES.sub("\ufffd", text)


def clean_filename(name: str | None, max_chars: int = MAX_NAME_CHARS) -> str | None:
    """A file name fit to show and to store: the last path component only (``/`` and ``\\`` both separate),
    cleaned as ``clean_name``, surrounding dots dropped too, at most ``max_chars`` (the extension kept). None when
    nothing is left."""
    if not name:
        return None
    name = clean_name(re.split(r"[\\/]", name)[-1]).strip(".").strip()
    if len(name) > max_chars:
        stem, dot, suffix = name.rpartition(".")
        if dot and 0 < len(suffix) <= 16 and stem:
            name = stem[: max_chars - len(suffix) - 1].rstrip() + "." + suffix
        else:
            name = name[:max_chars].rstrip()
    return name or None


def clean_name(name: str, max_chars: int | None = None) -> str:
    """A name as typed, fit to show: line breaks and tabs become spaces, other control, private-use, invisible
    format (zero-width, direction marks; the joiners that emoji and some scripts need stay) and direction-override
    characters go, runs of spaces become one, surrounding whitespace is dropped (slashes and everything else stay);
    cut to ``max_chars`` when given. "" when nothing visible is left."""
    name = "".join(" " if c in "\t\n\r\v\f\x85\u2028\u2029" else c for c in name)
    name = "".join(c for c in name if unicodedata.category(c) not in _UNNAMED and c not in _BIDI_CONTROLS
                   and (unicodedata.category(c) != "Cf" or c in _JOINERS))
    name = " ".join(name.split())
    if max_chars is not None:
        name = name[:max_chars].rstrip()
    return name if any(not c.isspace() and c not in _BLANKS and c not in _JOINERS for c in name) else ""


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
