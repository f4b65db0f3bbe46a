"""Files to text: PDF, DOCX, plain text and Markdown, with the type sniffed from content.

PDF pages without a text layer (scans) are kept as page images in reading order. Every read is
bounded by :class:`IngestLimits`; with a timeout set, PDF and DOCX files are parsed in child processes.
"""

from glyphserve.ingest.api import (
    MAX_NAME_CHARS,
    clean_filename,
    clean_name,
    ingest_bytes,
    ingest_path,
    ingest_source,
    ingest_text,
    normalize_text,
)
from glyphserve.ingest.document import Document, ImagePart, TextPart
from glyphserve.ingest.limits import DEFAULT_MAX_BYTES, IngestLimits
from glyphserve.ingest.parsing import shutdown as shutdown_parsers
from glyphserve.ingest.sniff import sniff_type

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_NAME_CHARS",
    "Document",
    "ImagePart",
    "IngestLimits",
    "TextPart",
    "clean_filename",
    "clean_name",
    "ingest_bytes",
    "ingest_path",
    "ingest_source",
    "ingest_text",
    "normalize_text",
    "shutdown_parsers",
    "sniff_type",
]
