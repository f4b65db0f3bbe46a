"""The official auto-crop, shared by the fast renderer and the reference mode.

Glyph's script measures ink on the greyscale page (|grey - median of the top-left 2x2
pixels| > 5), keeps ``margin-x`` pixels right of the last inked column (when
``auto-crop-width``) and, on the last page, ``margin-y`` pixels below the last inked row
counted from that row (when ``auto-crop-last-page``). Margins are used as pixel counts,
unscaled by dpi, exactly as the script does.
"""

from __future__ import annotations

import numpy as np

from glyphserve.render.config import RenderConfig


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Pillow's RGB -> L conversion (ITU-R 601-2 luma, fixed point), bit for bit."""
    r = rgb[..., 0].astype(np.uint32)
    g = rgb[..., 1].astype(np.uint32)
    b = rgb[..., 2].astype(np.uint32)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def crop_page(rgb: np.ndarray, config: RenderConfig, *, last: bool) -> np.ndarray:
    """Crop one rendered page the way the official script does."""
    crop_last = config.auto_crop_last_page and last
    if not (config.auto_crop_width or crop_last):
        return rgb
    gray = luminance(rgb)
    bg = np.median(gray[:2, :2])
    mask = np.abs(gray - bg) > 5
    height, width = gray.shape
    right, lower = width, height
    if config.auto_crop_width:
        cols = np.flatnonzero(mask.any(axis=0))
        if cols.size:
            right = min(width, pil_round(cols[-1] + 1 + config.margin_x))
    if crop_last:
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size:
            lower = min(height, pil_round(rows[-1] + config.margin_y))
    return rgb[:lower, :right]


def pil_round(v: float) -> int:
    """PIL.Image.crop rounds a fractional box with Python's round()."""
    return int(round(float(v)))
