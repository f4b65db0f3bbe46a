"""Rendered pages, their manifest, and writing them to disk."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glyphserve.render.config import RenderConfig
from glyphserve.render.fonts import ResolvedFont


@dataclass
class PageLine:
    text: str  # the characters drawn on the line (U+00A0 where the source had runs of spaces)
    y: float  # baseline, px from the top of the page image


@dataclass
class RenderedPage:
    number: int  # 1-based
    image: np.ndarray  # HxWx3 uint8 RGB, already auto-cropped
    char_span: tuple[int, int]  # [start, end) into the source text
    lines: list[PageLine]
    vision_tokens: int
    kind: str = "text"  # "text" | "scan"

    def manifest(self) -> dict:
        h, w = self.image.shape[:2]
        return {
            "number": self.number,
            "file": page_filename(self.number),
            "kind": self.kind,
            "width": int(w),
            "height": int(h),
            "char_span": [int(self.char_span[0]), int(self.char_span[1])],
            "vision_tokens": self.vision_tokens,
            "lines": [{"text": ln.text, "y": round(ln.y, 3)} for ln in self.lines],
        }


@dataclass
class RenderStats:
    characters: int
    text_tokens: int
    text_token_method: str
    vision_tokens: int
    seconds: float

    @property
    def compression_ratio(self) -> float:
        """Text tokens per vision token (how much Glyph compresses the text)."""
        return self.text_tokens / self.vision_tokens if self.vision_tokens else 0.0


@dataclass
class RenderedDocument:
    config: RenderConfig
    pages: list[RenderedPage]
    stats: RenderStats
    font: ResolvedFont | None = None
    source_name: str | None = None
    extra: dict = field(default_factory=dict)

    def manifest(self) -> dict:
        """Everything about the rendering, JSON-serialisable (what ``manifest.json`` holds)."""
        from glyphserve import __version__

        s = self.stats
        out = {
            "glyphserve_version": __version__,
            "source": self.source_name,
            "config": self.config.to_glyph_dict(),
            "font": self.font.manifest() if self.font else None,
            "pages": [p.manifest() for p in self.pages],
            "totals": {
                "pages": len(self.pages),
                "characters": s.characters,
                "text_tokens": s.text_tokens,
                "text_token_method": s.text_token_method,
                "vision_tokens": s.vision_tokens,
                "compression_ratio": round(s.compression_ratio, 4),
                "render_seconds": round(s.seconds, 4),
            },
        }
        out.update(self.extra)
        return out


def page_filename(number: int) -> str:
    return f"page_{number:03d}.png"


def write_rendered(rendered: RenderedDocument, out_dir: str | Path) -> Path:
    """Write ``page_001.png``, ... and ``manifest.json`` into ``out_dir`` (created if needed)."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for page in rendered.pages:
        Image.fromarray(np.ascontiguousarray(page.image)).save(out / page_filename(page.number), compress_level=1)
    (out / "manifest.json").write_text(json.dumps(rendered.manifest(), ensure_ascii=False, indent=1), encoding="utf-8")
    return out
