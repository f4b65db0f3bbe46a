"""Errors that only the HTTP service raises (the shared ones live in :mod:`glyphserve.errors`)."""

from __future__ import annotations

from glyphserve.errors import GlyphserveError

NO_MODEL_HINT = (
    "No vision-language model is loaded: answers are extractive (the best-matching passages of the "
    "document text, with their pages). Start with `glyphserve serve --model zai-org/Glyph` for model answers."
)


class InvalidRequestError(GlyphserveError):
    http_status = 422
    code = "invalid_request"


class UnauthorizedError(GlyphserveError):
    http_status = 401
    code = "unauthorized"


class ModelNotLoadedError(GlyphserveError):
    http_status = 503
    code = "no_model"


class RequestTimeoutError(GlyphserveError):
    http_status = 504
    code = "timeout"


class InternalError(GlyphserveError):
    """An unexpected failure; the message names no internals and the log has the traceback."""

    http_status = 500
    code = "internal_error"
