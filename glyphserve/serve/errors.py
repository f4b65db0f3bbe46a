"""Errors that only the HTTP service raises (the shared ones live in :mod:`glyphserve.errors`)."""

from __future__ import annotations

from glyphserve.errors import GlyphserveError

NO_MODEL_HINT = (
    "No vision-language model is loaded: answers are extractive (the best-matching passages of the "
    "document text, with their pages). Start with `glyphserve serve zai-org/Glyph` for model answers."
)


class InvalidRequestError(GlyphserveError):
    http_status = 400
    code = "invalid_request"


class ImageLimitError(GlyphserveError):
    """The images of one request are over a limit (found from their headers, before any was decoded)."""

    http_status = 413
    code = "images_too_large"


class UnsupportedMediaTypeError(GlyphserveError):
    http_status = 415
    code = "unsupported_media_type"


class HostNotAllowedError(GlyphserveError):
    """The Host header names a server this one is not (DNS rebinding)."""

    http_status = 400
    code = "invalid_host"


class CrossOriginError(GlyphserveError):
    """A browser request from another web origin that was not allowed in."""

    http_status = 403
    code = "cross_origin"


class UnauthorizedError(GlyphserveError):
    http_status = 401
    code = "invalid_api_key"


class MethodNotAllowedError(GlyphserveError):
    """The route exists, not for this method; ``allow`` lists the methods it takes (the Allow header)."""

    http_status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, allow: list[str]):
        super().__init__(message)
        self.allow = allow


class ModelNotFoundError(GlyphserveError):
    http_status = 404
    code = "model_not_found"


class ModelNotLoadedError(GlyphserveError):
    """The request needs a model (it holds page images) and this server answers extractively: retrying cannot
    help, so it is a 400, as vLLM answers images sent to a text-only model."""

    http_status = 400
    code = "model_not_loaded"


class RequestTimeoutError(GlyphserveError):
    http_status = 504
    code = "timeout"


class BodyTimeoutError(GlyphserveError):
    """A request body that stopped arriving (a client stalled mid-upload holds its bytes on the server)."""

    http_status = 408
    code = "request_timeout"


class BodiesFullError(GlyphserveError):
    """The bodies of the requests in flight already hold what the server keeps for them (``--max-bodies-mb``)."""

    http_status = 503
    code = "server_busy"


class RetryLaterError(GlyphserveError):
    """A refusal that says in how many seconds to try again (``Retry-After``)."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self):  # (pickled with its retry_after: a refusal may cross processes)
        return type(self), (self.message, self.retry_after)


class TooManyUploadsError(RetryLaterError):
    """One client's files being read and waiting for a thread already fill its share, or held its threads for
    the whole time an upload of its may wait (``serve.upload_queue``)."""

    http_status = 429
    code = "too_many_uploads"


class ReadersBusyError(RetryLaterError):
    """An upload waited a whole ``--ingest-timeout`` (and a second) for a thread to read it: other clients' files
    held them all."""

    http_status = 503
    code = "server_busy"


class RequestTooLargeError(GlyphserveError):
    """A request body (not an upload) past the server's limit."""

    http_status = 413
    code = "request_too_large"


class ShuttingDownError(GlyphserveError):
    """The server is stopping: a new request is refused, and one still unanswered when its shutdown timeout ends is
    cut off (a stream's last event)."""

    http_status = 503
    code = "shutting_down"

    @classmethod
    def refused(cls) -> ShuttingDownError:
        """For a request that arrives while the server stops."""
        return cls("the server is shutting down: send the request to another one")

    @classmethod
    def cut_off(cls, grace: float) -> ShuttingDownError:
        """For an answer still unanswered when the shutdown's ``grace`` seconds end."""
        return cls(f"the server is shutting down and its {grace:g} s for answers in flight ran out: this answer "
                   "was cut off; send it again to a running server")


class StorageFullError(GlyphserveError):
    http_status = 507
    code = "storage_full"


class StorageUnavailableError(GlyphserveError):
    """The data folder or index cannot be written (read-only, I/O error, permissions), or a delete left files."""

    http_status = 503
    code = "storage_unavailable"
