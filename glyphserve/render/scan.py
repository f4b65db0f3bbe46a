"""Scans (PDF pages without a text layer) as pages: scaled down to fit the page size and centred on white up to
GLM-4.1V's aspect limit, when the document renders or (``fit_scans``) as each scan is read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from glyphserve.glm4v import MAX_ASPECT, vision_tokens
from glyphserve.ingest.document import ImagePart
from glyphserve.render.config import RenderConfig, preset_configs
from glyphserve.render.document import RenderedPage
from glyphserve.render.png import encode_png, png_size
from glyphserve.render.raster import page_pixels

PageSize = tuple[int, int]  # (width, height) in px


@dataclass(frozen=True, eq=False)
class FittedScan(ImagePart):
    """A scan made into its page as it was read, its pixels dropped (``image`` is None): the page's PNG file for
    each page size its document may render at."""

    files: dict[PageSize, bytes] = field(default_factory=dict)


def fit_scans(
    preset: str = "auto",
    dpi: float | None = None,
    config: RenderConfig | str | Path | dict[str, Any] | None = None,
    *,
    glyph_repo: str | Path | None = None,
) -> Callable[[ImagePart], FittedScan]:
    """What a document keeps of each scan as it is read (``ingest_bytes(keep=...)``) when it will render with
    ``resolve_config(text, preset, config, dpi, glyph_repo=glyph_repo, ...)`` (its other arguments do not change
    the page size): its page for every page size those settings may give whatever the text (one: auto's two presets
    share theirs), so no scan's pixels wait for the text to choose the preset."""
    sizes = {page_pixels(cfg) for cfg in preset_configs(preset, dpi, config, glyph_repo=glyph_repo)}

    def keep(part: ImagePart) -> FittedScan:
        return FittedScan(None, part.source_page, {size: encode_png(_fit(part.image, size)) for size in sizes})

    return keep


def scan_page(part: ImagePart, config: RenderConfig, number: int, offset: int) -> RenderedPage:
    """The page of a scan at ``config``'s page size (a :class:`FittedScan`'s file for it, no pixels decoded)."""
    size = page_pixels(config)
    if isinstance(part, FittedScan):
        encoded = part.files[size]
        w, h = png_size(encoded)
        return RenderedPage(number, None, (offset, offset), [], vision_tokens(h, w), "scan", encoded=encoded)
    pixels = _fit(part.image, size)
    h, w = pixels.shape[:2]
    return RenderedPage(number, pixels, (offset, offset), [], vision_tokens(h, w), "scan")


def _fit(image: np.ndarray, size: PageSize) -> np.ndarray:
    from PIL import Image

    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3].astype(np.uint8, copy=False)
    max_w, max_h = size
    h, w = img.shape[:2]
    scale = min(max_w / w, max_h / h, 1.0)
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = np.asarray(Image.fromarray(img).resize(size, Image.LANCZOS))
    h, w = img.shape[:2]
    # GLM-4.1V's processor refuses images longer than MAX_ASPECT times their width (or the reverse): a sliver of a
    # page (a PDF page of 6 x 2000 pt, a strip of a scan) is centred on white up to that ratio, not refused with
    # its whole document.
    short = -(-max(h, w) // MAX_ASPECT)
    if min(h, w) < short:
        canvas = np.full((max(h, short), max(w, short), 3), 255, dtype=np.uint8)
        top, left = (canvas.shape[0] - h) // 2, (canvas.shape[1] - w) // 2
        canvas[top : top + h, left : left + w] = img
        img = canvas
    return np.ascontiguousarray(img)
