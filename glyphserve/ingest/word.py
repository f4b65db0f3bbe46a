"""DOCX body to text: paragraphs and tables in reading order, read as the XML streams.

Each paragraph is a line; runs of empty paragraphs become one blank line. A table is set
off by blank lines and gives one line per row, cells joined with " | "; a nested table
is flattened into its cell. Headers, footers, footnotes, text boxes and images are not read.

The main document part is inflated in chunks (counted against the unpacked-size budget, whatever
the zip's headers declare) and fed to a streaming XML parser that builds no tree: memory follows the
text kept, and paragraphs and characters are counted as they arrive, so a small file that unpacks
to millions of paragraphs is refused after reading only as many as the limit allows. DTDs are
refused outright (Word never writes one), which rules out entity expansion and external entities.
"""

from __future__ import annotations

import io
import posixpath
import zipfile
from xml.parsers import expat

from glyphserve.errors import CorruptFileError, FileTooLargeError, UnsupportedTypeError
from glyphserve.ingest.archive import InflateBudget
from glyphserve.ingest.limits import IngestLimits

CELL_SEPARATOR = " | "
WORD_MAIN = "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"

_W = "http://schemas.openxmlformats.org/wordprocessingml/2006/main "  # expat joins namespace and name with " "
_RELS = "http://schemas.openxmlformats.org/package/2006/relationships "
_TYPES = "http://schemas.openxmlformats.org/package/2006/content-types "
_OFFICE_DOCUMENT = "http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument"
_SMALL_PART = 4 * 2**20  # relationships and content types: a few KB in any real file

# Elements that wrap body blocks, or runs inside a paragraph, without changing their meaning.
_BLOCK_WRAPPERS = frozenset(_W + tag for tag in ("sdt", "sdtContent", "customXml"))
_RUN_WRAPPERS = frozenset(
    _W + tag
    for tag in ("hyperlink", "ins", "moveTo", "smartTag", "fldSimple", "sdt", "sdtContent", "customXml", "dir", "bdo")
)
# Run content with a fixed text (w:t carries its own; w:br depends on its type).
_RUN_SYMBOLS = {_W + "tab": "\t", _W + "ptab": "\t", _W + "cr": "\n", _W + "noBreakHyphen": "-"}


def read_docx(data: bytes, name: str, limits: IngestLimits = IngestLimits()) -> str:
    """The document body as text ("" when it has none)."""
    budget = InflateBudget(limits.max_unpacked_bytes, name)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        main = _main_part(archive, budget, name)
        reader = _BodyReader(name, limits)
        parser = _parser(name)
        reader.attach(parser)
        for chunk in budget.chunks(archive, main):
            parser.Parse(chunk, False)
        parser.Parse(b"", True)
    return _squeeze_blank_lines(reader.lines)


def _parser(name: str) -> expat.XMLParserType:
    """An XML parser for a part of the Word file ``name`` that refuses any DTD (entities expand without bound)."""

    def refuse_dtd(*_args) -> None:
        raise CorruptFileError(f"{name}: its XML declares a DTD, which Word never writes")

    parser = expat.ParserCreate(namespace_separator=" ")
    parser.buffer_text = True
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = refuse_dtd
    parser.EntityDeclHandler = refuse_dtd
    return parser


def _main_part(archive: zipfile.ZipFile, budget: InflateBudget, name: str) -> str:
    """The zip member holding the document body (the package's officeDocument relationship),
    refused unless it is a plain Word document (not a template or macro-enabled)."""
    target = None

    def relationship(tag, attrs):
        nonlocal target
        if tag == _RELS + "Relationship" and attrs.get("Type") == _OFFICE_DOCUMENT and target is None:
            target = attrs.get("Target", "")

    _parse_small(archive, "_rels/.rels", budget, relationship, name)
    if not target:
        raise CorruptFileError(f"{name} names no main document part")
    part = posixpath.normpath(target.lstrip("/"))
    defaults: dict[str, str] = {}
    overrides: dict[str, str] = {}

    def content_type(tag, attrs):
        if tag == _TYPES + "Default":
            defaults[attrs.get("Extension", "").lower()] = attrs.get("ContentType", "")
        elif tag == _TYPES + "Override":
            overrides[attrs.get("PartName", "").lstrip("/")] = attrs.get("ContentType", "")

    _parse_small(archive, "[Content_Types].xml", budget, content_type, name)
    kind = overrides.get(part) or defaults.get(posixpath.splitext(part)[1].lstrip(".").lower())
    if kind != WORD_MAIN:
        raise UnsupportedTypeError(
            f"{name} is a Word template or macro-enabled document; save it as DOCX or PDF"
        )
    return part


def _parse_small(archive: zipfile.ZipFile, member: str, budget: InflateBudget, start, name: str) -> None:
    if archive.getinfo(member).file_size > _SMALL_PART:
        raise CorruptFileError(f"{name}: the package part {member} is implausibly large")
    parser = _parser(name)
    parser.StartElementHandler = start
    parser.Parse(budget.read(archive, member), True)


def _children(roles: dict[str, str], wrappers: frozenset[str], wrapper_role: str) -> dict[str, str]:
    return {**{_W + tag: role for tag, role in roles.items()}, **dict.fromkeys(wrappers, wrapper_role)}


