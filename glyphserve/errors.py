"""Typed, user-facing errors shared by every layer.

Every error a user can cause derives from :class:`GlyphserveError`; its message is
written for the user (no stack trace needed) and ``http_status`` tells the server
which status to answer with. Statuses follow OpenAI's API: bad input of any kind is 400,
and only what a client may sensibly retry (an overloaded or failing server) is 429 or 5xx.
"""

from __future__ import annotations


def openai_error_type(status: int) -> str:
    """OpenAI's ``error.type`` for an HTTP status."""
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


class GlyphserveError(Exception):
    """Base class: a clear message for the user, the HTTP status it maps to and, when one request
    field is at fault, its name (``param``)."""

    http_status: int = 400
    code: str = "invalid_request"  # as the server's own request checks name it

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def to_dict(self) -> dict[str, dict]:
        """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": openai_error_type(self.http_status),
                          "param": self.param, "code": self.code}}


class UnsupportedTypeError(GlyphserveError):
    http_status = 400
    code = "unsupported_type"


class CorruptFileError(GlyphserveError):
    http_status = 400
    code = "corrupt_file"


class EncryptedFileError(GlyphserveError):
    http_status = 400
    code = "encrypted_file"


class EmptyDocumentError(GlyphserveError):
    http_status = 400
    code = "empty_document"


class FileTooLargeError(GlyphserveError):
    http_status = 413
    code = "file_too_large"


class IngestTimeoutError(GlyphserveError):
    """Reading an upload took longer than its wall-clock budget."""

    http_status = 400
    code = "ingest_timeout"


class ConfigError(GlyphserveError):
    """A rendering or engine setting is invalid (names the setting to change)."""

    http_status = 400
    code = "invalid_config"


class PageTooLargeError(ConfigError):
    code = "page_too_large"


class TooManyPagesError(GlyphserveError):
    http_status = 400
    code = "too_many_pages"


class ContextOverflowError(GlyphserveError):
    """The document and question do not fit the model's context."""

    http_status = 400
    code = "context_length_exceeded"


class MissingExtraError(GlyphserveError):
    """A command needs packages of an optional extra that is not installed (the message names the pip command)."""

    http_status = 500
    code = "missing_extra"


class ModelLoadError(GlyphserveError):
    http_status = 500
    code = "model_load_failed"


class EngineOutOfMemoryError(GlyphserveError):
    http_status = 503
    code = "out_of_memory"


class InternalError(GlyphserveError):
    """An unexpected failure of this program, not of the request (a request failing inside the engine: the others
    go on); the message names no internals and the log has the traceback."""

    http_status = 500
    code = "internal_error"


class RenderWorkerError(GlyphserveError):
    """A process that renders pages died under a render (``WORKER_DIED``)."""

    http_status = 500
    code = "render_worker_died"


# Why a worker process dies: killed (for memory), or never started: a script's workers import it again (Python's
# spawn and forkserver), and one without a main guard runs its own rendering there, which fails.
WORKER_DIED = ("a render worker process died: killed (e.g. out of memory), or it could not start: a script that "
               "renders must guard its top level with `if __name__ == \"__main__\":`")


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
