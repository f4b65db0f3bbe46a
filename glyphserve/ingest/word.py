"""DOCX body to text: paragraphs and tables in reading order.

Each paragraph is a line; runs of empty paragraphs become one blank line. A table is set
off by blank lines and gives one line per row, cells joined with " | "; a nested table
is flattened into its cell. Headers, footers, footnotes, text boxes and images are not read.
"""

from __future__ import annotations

import io
import zipfile

import docx
from docx.oxml.ns import qn

from glyphserve.errors import FileTooLargeError, UnsupportedTypeError

CELL_SEPARATOR = " | "
MAX_UNPACKED_BYTES = 2**30  # a zip bomb guard: total uncompressed size of all parts

_P, _TBL, _TR, _TC, _R = qn("w:p"), qn("w:tbl"), qn("w:tr"), qn("w:tc"), qn("w:r")
# Elements that wrap body blocks, or runs inside a paragraph, without changing their meaning.
_BLOCK_WRAPPERS = frozenset(map(qn, ("w:sdt", "w:sdtContent", "w:customXml")))
_RUN_WRAPPERS = frozenset(
    qn(tag)
    for tag in (
        "w:hyperlink", "w:ins", "w:moveTo", "w:smartTag", "w:fldSimple",
        "w:sdt", "w:sdtContent", "w:customXml", "w:dir", "w:bdo",
    )
)


def read_docx(data: bytes, name: str) -> str:
    """The document body as text ("" when it has none)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        unpacked = sum(info.file_size for info in archive.infolist())
    if unpacked > MAX_UNPACKED_BYTES:
        raise FileTooLargeError(
            f"{name} unpacks to {unpacked / 2**20:.0f} MiB, over the "
            f"{MAX_UNPACKED_BYTES / 2**20:.0f} MiB limit for Word documents"
        )
    try:
        document = docx.Document(io.BytesIO(data))
    except ValueError as exc:
        if "not a Word file" not in str(exc):
            raise
        raise UnsupportedTypeError(
            f"{name} is a Word template or macro-enabled document; save it as DOCX or PDF"
        ) from exc
    lines: list[str] = []
    for block in _blocks(document.element.body):
        if isinstance(block, str):
            lines.append(block if block.strip() else "")
        else:
            lines.extend(["", *(CELL_SEPARATOR.join(row) for row in block), ""])
    return _squeeze_blank_lines(lines)


def _blocks(container):
    """Paragraph texts (str) and tables (rows of cell texts) in document order."""
    for child in container.iterchildren():
        if child.tag == _P:
            yield _paragraph_text(child)
        elif child.tag == _TBL:
            yield _table_rows(child)
        elif child.tag in _BLOCK_WRAPPERS:
            yield from _blocks(child)


def _paragraph_text(element) -> str:
    parts = []
    for child in element.iterchildren():
        if child.tag == _R:
            parts.append(child.text)  # python-docx maps w:tab, w:br, ... to \t, \n
        elif child.tag in _RUN_WRAPPERS:
            parts.append(_paragraph_text(child))
    return "".join(parts)


def _table_rows(table) -> list[list[str]]:
    rows = []
    for row in _children(table, _TR):
        cells = [
            "" if cell.vMerge == "continue" else _cell_text(cell)  # covered by the cell above
            for cell in _children(row, _TC)
        ]
        if any(cells):
            rows.append(cells)
    return rows


def _cell_text(cell) -> str:
    pieces = []
    for block in _blocks(cell):
        if isinstance(block, str):
            pieces.append(" ".join(block.split()))
        else:
            pieces.append("; ".join(", ".join(row) for row in block))
    return " ".join(piece for piece in pieces if piece)


def _children(element, tag: str):
    """Child elements with ``tag``, looking through content controls and custom XML."""
    for child in element.iterchildren():
        if child.tag == tag:
            yield child
        elif child.tag in _BLOCK_WRAPPERS:
            yield from _children(child, tag)


def _squeeze_blank_lines(lines: list[str]) -> str:
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)
