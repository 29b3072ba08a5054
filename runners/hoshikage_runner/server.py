"""Build the llama_cpp.server app for one model and serve it on the inherited socket.

Importing this module is the slow, model-independent part of a start
(llama_cpp, FastAPI, uvicorn); `run` is the model-dependent part.

Only the supervisor may use a runner (see the package docstring): the app
is served on the inherited Unix socket only, behind `RequireSecret`, and
without FastAPI's documentation routes.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import os
import signal
import socket
import sys
from typing import Any, Awaitable, Callable, MutableMapping

import llama_cpp  # imported here so a spare runner pays for it ahead of time
import llama_cpp.server.app as llama_app
import llama_cpp.server.errors as llama_errors
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from llama_cpp.server.settings import ModelSettings, ServerSettings
from pydantic import ValidationError

from hoshikage_runner import guards, threads
from hoshikage_runner import fastpath
from hoshikage_runner import llamalog
from hoshikage_runner import rpc
from hoshikage_runner import tokens
from hoshikage_runner.lifeline import fail

# Seconds uvicorn waits for open requests after SIGTERM before it cancels them.
GRACEFUL_SHUTDOWN = 2.0
# Seconds an idle connection stays open.  The supervisor lets go of idle
# connections after 30 s (process.KEEPALIVE_TIMEOUT): it must never be the
# runner that closes one first, or a request sent at that moment is lost.
KEEP_ALIVE = 60
# Requests answered without the secret: the supervisor's readiness and liveness probe.
OPEN_ROUTES = frozenset({("GET", "/health")})
# FastAPI's documentation routes, which a runner does not serve.
DOC_ROUTES = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _scrub_settings_environment() -> None:
    """Drop environment variables that would silently become server or model settings.

    ``ModelSettings``/``ServerSettings`` are pydantic ``BaseSettings``: any
    field we do not pass is read from a same-named environment variable
    (``MODEL``, ``N_CTX``, ``API_KEY``...), and ``create_app`` reloads
    everything from ``CONFIG_FILE`` when that is set.  The supervisor's
    JSON line must be the only source of truth for a runner.
    """
    fields = {name.upper() for name in (*ModelSettings.model_fields, *ServerSettings.model_fields)}
    fields.add("CONFIG_FILE")
    for key in list(os.environ):
        if key.upper() in fields:
            del os.environ[key]


def _one_line(error: ValidationError) -> str:
    """A pydantic error as one line: the supervisor shows the runner's last error line."""
    parts = []
    for item in error.errors():
        where = ".".join(str(x) for x in item.get("loc", ())) or "settings"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts)


# Keys of the settings line that are ours, not llama_cpp.server ModelSettings fields.
OWN_KEYS = ("fd", "secret", "pooling_type", "thread_budget")


def model_settings(settings: dict[str, Any]) -> ModelSettings:
    """Validate the settings line (minus our own keys) as llama_cpp.server ``ModelSettings``."""
    fields = {k: v for k, v in settings.items() if k not in OWN_KEYS}
    try:
        return ModelSettings(**fields)
    except ValidationError as e:
        fail(f"invalid runner settings: {_one_line(e)}")


def server_settings() -> ServerSettings:
    """Server settings for a runner; interrupt_requests must always be off.

    With llama_cpp.server's default (True) any other request, even a
    ``GET /v1/models`` from the supervisor, ends a running stream early.
    host/port are unused: we serve on the supervisor's Unix socket.
    api_key stays off: `RequireSecret` guards every route, llama_cpp.server's
    key only its own.
    """
    return ServerSettings(interrupt_requests=False, api_key=None, host="127.0.0.1", port=0)


def add_health_route(app: FastAPI, alias: str) -> None:
    """``GET /health``: answers from the event loop without llama_cpp.server's model locks.

    Generation runs in a worker thread (and ctypes drops the GIL), so this
    keeps answering during a long generation; the supervisor uses it for
    readiness and liveness.  It exists only once the model is loaded.
    """
    payload = {"status": "ok", "model": alias, "pid": os.getpid()}

    async def health() -> dict[str, Any]:
        return payload

    app.add_api_route("/health", health, methods=["GET"], include_in_schema=False)


