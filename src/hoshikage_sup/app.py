"""The aiohttp application: routes of every layer plus one error policy."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from aiohttp import web

from . import __version__
from .api import admin, metrics, ollama, openai, ui
from .api.common import CONTEXT, Context
from .auth import KeyRing, presented_key
from .errors import HoshikageError, Unauthorized
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
        headers = None
        if getattr(e, "retry_after", None) is not None:  # QueueFull, ModelCoolingDown
            headers = {"Retry-After": str(e.retry_after)}
        elif isinstance(e, Unauthorized):
            headers = {"WWW-Authenticate": 'Bearer realm="hoshikage"'}
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


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """API keys (see `auth.py`): checked before the body is read, so a client
    without a key cannot make us read or parse anything."""
    keys: KeyRing = request.app[CONTEXT].keys
    if keys.open:
        return await handler(request)
    wanted = keys.keys_for(request.path)
    if wanted:
        presented = presented_key(request)
        if presented is None:
            raise Unauthorized(
                "missing API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
            )
        if not KeyRing.matches(presented, wanted):
            raise Unauthorized("invalid API key")
    return await handler(request)


async def health(request: web.Request) -> web.Response:
    c = request.app[CONTEXT]
    status = c.scheduler.status(measure=False)
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "loaded": len(status.models),
            "queued": status.queued,
        }
    )


def build_app(context: Context) -> web.Application:
    # The body limit is enforced while reading (httpguard.read_body), with a 413
    # in the API's shape; aiohttp's own limit is set just above it as a backstop.
    app = web.Application(
        middlewares=[error_middleware, auth_middleware],
        client_max_size=context.config.server.max_body_size + 1,
    )
    app[CONTEXT] = context
    app.router.add_get("/health", health)
    openai.add_routes(app)
    ollama.add_routes(app)
    metrics.add_routes(app)
    admin.add_routes(app)
    ui.add_routes(app)
    return app
