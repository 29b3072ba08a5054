"""Errors of the internal request path.

The scheduler and the gateway raise these; each API layer (OpenAI, Ollama,
admin) translates them into its own error shape.  `status` is the HTTP status
every layer uses, so the layers agree on what a failure means.
"""

from __future__ import annotations

import json
from typing import Any


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


class ModelCoolingDown(HoshikageError):
    """The model failed to load several times in a row and rests before the next try."""

    status = 503
    kind = "server_busy"
    code = "model_cooling_down"

    def __init__(self, message: str, *, retry_after: int):
        super().__init__(message, param="model")
        self.retry_after = retry_after


class ShuttingDown(HoshikageError):
    """The daemon is draining before it exits.  A router in front of several
    daemons (LiteLLM) reads Retry-After as how long to leave this one alone;
    without it, it would fall back to its own default."""

    status = 503
    kind = "server_busy"
    code = "shutting_down"
    retry_after = 30  # seconds: about as long as a drain (shutdown_timeout) and a restart take


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


class UpstreamError(HoshikageError):
    """The runner answered the request with an error: its message, in our shape.

    A runner's 4xx is the client's mistake and keeps its status (422, which
    llama_cpp.server answers for bodies its pydantic models reject, becomes
    400 like any other bad request); a runner's 5xx is a failure of the
    runner, which the client sees as 502 Bad Gateway.
    """

    def __init__(self, status: int, message: str, *, kind: str | None = None, code: str | None = None,
                 param: str | None = None):
        super().__init__(message, param=param)
        if 400 <= status < 500:
            self.status = 400 if status == 422 else status
            self.kind = kind if kind and kind != "internal_server_error" else "invalid_request_error"
        else:
            self.status = 502
            self.kind = "server_error"
        self.code = code if isinstance(code, str) else None


def runner_error(status: int, raw: bytes, model: str) -> UpstreamError:
    """A runner's error body (llama_cpp.server's {"error": {...}}, FastAPI's
    {"detail": [...]}, or anything else) as one readable error."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, dict):
        if "error" in data:
            return event_error(data, model, status=status)
        detail = data.get("detail")
        if isinstance(detail, list):
            message = "; ".join(
                f"{'.'.join(str(x) for x in d.get('loc', ()) if x != 'body')}: {d.get('msg')}"
                for d in detail if isinstance(d, dict)
            )
            return UpstreamError(status, f"runner for model '{model}' rejected the request: {message}")
        if detail:
            return UpstreamError(status, f"runner for model '{model}' rejected the request: {detail}")
    text = raw[:500].decode("utf-8", "replace").strip() or f"status {status}"
    return UpstreamError(status, f"runner for model '{model}' answered {status}: {text}")


def event_error(data: dict[str, Any], model: str, *, status: int | None = None) -> UpstreamError:
    """`{"error": ...}` from a runner (a body or a stream's last event) as an
    error; without a status, the error's type decides: a client's mistake
    (invalid_request_error) is 400, anything else the runner's failure."""
    err = data.get("error")
    kind = code = param = None
    if isinstance(err, dict):
        message = str(err.get("message") or "")
        kind = err.get("type") if isinstance(err.get("type"), str) else None
        code = err.get("code") if isinstance(err.get("code"), str) else None
        param = err.get("param") if isinstance(err.get("param"), str) else None
    else:
        message = str(err or "")
    if status is None:
        status = 400 if kind == "invalid_request_error" else 502
    if not message:
        message = f"runner for model '{model}' failed without a message"
    elif status < 500:
        message = f"runner for model '{model}' rejected the request: {message}"
    else:
        message = f"runner for model '{model}' failed: {message}"
    return UpstreamError(status, message, kind=kind, code=code, param=param)