def use_pooling(pooling_type: int | None) -> None:
    """Make llama_cpp.server build its ``Llama`` with this pooling type.

    ``ModelSettings`` has no pooling field, and a generative GGUF declares no
    pooling of its own, so its embeddings come back as one vector per token.
    For an embedding runner the supervisor asks for mean pooling: one vector
    per input, as OpenAI and Ollama clients expect.  llama_cpp.server looks
    ``llama_cpp.Llama`` up when it loads the model, so a subclass installed
    here (in the runner process only) is what it builds.
    """
    if pooling_type is None:
        return
    base = llama_cpp.Llama

    class PooledLlama(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("pooling_type", pooling_type)
            super().__init__(*args, **kwargs)

    llama_cpp.Llama = PooledLlama  # type: ignore[misc]


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """"max_tokens: Input should be a valid integer" and the field, from FastAPI's error."""
    parts, param = [], None
    for item in error.errors():
        loc = [str(x) for x in item.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        param = param or field
        parts.append(f"{field}: {item.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts), param


def classify_request_errors() -> None:
    """Answer a bad request with 400, not 500.

    llama_cpp.server's route class turns every exception into a 500
    "internal_server_error", including FastAPI's own request validation
    (a string where max_tokens wants an integer) and the ValueErrors llama.cpp
    raises for what a request asks (logprobs without logits_all, a prompt
    that does not fit).  Those are the client's to fix: 400 with an OpenAI
    "invalid_request_error" naming the field.  Its own patterns (context
    length exceeded) and real failures keep their handling.
    """
    handler = llama_errors.RouteErrorHandler
    original = handler.error_message_wrapper

    def error_message_wrapper(self: Any, error: Exception, body: Any = None) -> tuple[int, Any]:
        if isinstance(error, RequestValidationError):
            message, param = _validation_message(error)
            return 400, llama_errors.ErrorResponse(message=message, type="invalid_request_error", param=param, code=None)
        known = any(p.search(str(error)) for p in self.pattern_and_formatters)
        if isinstance(error, ValueError) and not known:
            return 400, llama_errors.ErrorResponse(message=str(error), type="invalid_request_error", param=None, code=None)
        return original(self, error, body)

    handler.error_message_wrapper = error_message_wrapper  # type: ignore[method-assign]


def remove_doc_routes(app: FastAPI) -> None:
    """Drop /docs, /redoc, /openapi.json and the OAuth2 redirect FastAPI adds on its own.

    Nobody browses a runner, and the schema only tells a caller what it
    could do there.
    """
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in DOC_ROUTES]
    app.openapi_url = app.docs_url = app.redoc_url = app.swagger_ui_oauth2_redirect_url = None


class RequireSecret:
    """ASGI middleware: every request but ``GET /health`` needs ``Authorization: Bearer <secret>``.

    The supervisor sends the header on every request; anything else that
    reaches the socket gets a 401 in OpenAI's error shape.  It is plain ASGI,
    wrapped around the whole app, rather than FastAPI dependencies: it covers
    every route (``/extras/*``, ``/v1/models``, paths that do not exist)
    and leaves response streams alone.  The comparison takes constant time.
    """

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self._expected = f"Bearer {secret}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):  # lifespan (off for runners)
            await self.app(scope, receive, send)
            return
        if (kind == "http" and (scope["method"], scope["path"]) in OPEN_ROUTES) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send_unauthorized(send)

    def _authorized(self, scope: Scope) -> bool:
        given = [value for name, value in scope.get("headers", ()) if name == b"authorization"]
        return len(given) == 1 and hmac.compare_digest(given[0], self._expected)


async def send_unauthorized(send: Send) -> None:
    """A 401 with an OpenAI-shaped error body."""
    body = json.dumps({"error": {
        "message": "missing or invalid runner secret: runners are reached through the supervisor only",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }}).encode()
    await send({
        "type": "http.response.start",
        "status": 401,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ],
    })
    await send({"type": "http.response.body", "body": body})


def build_app(settings: dict[str, Any]) -> FastAPI:
    """Load the model (synchronously, as create_app does) and return the app with /health.

    The app itself is open; `run` serves it behind `RequireSecret`.
    """
    _scrub_settings_environment()
    model = model_settings(settings)
    use_pooling(settings.get("pooling_type"))
    rpc.install(model)  # rpc_servers: refused on a build without RPC, else registered with llama.cpp
    threads.install(settings.get("thread_budget"))  # n_threads 0: follow the supervisor's fair share
    classify_request_errors()
    llamalog.install()  # llama.cpp's DEBUG lines stay out of the runner's output
    try:
        app = llama_app.create_app(server_settings=server_settings(), model_settings=[model])
    except Exception as e:  # noqa: BLE001 - a load failure of any kind is reported, not raised
        fail(f"failed to load model {model.model}: {type(e).__name__}: {e}")
    remove_doc_routes(app)
    add_health_route(app, model.model_alias or model.model)
    guards.install(app)  # request errors before and during streams, embedding limits, grammars
    fastpath.install(app)  # plain streamed completions and chats without llama_cpp's per-token overhead
    tokens.install(app)  # POST /hoshikage/tokens: counts for the supervisor's context_overflow policies
    return app


def _listening_socket(fd: int) -> socket.socket:
    """Wrap the inherited descriptor; it must be a listening Unix stream socket.

    Only a Unix socket in the supervisor's private directory keeps other
    processes away from the runner; a TCP socket is refused.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        fail(f"fd {fd} is not a usable socket: {e}")
    if (
        sock.family != socket.AF_UNIX
        or sock.type != socket.SOCK_STREAM
        or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    ):
        fail(f"fd {fd} is not a listening Unix stream socket")
    return sock


def _swallow_signal(signum: int, frame: object) -> None:
    """Placeholder handler: the shutdown it asks for has already happened."""


def _uvicorn_config(app: ASGIApp) -> uvicorn.Config:
    """How a runner serves: no websockets, no lifespan, no per-request log lines."""
    return uvicorn.Config(
        app,
        interface="asgi3",
        ws="none",  # nothing a runner serves is a websocket (and wsproto takes 14 ms to import)
        access_log=False,  # one line per request (and per health probe) is noise in the supervisor's log
        log_level="info",
        lifespan="off",
        proxy_headers=False,  # the only client is the supervisor, over a Unix socket
        timeout_keep_alive=KEEP_ALIVE,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
    )


def warm_up() -> None:
    """Import now what serving the first request would import later.

    A spare calls this before it waits for its settings, so that the time
    between "load this model" and its first token is the model's load and
    decode only.  ``python -X importtime`` put these at about 40 ms of that
    time: uvicorn's protocol classes (``Config.load``), the regular
    expressions ``inspect`` compiles on first use, anyio's asyncio backend
    (Starlette's thread pool and task groups), the thread pool behind
    ``run_in_executor`` and numpy's ctypes bridge (llama_cpp reads the
    logits through it).  tests/test_spare.py checks that nothing is left.
    """
    _uvicorn_config(RequireSecret(FastAPI(), secret="-" * 16)).load()
    inspect.getsourcelines(warm_up)  # FastAPI reads each endpoint's source line on its first call
    import anyio._backends._asyncio  # noqa: F401
    import concurrent.futures.thread  # noqa: F401
    import numpy.ctypeslib  # noqa: F401


def serve(app: ASGIApp, sock: socket.socket) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn handles both and shuts down gracefully).

    uvicorn re-raises a captured signal after its graceful shutdown, with the
    handler that was in place before; with Python's defaults that turns a
    clean stop into "killed by SIGTERM" (or a KeyboardInterrupt traceback).
    Installing no-op handlers first makes a requested stop exit with status 0.
    They go in only now: during the model load, SIGTERM must still kill at once.
    """
    signal.signal(signal.SIGTERM, _swallow_signal)
    signal.signal(signal.SIGINT, _swallow_signal)
    server = uvicorn.Server(_uvicorn_config(app))
    asyncio.run(server.serve(sockets=[sock]))


def run(settings: dict[str, Any]) -> int:
    """Steps 3–4 of the protocol for an already-read settings line; returns the exit status."""
    sock = _listening_socket(settings["fd"])
    app = build_app(settings)
    serve(RequireSecret(app, settings["secret"]), sock)
    # A generation still running in a worker thread would keep the interpreter
    # alive after uvicorn returns; the process is done, so leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


__all__ = ["RequireSecret", "build_app", "model_settings", "run", "serve", "server_settings", "warm_up"]
