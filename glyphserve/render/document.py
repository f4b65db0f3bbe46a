"""Rendered pages, their manifest, and writing them to disk."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glyphserve.render.config import RenderConfig, has_cjk
from glyphserve.render.official import OFFICIAL_ZH_FONT
from glyphserve.render.fonts import ResolvedFont


ENCODER_THREADS = 2  # PNG encoding beside the thread that renders or writes (the cores of the CI VM)
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
    # as painted, auto-cropped: HxW grey (no colour on the page) or HxWx3 RGB; None once only its
    # PNG file is kept (``render_document(..., encode=True)``)
    pixels: np.ndarray | None
    char_span: tuple[int, int]  # [start, end) into the source text
    lines: list[PageLine]
    vision_tokens: int
    kind: str = "text"  # "text" | "scan"
    missing_chars: int = 0  # characters drawn on the page as missing-glyph boxes (no font drawn from has them)
    encoded: bytes | None = None  # the page's PNG file, once made

    @property
    def image(self) -> np.ndarray:
        """HxWx3 uint8 RGB (a grey page is expanded, a page kept as a file decoded, on first use)."""
        if self.pixels is None:
            from glyphserve.render.png import decode_png

            self.pixels = decode_png(self.encoded)
        elif self.pixels.ndim == 2:
            self.pixels = np.repeat(self.pixels[..., None], 3, axis=2)
        return self.pixels

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        if self.pixels is None:
            from glyphserve.render.png import png_size

            return png_size(self.encoded)
        return self.pixels.shape[1], self.pixels.shape[0]

    def png(self) -> bytes:
        """The page as a PNG file (made on first use, grey when the page has no colour)."""
        if self.encoded is None:
            from glyphserve.render.png import encode_png

            self.encoded = encode_png(self.pixels)
        return self.encoded

    def manifest(self) -> dict:
        w, h = self.size
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
    missing_chars: int = 0  # characters drawn as missing-glyph boxes (no font drawn from has them)
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


def missing_glyphs_warning(rendered: RenderedDocument, command_line: bool = True) -> str | None:
    """What to tell the user when many characters are drawn as missing-glyph boxes (as the
    official pipeline draws them), and what to do about it (``command_line``: with ``render``'s flags; else what
    a server's user can choose, its preset); None when few or none are."""
    s = rendered.stats
    few = s.missing_chars < min(MANY_MISSING, MANY_MISSING_SHARE * s.characters)
    if rendered.config.fallback_fonts or not s.missing_chars or few:  # none: a page of no text (a scan) too
        return None
    font = rendered.font.manifest()["name"] if rendered.font else rendered.config.font_path
    examples = ", ".join(f"U+{ord(ch):04X}" + (f" {ch}" if ch.isprintable() else "") for ch in s.missing_examples)
    zh_font = Path(rendered.config.font_path).name.lower() == OFFICIAL_ZH_FONT.lower()
    if not zh_font and sum(map(has_cjk, s.missing_examples)) * 2 >= len(s.missing_examples):
        advice = "for Chinese text use the glyph-zh preset" + (" (--preset glyph-zh)" if command_line else "")
    elif command_line:
        advice = ("use a font that has them (--font PATH), or draw them from installed fonts with --fallback-fonts "
                  "(pages then differ from the ones Glyph was trained on)")
    else:
        advice = "the model cannot read them from the pages"
    return (f"{s.missing_chars} characters are not in the font {font} (e.g. {examples}); they are drawn as empty "
            f"boxes, as Glyph's own renderer draws them: {advice}")


def page_filename(number: int) -> str:
    return f"page_{number:03d}.png"


def write_rendered(rendered: RenderedDocument, out_dir: str | Path, *, durable: bool = False) -> Path:
    """Write ``page_001.png``, ... and ``manifest.json`` into ``out_dir`` (created if needed). Pages an
    earlier, longer render left there (``page_NNN.png`` past the new last page) are removed, so the folder
    holds this document's pages only.

    Pages not yet encoded are encoded in threads (the encoder releases the GIL). With
    ``durable``, every file and the folder are flushed to disk (fsync) before this returns.
    """
    from concurrent.futures import ThreadPoolExecutor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [(out / page_filename(p.number), p) for p in rendered.pages]
    with ThreadPoolExecutor(max_workers=min(len(files), ENCODER_THREADS) or 1) as pool:
        for path, data in zip((f for f, _ in files), pool.map(lambda item: item[1].png(), files)):
            write_file(path, data, durable)
    manifest = json.dumps(rendered.manifest(), ensure_ascii=False, indent=1).encode("utf-8")
    write_file(out / "manifest.json", manifest, durable)
    written = {path.name for path, _ in files}
    for stale in out.glob("page_[0-9][0-9][0-9]*.png"):
        if stale.name not in written and stale.name[len("page_"):-len(".png")].isdigit():
            stale.unlink()
    if durable:
        sync_folder(out)
    return out


def write_file(path: Path, data: bytes, durable: bool) -> None:
    """Write ``data`` to ``path``; with ``durable``, flushed to disk before returning."""
    with open(path, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (files created or renamed in it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