# For each role, the roles of the children that are read; any other child is skipped with its subtree.
_BLOCKS = _children({"p": "paragraph", "tbl": "table"}, _BLOCK_WRAPPERS, "blocks")
_CHILD_ROLES = {
    "start": {_W + "document": "document"},
    "document": {_W + "body": "body"},
    "body": _BLOCKS,
    "blocks": _BLOCKS,
    "cell": {**_BLOCKS, _W + "tcPr": "cell-properties"},
    "paragraph": _children({"r": "run"}, _RUN_WRAPPERS, "runs"),
    "runs": _children({"r": "run"}, _RUN_WRAPPERS, "runs"),
    "run": {_W + "t": "text"},
    "table": _children({"tr": "row"}, _BLOCK_WRAPPERS, "rows"),
    "rows": _children({"tr": "row"}, _BLOCK_WRAPPERS, "rows"),
    "row": _children({"tc": "cell"}, _BLOCK_WRAPPERS, "row-cells"),
    "row-cells": _children({"tc": "cell"}, _BLOCK_WRAPPERS, "row-cells"),
    "cell-properties": {},
    "text": {},
}


class _Frame:
    """One open element that is read: its role, and what it collects."""

    __slots__ = ("role", "children", "texts", "rows", "cells", "merged")

    def __init__(self, role: str):
        self.role = role
        self.children = _CHILD_ROLES[role]
        self.texts: list[str] = []  # paragraph: its text pieces; cell: its blocks' texts
        self.rows: list[list[str]] = []  # table
        self.cells: list[str] = []  # row
        self.merged = False  # cell: covered by the cell above (vMerge "continue")


class _BodyReader:
    """Expat callbacks that keep the body's text and nothing else: a stack of the open elements that are
    read (document, body, table, row, cell, paragraph, run, text, and the wrappers between them); any
    other element is skipped with everything inside it."""

    def __init__(self, name: str, limits: IngestLimits):
        self.name = name
        self.limits = limits
        self.stack = [_Frame("start")]
        self.paragraph: _Frame | None = None  # the open paragraph (paragraphs do not nest)
        self.cells: list[_Frame] = []  # open table cells, innermost last
        self.skipping = 0  # depth inside an element that is not read
        self.lines: list[str] = []
        self.paragraphs = 0
        self.characters = 0

    def attach(self, parser: expat.XMLParserType) -> None:
        parser.StartElementHandler = self.start
        parser.EndElementHandler = self.end
        parser.CharacterDataHandler = self.text

    def start(self, tag: str, attrs: dict) -> None:
        if self.skipping:
            self.skipping += 1
            return
        parent = self.stack[-1]
        role = parent.children.get(tag)
        if role is None:
            self.skipping = 1
            if parent.role == "run":
                self._run_symbol(tag, attrs)
            elif parent.role == "cell-properties" and tag == _W + "vMerge":
                self.cells[-1].merged = attrs.get(_W + "val", "continue") == "continue"
            return
        frame = _Frame(role)
        self.stack.append(frame)
        if role == "paragraph":
            self.paragraph = frame
        elif role == "cell":
            self.cells.append(frame)

    def _run_symbol(self, tag: str, attrs: dict) -> None:
        symbol = _RUN_SYMBOLS.get(tag)
        if tag == _W + "br":  # a line break; page and column breaks have no text
            symbol = "\n" if attrs.get(_W + "type", "textWrapping") == "textWrapping" else None
        if symbol is not None:
            self._count(1)
            self.paragraph.texts.append(symbol)

    def text(self, data: str) -> None:
        if not self.skipping and self.stack[-1].role == "text":
            self._count(len(data))
            self.paragraph.texts.append(data)

    def _count(self, n: int) -> None:
        """``n`` more characters of the text this file makes: its own, and the tabs, breaks and separators read
        makes of its symbols, cells and lines (5,000 <w:tab/> of a small file were 5,000 characters no limit
        counted, and a parser process's answer held to the limit was refused)."""
        self.characters += n
        if self.characters > self.limits.max_characters:
            raise FileTooLargeError(
                f"{self.name} holds more than {self.limits.max_characters:,} characters of text, this "
                "server's limit (--max-characters)"
            )

    def end(self, _tag: str) -> None:
        if self.skipping:
            self.skipping -= 1
            return
        frame = self.stack.pop()
        role = frame.role
        if role == "paragraph":
            self.paragraph = None
            self.paragraphs += 1
            if self.paragraphs > self.limits.max_paragraphs:
                raise FileTooLargeError(
                    f"{self.name} has more than {self.limits.max_paragraphs:,} paragraphs, this server's limit "
                    "(--max-docx-paragraphs)"
                )
            text = "".join(frame.texts)
            self._count(1)  # the newline after its line, or the space between a cell's paragraphs
            if self.cells:
                self.cells[-1].texts.append(" ".join(text.split()))
            else:
                self.lines.append(text if text.strip() else "")
        elif role == "table":
            self._count(2)  # the blank lines around it (in a cell: the separator before it)
            if self.cells:
                self.cells[-1].texts.append("; ".join(", ".join(row) for row in frame.rows))
            else:
                self.lines.extend(["", *(CELL_SEPARATOR.join(row) for row in frame.rows), ""])
        elif role == "row":
            self._count(2)  # its line's newline, or "; " between the rows of a table in a cell
            if any(frame.cells):
                self._open("table").rows.append(frame.cells)
        elif role == "cell":
            self._count(len(CELL_SEPARATOR))  # before the next cell of its row
            self.cells.pop()
            self._open("row").cells.append("" if frame.merged else " ".join(p for p in frame.texts if p))

    def _open(self, role: str) -> _Frame:
        """The innermost open element with ``role`` (a row's table, a cell's row: only wrappers between)."""
        for frame in reversed(self.stack):
            if frame.role == role:
                return frame
        raise AssertionError(f"no open {role}")  # rows open only inside tables, cells only inside rows


def _squeeze_blank_lines(lines: list[str]) -> str:
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)
