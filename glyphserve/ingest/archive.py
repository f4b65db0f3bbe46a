"""Zip members read in chunks with the bytes actually inflated counted against a budget.

A zip's headers declare each member's size, but a hostile file can declare 1 KB and inflate to gigabytes.
Reading in small chunks keeps the inflater's output per call small, and the budget stops the read at the
limit whatever the headers say.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator

from glyphserve.errors import FileTooLargeError

MAX_ENTRIES = 10_000  # a Word document has tens of parts; the central directory is parsed whole on open
_CHUNK = 256 * 1024
_CENTRAL_ENTRY = b"PK\x01\x02"


def check_entry_count(data: bytes, label: str) -> None:
    """Refuse archives whose central directory would cost more to parse than any Word document needs
    (counted from the raw bytes, so a lying end record cannot hide entries)."""
    if data.count(_CENTRAL_ENTRY) > MAX_ENTRIES:
        raise FileTooLargeError(f"{label} is a zip archive with more than {MAX_ENTRIES:,} entries")


class InflateBudget:
    """Bytes that may still be inflated from one archive, across all members read."""

    def __init__(self, limit: int, label: str):
        self.limit = limit
        self.used = 0
        self.label = label

    def spend(self, size: int) -> None:
        self.used += size
        if self.used > self.limit:
            raise FileTooLargeError(
                f"{self.label} unpacks to more than {self.limit / 2**20:.0f} MiB, this server's limit for "
                "Word documents (--max-unpacked-mb)"
            )

    def chunks(self, archive: zipfile.ZipFile, name: str) -> Iterator[bytes]:
        """The member's bytes as they inflate; raises once the budget is spent (KeyError: no such member)."""
        info = archive.getinfo(name)
        if self.used + info.file_size > self.limit:  # declared too large: no need to inflate anything
            self.spend(info.file_size)
        with archive.open(info) as stream:
            while chunk := stream.read(_CHUNK):
                self.spend(len(chunk))
                yield chunk

    def read(self, archive: zipfile.ZipFile, name: str) -> bytes:
        return b"".join(self.chunks(archive, name))
