"""Multipart document uploads, read with python-multipart directly.

Starlette's form parser caps each part header at about 4 KiB, so a file with a long name gets a bare
"Invalid multipart data"; here part headers may be longer (the name is cleaned and capped later, the
raw one kept as metadata), and the shape is checked as it streams: one file field named ``file``,
a few short text fields, each once, and the closing boundary (a body cut short is not a shorter file). The
request body itself is bounded by the upload limit before it arrives.
"""

from __future__ import annotations

import re

from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from glyphserve.serve.errors import InvalidRequestError

MAX_HEADER_BYTES = 64 * 1024  # one part header line (a Content-Disposition with a long file name)
MAX_FIELDS = 8  # text parts, counted as they come (949,653 parts named alike once passed as one field)
MAX_FIELD_BYTES = 64 * 1024


@dataclass
class Upload:
    data: bytes
    filename: str | None
    fields: dict[str, str] = field(default_factory=dict)


class _Parts:
    """python-multipart callbacks collecting one file and a few text fields."""

    def __init__(self):
        self.file: bytearray | None = None
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._data: bytearray | None = None
        self.ended = False  # the closing boundary came

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.part_begin, "on_part_data": self.part_data, "on_part_end": self.part_end,
            "on_end": self.end,
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self.header_end, "on_headers_finished": self.headers_finished,
        }

    def part_begin(self) -> None:
        self._headers = {}
        self._data = None

    def header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = _decode(options.get(b"name", b""))
        if b"filename" in options:
            if self._name != "file" or self.file is not None:
                raise InvalidRequestError("an upload carries one file, in a field named 'file'")
            self.filename = _form_unescaped(_decode(options[b"filename"]))
            self.file = self._data = bytearray()
        else:
            if len(self.fields) >= MAX_FIELDS:
                raise InvalidRequestError(f"an upload has at most {MAX_FIELDS} form fields")
            if self._name in self.fields:
                raise InvalidRequestError(f"form field {self._name!r} is given twice")
            self.fields[self._name] = ""  # its place taken: the same name again is refused
            self._data = bytearray()

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self._data.extend(data[start:end])
        if self._data is not self.file and len(self._data) > MAX_FIELD_BYTES:
            raise InvalidRequestError(f"form field {self._name!r} is longer than {MAX_FIELD_BYTES // 1024} KiB")

    def part_end(self) -> None:
        if self._data is not self.file:
            self.fields[self._name] = _decode(bytes(self._data))

    def end(self) -> None:
        self.ended = True


# A form's escapes in a file name: the HTML standard's '"' as %22, CR and LF as %0D and %0A, which browsers and curl
# send; httpx escapes every control character so. A '%' is sent as itself, so a name holding "%22" as text arrives
# as '"': the escapes cannot tell them apart.
_FORM_ESCAPE = re.compile(r"%(22|[01][0-9A-F])")


def _form_unescaped(name: str) -> str:
    return _FORM_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), name)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


async def read_upload(request: Request) -> Upload:
    """The file and text fields of a ``multipart/form-data`` request."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidRequestError("the multipart upload names no boundary")
    parts = _Parts()
    try:
        parser = MultipartParser(boundary, parts.callbacks(), max_header_size=MAX_HEADER_BYTES)
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except FormParserError:
        raise InvalidRequestError("the multipart upload is malformed (or a part header is over 64 KiB)") from None
    if parts.file is None:
        raise InvalidRequestError("multipart uploads carry the document in a file field named 'file'")
    if not parts.ended:  # python-multipart's finalize does not check it
        raise InvalidRequestError("the multipart upload is incomplete: the body ended before its closing boundary")
    return Upload(bytes(parts.file), parts.filename, parts.fields)
