"""Damaged files end in a typed error for the user, never in a raw exception."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glyphserve.errors import GlyphserveError
from glyphserve.ingest import Document, ingest_bytes


@st.composite
def damaged(draw, data: bytes) -> bytes:
    data = bytearray(data)
    how = draw(st.sampled_from(["flip", "truncate", "splice"]))
    if how == "flip":
        for position in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=20)):
            data[position] = draw(st.integers(0, 255))
    elif how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    else:
        start = draw(st.integers(0, len(data) - 1))
        data[start : start + draw(st.integers(1, 400))] = draw(st.binary(min_size=1, max_size=400))
    return bytes(data)


def _ingest_or_user_error(data: bytes) -> None:
    try:
        document = ingest_bytes(data)
    except GlyphserveError as exc:
        assert exc.message and 400 <= exc.http_status < 500
    else:
        assert isinstance(document, Document) and document.parts


@pytest.fixture(scope="module")
def pdf_sample(make_pdf) -> bytes:
    return make_pdf([("text", ["A page of text. " * 20]), ("scan", ["scanned"])])


@pytest.fixture(scope="module")
def docx_sample(make_docx) -> bytes:
    def fill(document) -> None:
        document.add_paragraph("Some text.")
        document.add_table(rows=2, cols=2).cell(0, 0).text = "cell"

    return make_docx(fill)


_SETTINGS = settings(max_examples=60, deadline=None)


@_SETTINGS
@given(data=st.data())
def test_damaged_pdf(pdf_sample, data):
    _ingest_or_user_error(data.draw(damaged(pdf_sample)))


@_SETTINGS
@given(data=st.data())
def test_damaged_docx(docx_sample, data):
    _ingest_or_user_error(data.draw(damaged(docx_sample)))
