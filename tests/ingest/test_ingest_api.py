"""Entry points: size limits, paths, and errors that reach the user."""

from __future__ import annotations

import os

import pytest

from glyphserve.errors import FileTooLargeError, NotFoundError, UnsupportedTypeError
from glyphserve.ingest import DEFAULT_MAX_BYTES, IngestLimits, ingest_bytes, ingest_path, ingest_text


def test_default_limit_is_50_mib():
    assert DEFAULT_MAX_BYTES == 50 * 2**20


def test_bytes_over_the_limit():
    with pytest.raises(FileTooLargeError) as info:
        ingest_bytes(b"x" * 2048, "big.txt", limits=IngestLimits(max_bytes=1024))
    message = info.value.message
    assert "'big.txt' is 2.0 KiB" in message and "limit of 1.0 KiB" in message
    assert "--max-upload-mb" in message
    assert info.value.http_status == 413


def test_limit_can_be_lifted():
    assert ingest_bytes(b"x" * 2048, limits=IngestLimits(max_bytes=None)).text == "x" * 2048


def test_path_size_is_checked_before_reading(tmp_path):
    # A sparse 8 GiB file: reading it would take seconds and gigabytes.
    path = tmp_path / "huge.txt"
    with path.open("wb") as handle:
        handle.truncate(8 * 2**30)
    with pytest.raises(FileTooLargeError, match="8192.0 MiB"):
        ingest_path(path)


def test_path_reads_a_file(tmp_path):
    path = tmp_path / "chapter.md"
    path.write_bytes("# Chapter\r\n\r\nText.".encode("utf-16"))
    document = ingest_path(str(path))
    assert (document.kind, document.source_name) == ("markdown", "chapter.md")
    assert document.text == "# Chapter\n\nText."
    assert document.source_bytes == os.path.getsize(path)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(NotFoundError, match="no such file"):
        ingest_path(tmp_path / "missing.pdf")
    with pytest.raises(UnsupportedTypeError, match="directory"):
        ingest_path(tmp_path)


def test_source_name_drops_directories():
    assert ingest_bytes(b"hello", "/uploads/user/notes.txt").source_name == "notes.txt"
    assert ingest_bytes(b"hello", "C:\\Users\\me\\notes.md").source_name == "notes.md"
    assert ingest_bytes(b"hello", "").source_name is None


def test_pasted_text_limit():
    with pytest.raises(FileTooLargeError, match="the text"):
        ingest_text("é" * 600, limits=IngestLimits(max_bytes=1000))
