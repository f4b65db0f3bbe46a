"""Files to text: PDF, DOCX, plain text and Markdown, with the type sniffed from content.

PDF pages without a text layer (scans) are kept as page images in reading order.
"""

from glyphserve.ingest.api import (
    DEFAULT_MAX_BYTES,
    ingest_bytes,
    ingest_path,
    ingest_text,
    normalize_text,
)
from glyphserve.ingest.document import Document, ImagePart, TextPart
from glyphserve.ingest.sniff import sniff_type

__all__ = [
    "DEFAULT_MAX_BYTES",
    "Document",
    "ImagePart",
    "TextPart",
    "ingest_bytes",
    "ingest_path",
    "ingest_text",
    "normalize_text",
    "sniff_type",
]
