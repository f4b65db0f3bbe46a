"""Typed, user-facing errors shared by every layer.

Every error a user can cause derives from :class:`GlyphserveError`; its message is
written for the user (no stack trace needed) and ``http_status`` tells the server
which 4xx/5xx to answer with.
"""

from __future__ import annotations


class GlyphserveError(Exception):
    """Base class: a clear message for the user and the HTTP status it maps to."""

    http_status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}


class UnsupportedTypeError(GlyphserveError):
    http_status = 415
    code = "unsupported_type"


class CorruptFileError(GlyphserveError):
    http_status = 422
    code = "corrupt_file"


class EncryptedFileError(GlyphserveError):
    http_status = 422
    code = "encrypted_file"


class EmptyDocumentError(GlyphserveError):
    http_status = 422
    code = "empty_document"


class FileTooLargeError(GlyphserveError):
    http_status = 413
    code = "file_too_large"


class IngestTimeoutError(GlyphserveError):
    """Reading an upload took longer than its wall-clock budget."""

    http_status = 422
    code = "ingest_timeout"


class ConfigError(GlyphserveError):
    """A rendering or engine setting is invalid (names the setting to change)."""

    http_status = 422
    code = "invalid_config"


class PageTooLargeError(ConfigError):
    code = "page_too_large"


class TooManyPagesError(GlyphserveError):
    http_status = 422
    code = "too_many_pages"


class ContextOverflowError(GlyphserveError):
    """The document and question do not fit the model's context."""

    http_status = 422
    code = "context_overflow"


class ModelLoadError(GlyphserveError):
    http_status = 500
    code = "model_load_failed"


class EngineOutOfMemoryError(GlyphserveError):
    http_status = 503
    code = "out_of_memory"


class NotFoundError(GlyphserveError):
    http_status = 404
    code = "not_found"


class QueueFullError(GlyphserveError):
    http_status = 429
    code = "queue_full"


class RemoteBackendError(GlyphserveError):
    """A remote OpenAI-compatible server could not be reached, timed out, or refused the request."""

    http_status = 502
    code = "backend_error"
