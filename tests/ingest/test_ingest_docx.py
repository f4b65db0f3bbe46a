"""DOCX ingestion on real files built with python-docx."""

from __future__ import annotations

import io
import zipfile

import pytest
from docx.oxml import parse_xml
from docx.oxml.ns import nsdecls

from glyphserve.errors import CorruptFileError, EmptyDocumentError, UnsupportedTypeError
from glyphserve.ingest import TextPart, ingest_bytes


def _fill_report(document) -> None:
    document.add_heading("Quarterly report", level=1)
    document.add_paragraph("Intro paragraph before the table.")
    table = document.add_table(rows=3, cols=3)
    values = [("Name", "Qty", "Price"), ("Apple", "3", "1.20"), ("Pear", "", "0.80")]
    for row, row_values in zip(table.rows, values):
        for cell, value in zip(row.cells, row_values):
            cell.text = value
    document.add_paragraph("")
    document.add_paragraph("")
    document.add_paragraph("Closing paragraph after the table.")
    run = document.add_paragraph("Line one").add_run()
    run.add_break()
    run.add_text("line two\tafter a tab")


def test_paragraphs_and_tables_in_reading_order(make_docx):
    document = ingest_bytes(make_docx(_fill_report), "report.docx")

    assert document.kind == "docx"
    assert document.parts == [
        TextPart(
            "Quarterly report\n"
            "Intro paragraph before the table.\n"
            "\n"
            "Name | Qty | Price\n"
            "Apple | 3 | 1.20\n"
            "Pear |  | 0.80\n"
            "\n"
            "Closing paragraph after the table.\n"
            "Line one\nline two\tafter a tab"
        )
    ]


def test_merged_and_nested_cells_are_flattened(make_docx):
    def fill(document) -> None:
        table = document.add_table(rows=2, cols=3)
        table.cell(0, 0).merge(table.cell(1, 0)).text = "Tall"
        table.cell(0, 1).text = "Top"
        table.cell(1, 1).text = "Bottom"
        inner = table.cell(0, 2).add_table(rows=2, cols=2)
        for (row, col), value in {(0, 0): "a", (0, 1): "b", (1, 0): "c", (1, 1): "d"}.items():
            inner.cell(row, col).text = value
        table.cell(1, 2).text = "End"

    text = ingest_bytes(make_docx(fill)).text

    assert text == "Tall | Top | a, b; c, d\n | Bottom | End"


def test_hyperlinks_insertions_and_content_controls_are_read(make_docx):
    def run(text: str, tag: str = "w:t") -> str:
        return f'<w:r><{tag} xml:space="preserve">{text}</{tag}></w:r>'

    def fill(document) -> None:
        paragraph = document.add_paragraph("See ")
        for xml in (
            f'<w:hyperlink {nsdecls("w")}>{run("the manual")}</w:hyperlink>',
            f'<w:ins {nsdecls("w")} w:id="1" w:author="a">{run(" now")}</w:ins>',
            f'<w:del {nsdecls("w")} w:id="2" w:author="a">{run(" gone", "w:delText")}</w:del>',
        ):
            paragraph._p.append(parse_xml(xml))
        content = f'<w:sdtContent><w:p>{run("In a control.")}</w:p></w:sdtContent>'
        paragraph._p.addnext(parse_xml(f'<w:sdt {nsdecls("w")}>{content}</w:sdt>'))

    assert ingest_bytes(make_docx(fill)).text == "See the manual now\nIn a control."


def test_document_without_text_is_empty(make_docx):
    def fill(document) -> None:
        document.add_paragraph("")
        document.add_paragraph("   ")

    with pytest.raises(EmptyDocumentError, match="no text"):
        ingest_bytes(make_docx(fill), "blank.docx")


def _rezip(data: bytes, replace: dict[str, bytes | None]) -> bytes:
    """Copy a zip, replacing entries (None drops one)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
        for item in source.infolist():
            content = replace.get(item.filename, source.read(item))
            if content is not None:
                target.writestr(item, content)
    return out.getvalue()


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],
        lambda data: _rezip(data, {"word/document.xml": b"<w:document><unclosed"}),
        lambda data: _rezip(data, {"[Content_Types].xml": None}),
        lambda data: b"PK\x03\x04word/document.xml" + bytes(range(256)) * 4,
    ],
    ids=["truncated", "broken-xml", "no-content-types", "garbage-zip"],
)
def test_corrupt_docx(make_docx, damage):
    data = damage(make_docx(lambda document: document.add_paragraph("Hello")))
    with pytest.raises(CorruptFileError, match="Word document") as info:
        ingest_bytes(data, "broken.docx")
    assert info.value.http_status == 400


def test_macro_enabled_document_is_unsupported(make_docx):
    data = make_docx(lambda document: document.add_paragraph("Hello"))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        types = archive.read("[Content_Types].xml")
    macro = types.replace(
        b"wordprocessingml.document.main+xml", b"ms-word.document.macroEnabled.main+xml"
    )
    with pytest.raises(UnsupportedTypeError, match="DOCX or PDF"):
        ingest_bytes(_rezip(data, {"[Content_Types].xml": macro}), "macro.docm")


@pytest.mark.parametrize(
    ("entries", "detected"),
    [
        ({"notes.txt": b"hello"}, "ZIP archive"),
        ({"xl/workbook.xml": b"<workbook/>"}, "Excel"),
        ({"mimetype": b"application/vnd.oasis.opendocument.text"}, "OpenDocument"),
    ],
)
def test_other_zip_files_are_unsupported(entries, detected):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    with pytest.raises(UnsupportedTypeError, match=detected) as info:
        ingest_bytes(buffer.getvalue(), "archive.docx")
    assert "supported types are PDF, DOCX" in info.value.message
