"""Text to page images, exactly as Glyph renders them, without the PDF round trip.

See ``docs/architecture.md`` for the contract. ``glyphserve.render.reference`` runs the
official reportlab + poppler pipeline for comparison (test/benchmark dependency).

The names below are imported on first use, so that ``glyphserve.render.commands`` (and the
command line's start-up) does not load numpy, fonts and the renderer until it renders.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "glyphserve.render.config": ("BR_MARKUP", "MARKER_MARKUP", "PRESETS", "FontSubstituteWarning", "RenderConfig",
                                 "has_cjk", "load_glyph_config", "preset", "resolve_config"),
    "glyphserve.render.official": ("GLYPH_REPO_ENV",),
    "glyphserve.render.document": ("PageLine", "RenderedDocument", "RenderedPage", "RenderStats",
                                   "missing_glyphs_warning", "write_rendered"),
    "glyphserve.render.renderer": ("count_pages", "estimated_pages", "iter_pages", "render_document", "render_text"),
    "glyphserve.render.scan": ("FittedScan", "fit_scans"),
    "glyphserve.render.tokens": ("clip_to_tokens", "count_text_tokens"),
    "glyphserve.render.workers": ("shutdown_pool",),
}
_ALIASES = {"shutdown_pool": "shutdown"}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:
    from glyphserve.render.config import (
        BR_MARKUP,
        MARKER_MARKUP,
        PRESETS,
        FontSubstituteWarning,
        RenderConfig,
        has_cjk,
        load_glyph_config,
        preset,
        resolve_config,
    )
    from glyphserve.render.official import GLYPH_REPO_ENV
    from glyphserve.render.document import (
        PageLine,
        RenderedDocument,
        RenderedPage,
        RenderStats,
        missing_glyphs_warning,
        write_rendered,
    )
    from glyphserve.render.renderer import count_pages, estimated_pages, iter_pages, render_document, render_text
    from glyphserve.render.scan import FittedScan, fit_scans
    from glyphserve.render.tokens import clip_to_tokens, count_text_tokens
    from glyphserve.render.workers import shutdown as shutdown_pool


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'glyphserve.render' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _ALIASES.get(name, name))
    globals()[name] = value
    return value
