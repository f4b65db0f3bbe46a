"""Rendered pages, their manifest, and writing them to disk."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glyphserve.render.config import OFFICIAL_ZH_FONT, RenderConfig, has_cjk
from glyphserve.render.fonts import ResolvedFont


# A document "has many" missing glyphs from this many, or this share of its characters.
MANY_MISSING = 100
MANY_MISSING_SHARE = 0.01


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
    missing_chars: int = 0  # characters drawn on the page that the main font has no glyph for

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
            "missing_chars": self.missing_chars,
            "lines": [{"text": ln.text, "y": round(ln.y, 3)} for ln in self.lines],
        }


@dataclass
class RenderStats:
    characters: int
    text_tokens: int
    text_token_method: str
    vision_tokens: int
    seconds: float
    missing_chars: int = 0  # characters drawn that the main font has no glyph for
    missing_examples: tuple[str, ...] = ()  # the ones used most, most used first

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
                "missing_chars": s.missing_chars,
                "missing_examples": [f"U+{ord(ch):04X} {ch}" for ch in s.missing_examples],
            },
        }
        out.update(self.extra)
        return out


def missing_glyphs_warning(rendered: RenderedDocument) -> str | None:
    """What to tell the user when many characters are drawn as missing-glyph boxes (as the
    official pipeline draws them), and what to do about it; None when few or none are."""
    s = rendered.stats
    if rendered.config.fallback_fonts or s.missing_chars < min(MANY_MISSING, MANY_MISSING_SHARE * s.characters):
        return None
    font = rendered.font.manifest()["name"] if rendered.font else rendered.config.font_path
    examples = ", ".join(f"U+{ord(ch):04X}" + (f" {ch}" if ch.isprintable() else "") for ch in s.missing_examples)
    zh_font = Path(rendered.config.font_path).name.lower() == OFFICIAL_ZH_FONT.lower()
    if not zh_font and sum(map(has_cjk, s.missing_examples)) * 2 >= len(s.missing_examples):
        advice = "for Chinese text use the glyph-zh preset (--preset glyph-zh)"
    else:
        advice = ("use a font that has them (--font PATH), or draw them from installed fonts with --fallback-fonts "
                  "(pages then differ from the ones Glyph was trained on)")
    return (f"{s.missing_chars} characters are not in the font {font} (e.g. {examples}); they are drawn as empty "
            f"boxes, as Glyph's own renderer draws them: {advice}")


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
