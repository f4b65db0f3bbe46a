"""Text to page images, exactly as Glyph renders them, without the PDF round trip.

See ``docs/architecture.md`` for the contract. ``glyphserve.render.reference`` runs the
official reportlab + poppler pipeline for comparison (test/benchmark dependency).
"""

from glyphserve.render.config import (
    BR_MARKUP,
    GLYPH_REPO_ENV,
    MARKER_MARKUP,
    PRESETS,
    FontSubstituteWarning,
    RenderConfig,
    has_cjk,
    load_glyph_config,
    preset,
    resolve_config,
)
from glyphserve.render.document import (
    PageLine,
    RenderedDocument,
    RenderedPage,
    RenderStats,
    missing_glyphs_warning,
    write_rendered,
)
from glyphserve.render.renderer import iter_pages, render_document, render_text
from glyphserve.render.tokens import count_text_tokens, glm4v_vision_tokens
from glyphserve.render.workers import shutdown as shutdown_pool

__all__ = [
    "BR_MARKUP",
    "FontSubstituteWarning",
    "GLYPH_REPO_ENV",
    "MARKER_MARKUP",
    "PRESETS",
    "PageLine",
    "RenderConfig",
    "RenderStats",
    "RenderedDocument",
    "RenderedPage",
    "count_text_tokens",
    "glm4v_vision_tokens",
    "has_cjk",
    "iter_pages",
    "load_glyph_config",
    "missing_glyphs_warning",
    "preset",
    "render_document",
    "render_text",
    "resolve_config",
    "shutdown_pool",
    "write_rendered",
]
