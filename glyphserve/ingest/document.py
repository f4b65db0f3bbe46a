"""What ingestion produces: a document as text and page images in reading order."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PART_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True, eq=False)  # arrays have no single truth value, so compare by identity
class ImagePart:
    """A page without a text layer (a scan), kept as an image for the model to read."""

    image: np.ndarray | None  # HxWx3 uint8 RGB; None once made into what is kept instead (``ingest_bytes(keep=)``)
    source_page: int  # 1-based page in the source file


@dataclass
class Document:
    kind: str  # "txt" | "markdown" | "pdf" | "docx" | "text" (pasted)
    parts: list[TextPart | ImagePart] = field(default_factory=list)
    source_name: str | None = None
    source_bytes: int = 0
    encoding: str | None = None  # detected text encoding for txt/markdown

    @property
    def text(self) -> str:
        """All text parts joined with a blank line."""
        return PART_SEPARATOR.join(part.text for part in self.parts if isinstance(part, TextPart))
