"""The aiohttp application: routes of every layer plus one error policy."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from aiohttp import web

from . import __version__
from .api import metrics, ollama, openai
from .api.common import CONTEXT, Context
from .errors import HoshikageError, QueueFull
from .logs import get_logger

log = get_logger("hoshikage.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _ollama_path(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def _error_response(request: web.Request, status: int, message: str, *, kind: str, code: str | None, param: str | None = None, headers=None) -> web.Response:
    if _ollama_path(request):
        body = {"error": message}
    else:
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HoshikageError as e:
        headers = {"Retry-After": str(e.retry_after)} if isinstance(e, QueueFull) else None
        if e.status >= 500:
            log.warning("request failed", path=request.path, status=e.status, error=e.message)
        return _error_response(request, e.status, e.message, kind=e.kind, code=e.code, param=e.param, headers=headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = {404: f"no route for {request.method} {request.path}", 405: f"method {request.method} not allowed for {request.path}"}.get(
            e.status, e.reason
        )
        return _error_response(request, e.status, message, kind="invalid_request_error", code=None)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:  # a bug: answer, log it, keep serving
        log.exception("unhandled error", path=request.path)
        return _error_response(request, 500, f"internal error: {type(e).__name__}: {e}", kind="server_error", code=None)


async def health(request: web.Request) -> web.Response:
    c = request.app[CONTEXT]
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "loaded": len(c.scheduler.slots),
            "queued": c.scheduler.queue_depth(),
        }
    )


def build_app(context: Context) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=64 * 1024**2)
    app[CONTEXT] = context
    app.router.add_get("/health", health)
    openai.add_routes(app)
    ollama.add_routes(app)
    metrics.add_routes(app)
    return app
