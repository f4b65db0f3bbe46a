"""What reading one file may cost. Each limit is checked before (or while) doing the work it bounds, so a
small hostile file cannot make ingestion take unbounded memory or time."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_BYTES = 50 * 2**20
MAX_IMAGE_SIDE = 2000  # px, a scanned page's longer side as read (larger pages are read at a lower resolution)


@dataclass(frozen=True)
class IngestLimits:
    max_bytes: int | None = DEFAULT_MAX_BYTES  # the file itself (pasted text: its UTF-8 bytes); None: no limit
    max_pdf_pages: int = 2_000  # read from the PDF's page count, before any page is opened
    max_scan_pages: int = 100  # PDF pages without a text layer, kept as images (up to 12 MB of pixels each, as read)
    max_characters: int = 20_000_000  # text read from a PDF or DOCX, counted as it is read
    max_paragraphs: int = 200_000  # DOCX paragraphs (empty ones too), counted while the XML streams
    max_unpacked_bytes: int = 128 * 2**20  # bytes actually inflated from a DOCX's zip, whatever its headers say
    # Seconds to parse a PDF or DOCX in a child process that is killed past it; None parses in this process.
    timeout: float | None = None
    max_parser_memory: int | None = 2 * 2**30  # address space of that child process (bytes); None: no limit
