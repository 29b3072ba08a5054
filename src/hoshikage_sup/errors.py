"""Errors of the internal request path.

The scheduler and the gateway raise these; each API layer (OpenAI, Ollama,
admin) translates them into its own error shape.  `status` is the HTTP status
every layer uses, so the layers agree on what a failure means.
"""

from __future__ import annotations


class HoshikageError(Exception):
    status = 500
    kind = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(HoshikageError):
    status = 400
    kind = "invalid_request_error"


class Unauthorized(HoshikageError):
    """No API key, or one that is not configured."""

    status = 401
    kind = "invalid_request_error"
    code = "invalid_api_key"


class PayloadTooLarge(HoshikageError):
    status = 413
    kind = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMediaType(HoshikageError):
    """A body in an encoding (Content-Encoding) or type we do not read."""

    status = 415
    kind = "invalid_request_error"
    code = "unsupported_media_type"


class RequestTimeout(HoshikageError):
    """The client was too slow sending its request."""

    status = 408
    kind = "invalid_request_error"
    code = "request_timeout"


class ModelNotFound(HoshikageError):
    status = 404
    kind = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, name: object):
        super().__init__(f"model '{name}' not found", param="model")
        self.name = name


class QueueFull(HoshikageError):
    status = 503
    kind = "server_busy"
    code = "server_busy"

    def __init__(self, limit: int, retry_after: int = 1):
        super().__init__(f"server busy, please try again: {limit} requests are already waiting (max_queue)")
        self.retry_after = retry_after


class ShuttingDown(HoshikageError):
    status = 503
    kind = "server_busy"
    code = "shutting_down"


class ModelLoadError(HoshikageError):
    """The runner failed to start; the message carries the runner's own error lines."""

    status = 500
    kind = "server_error"
    code = "model_load_failed"


class InsufficientMemory(HoshikageError):
    """The model cannot fit even with everything else evicted."""

    status = 507
    kind = "server_error"
    code = "insufficient_memory"

    def __init__(self, message: str, *, needed: int, available: int):
        super().__init__(message)
        self.needed = needed
        self.available = available


class RunnerFailed(HoshikageError):
    """The runner died or stopped answering while serving this request."""

    status = 502
    kind = "server_error"
    code = "runner_failed"


class UpstreamTimeout(HoshikageError):
    status = 504
    kind = "server_error"
    code = "timeout"
