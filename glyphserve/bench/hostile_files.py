"""Hostile files built in memory: small to send, huge once inflated, decoded or rendered.

Used by the hostile-input benchmark and tests. Each builder writes the format by hand (a few dozen
bytes of structure around repeated data), so even a file that inflates to gigabytes is built in
milliseconds without ever holding the inflated form.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

_WORD_NS = 'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'
_CONTENT_TYPES = (
    b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    b'<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    b'<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    b'<Default Extension="xml" ContentType="application/xml"/>'
    b'<Override PartName="/word/document.xml" '
    b'ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>'
)
_RELS = (
    b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    b'<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    b'<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/'
    b'officeDocument" Target="word/document.xml"/></Relationships>'
)


@dataclass(frozen=True)
class _Member:
    name: str
    compressed: bytes
    crc: int
    size: int  # what the headers declare as the inflated size
    method: int = 8  # deflate


def _deflated(pieces: list[tuple[bytes, int]]) -> tuple[bytes, int, int]:
    """Raw deflate of ``piece * repeat`` for each (piece, repeat), compressing each distinct piece once:
    after a full flush the compressor starts afresh, so the same piece compresses to the same bytes."""
    out, crc, size = [], 0, 0
    for piece, repeat in pieces:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        block = compressor.compress(piece) + compressor.flush(zlib.Z_FULL_FLUSH)
        out.append(block * repeat)
        for _ in range(repeat):
            crc = zlib.crc32(piece, crc)
        size += len(piece) * repeat
    out.append(zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH))  # an empty final block
    return b"".join(out), crc, size


def _zip(members: list[_Member]) -> bytes:
    """A zip archive written field by field (sizes under 4 GiB, so no zip64)."""
    dos_time, dos_date = 0, (2024 - 1980) << 9 | 1 << 5 | 1
    local, central = [], []
    offset = 0
    for m in members:
        name = m.name.encode()
        header = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, m.method, dos_time, dos_date, m.crc,
                             len(m.compressed), m.size, len(name), 0) + name
        local.append(header + m.compressed)
        central.append(struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, m.method, dos_time, dos_date, m.crc,
                                   len(m.compressed), m.size, len(name), 0, 0, 0, 0, 0, offset) + name)
        offset += len(header) + len(m.compressed)
    directory = b"".join(central)
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(members), len(members), len(directory), offset, 0)
    return b"".join(local) + directory + end


def _member(name: str, data: bytes) -> _Member:
    compressed, crc, size = _deflated([(data, 1)])
    return _Member(name, compressed, crc, size)


def docx_of_paragraphs(unpacked_mib: int, paragraph: str = "<w:p><w:r><w:t>x</w:t></w:r></w:p>") -> bytes:
    """A valid DOCX whose body is ``unpacked_mib`` MiB of one repeated paragraph (250 MiB: a file of ~0.8 MB)."""
    head = f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><w:document {_WORD_NS}><w:body>'.encode()
    unit = paragraph.encode()
    block = unit * max(1, 2**20 // len(unit))
    body, crc, size = _deflated([(head, 1), (block, max(1, unpacked_mib * 2**20 // len(block))),
                                 (b"</w:body></w:document>", 1)])
    return _zip([_member("[Content_Types].xml", _CONTENT_TYPES), _member("_rels/.rels", _RELS),
                 _Member("word/document.xml", body, crc, size)])


def docx_with_lying_size(inflated_mib: int, declared: int = 1000) -> bytes:
    """A DOCX whose body's headers declare ``declared`` bytes but whose data inflates to ``inflated_mib`` MiB."""
    head = f'<?xml version="1.0" encoding="UTF-8"?><w:document {_WORD_NS}><w:body><w:p><w:r><w:t>'.encode()
    body, crc, _ = _deflated([(head, 1), (b"A" * 2**20, inflated_mib)])
    return _zip([_member("[Content_Types].xml", _CONTENT_TYPES), _member("_rels/.rels", _RELS),
                 _Member("word/document.xml", body, crc, declared)])


def docx_with_entity_expansion(levels: int = 10) -> bytes:
    """A DOCX whose body declares nested entities ("billion laughs": 10 levels expand to 10^10 copies)."""
    entities = ['<!ENTITY e0 "lol">'] + [f'<!ENTITY e{i} "{f"&e{i - 1};" * 10}">' for i in range(1, levels)]
    xml = (f'<?xml version="1.0"?><!DOCTYPE w:document [{"".join(entities)}]><w:document {_WORD_NS}><w:body>'
           f'<w:p><w:r><w:t>&e{levels - 1};</w:t></w:r></w:p></w:body></w:document>').encode()
    return _zip([_member("[Content_Types].xml", _CONTENT_TYPES), _member("_rels/.rels", _RELS),
                 _member("word/document.xml", xml)])


def zip_of_many_entries(count: int) -> bytes:
    """A zip with ``count`` empty stored entries (a central directory that is costly to parse)."""
    return _zip([_Member(f"word/document.xml{i or ''}", b"", 0, 0, method=0) for i in range(count)])


def bomb_png(width: int, height: int, salt: int = 0) -> bytes:
    """A black 1-bit PNG of width x height pixels (8000 x 8000: about 8 KB), made distinct by ``salt``."""
    raw_row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then the packed pixels
    compressor = zlib.compressobj(9)
    rows = 64
    block = compressor.compress(raw_row * rows) + compressor.flush(zlib.Z_FULL_FLUSH)
    idat = block * (height // rows) + compressor.compress(raw_row * (height % rows)) + compressor.flush()
    return b"".join([
        b"\x89PNG\r\n\x1a\n",
        _chunk(b"IHDR", struct.pack(">2I5B", width, height, 1, 0, 0, 0, 0)),
        _chunk(b"tEXt", b"salt\x00" + str(salt).encode()),
        _chunk(b"IDAT", idat),
        _chunk(b"IEND", b""),
    ])


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def pdf_of_pages(count: int, content: bytes | None = None) -> bytes:
    """A PDF of ``count`` letter-size pages: blank (no content stream) or all drawing the same ``content``
    (e.g. ``b"1 1 1 rg 0 0 612 792 re f"``, a white box: nothing to see, but it must be rendered to know)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    first_page = 3 if content is None else 4
    kids = b" ".join(b"%d 0 R" % (first_page + i) for i in range(count))
    objects.append(b"<< /Type /Pages /Count %d /Kids [%s] >>" % (count, kids))
    contents = b""
    if content is not None:
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))
        contents = b" /Contents 3 0 R"
    page = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792]%s >>" % contents
    objects.extend([page] * count)
    out = [b"%PDF-1.7\n"]
    offsets = []
    position = len(out[0])
    for number, body in enumerate(objects, 1):
        offsets.append(position)
        chunk = b"%d 0 obj\n%s\nendobj\n" % (number, body)
        out.append(chunk)
        position += len(chunk)
    xref = [b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)]
    xref.extend(b"%010d 00000 n \n" % offset for offset in offsets)
    out.append(b"".join(xref))
    out.append(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, position))
    return b"".join(out)

