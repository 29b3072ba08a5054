"""A stand-in for ``hoshikage_runner`` that speaks llama_cpp.server's HTTP API without a model.

Tests that exercise the supervisor (spawning, readiness, crashes, queuing,
streaming proxies) do not need real tokens, only a child that behaves like
the real runner: same start-up protocol (parent-death signal, stdin
lifeline, one JSON settings line, inherited listening Unix socket), the same
endpoints and response shapes (including the "model" field: the request's, else the
GGUF path), one generation at a time, a lock-free ``/health``, and the same
guard: every other request needs ``Authorization: Bearer <secret>`` (401 in
OpenAI's error shape otherwise).  Spawn it with
``RunnerProcess(spec, command=[sys.executable, "tests/fake_runner.py"])``.

Start-up behaviour, from the environment:

* ``FAKE_LOAD_DELAY`` (seconds): pretend loading takes this long.
* ``FAKE_LOAD_PROGRESS`` (seconds): while "loading", print a progress line this often.
* ``FAKE_LOAD_FAIL`` (text): print llama.cpp-like error lines with this text and exit 1.
* ``FAKE_NOISE_BYTES`` (int): print this many bytes of filler output while loading.
* ``FAKE_CRASH_AFTER`` (seconds): once serving, die like a failed GGML_ASSERT after this long.
* ``FAKE_IGNORE_SIGTERM`` (``1``): ignore SIGTERM (the supervisor must fall back to SIGKILL).
* ``FAKE_HANG_AFTER`` (int): generations after the first N never answer (a wedged
  model), while /health keeps answering.
* ``FAKE_TOKENS`` (int, default 8) and ``FAKE_TOKEN_DELAY`` (seconds, default 0): default generation.

Per request, a ``"fake"`` object in the JSON body overrides:
``{"tokens": 5, "delay": 0.05, "fail": 500, "crash": true, "text": ["a", "b"]}``
(``fail`` answers with that HTTP status and llama_cpp.server's error body;
``crash`` aborts the process in the middle of the generation).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import socket
import sys
import time
import uuid
from typing import Any, AsyncIterator

from aiohttp import web

from hoshikage_runner.lifeline import Lifeline, fail

WORDS = ("Hello", " from", " the", " fake", " runner", ",", " one", " token", " at", " a", " time", ".")
EMBEDDING_DIM = 8
SETTINGS = web.AppKey("settings", dict)
GENERATION_LOCK = web.AppKey("generation_lock", asyncio.Lock)


def _env_float(name: str, default: float = 0.0) -> float:
    value = os.environ.get(name, "")
    return float(value) if value else default


def _env_int(name: str, default: int = 0) -> int:
    value = os.environ.get(name, "")
    return int(value) if value else default


# ------------------------------------------------------------------ loading


def load(settings: dict[str, Any]) -> None:
    """Pretend to load the model: delay, progress/noise output, or a llama.cpp-like failure."""
    if not isinstance(settings.get("model"), str) or not settings["model"]:
        fail("invalid runner settings: model: Field required")
    noise = _env_int("FAKE_NOISE_BYTES")
    if noise:
        line = "llama_model_loader: - kv filler " + "x" * 67 + "\n"  # 100 bytes a line
        text = line * (noise // len(line) + 1)
        sys.stderr.write(text[:noise] + "\n")
        sys.stderr.flush()
    message = os.environ.get("FAKE_LOAD_FAIL")
    if message:
        path = settings["model"]
        print(f"llama_model_load: error loading model: {message}", file=sys.stderr)
        print("llama_model_load_from_file_impl: failed to load model", file=sys.stderr, flush=True)
        fail(f"failed to load model {path}: ValueError: Failed to load model from file: {path}")
    delay = _env_float("FAKE_LOAD_DELAY")
    progress = _env_float("FAKE_LOAD_PROGRESS")
    deadline = time.monotonic() + delay
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, progress) if progress > 0 else left)
        if progress > 0:
            print("llama_model_loader: loading tensors ...", file=sys.stderr, flush=True)


# --------------------------------------------------------------- responses


def _alias(request: web.Request, body: dict[str, Any]) -> str:
    """The "model" of a response, chosen as llama_cpp.server chooses it.

    llama_cpp.server echoes the request's "model"; when the request has
    none it answers with the GGUF *path*, not the alias.  The fake does the
    same so that a proxy that forgets to rewrite "model" fails its tests.
    """
    model = body.get("model")
    return model if isinstance(model, str) and model else request.app[SETTINGS]["model"]


def _plan(body: dict[str, Any]) -> tuple[list[str], float, str]:
    """The tokens to emit, the delay between them and the finish reason."""
    fake = body.get("fake") or {}
    text = fake.get("text")
    if isinstance(text, str):
        text = [text]
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    n = fake.get("tokens")
    if n is None:
        n = len(text) if text else _env_int("FAKE_TOKENS", 8)
        if max_tokens:
            n = min(n, int(max_tokens))
    tokens = [(text or WORDS)[i % len(text or WORDS)] for i in range(int(n))]
    finish = "length" if max_tokens and len(tokens) >= int(max_tokens) else "stop"
    return tokens, float(fake.get("delay", _env_float("FAKE_TOKEN_DELAY"))), finish


def _error(status: int, message: str) -> web.Response:
    """llama_cpp.server's error body shape."""
    kind = "internal_server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.json_response(body, status=status)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _prompt_tokens(body: dict[str, Any]) -> int:
    if "messages" in body:
        text = " ".join(str(m.get("content", "")) for m in body.get("messages") or [] if isinstance(m, dict))
    else:
        text = str(body.get("prompt", ""))
    return max(1, len(text.split()))


async def _tokens(tokens: list[str], delay: float, crash: bool) -> AsyncIterator[str]:
    for i, token in enumerate(tokens):
        if crash and i == len(tokens) // 2:
            print("GGML_ASSERT(fake) failed: crash requested by the test", file=sys.stderr, flush=True)
            os.abort()
        if delay:
            await asyncio.sleep(delay)
        yield token


def _completion_chunk(cid: str, model: str, created: int, text: str, finish: str | None) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
    }


def _chat_chunk(cid: str, model: str, created: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": cid,
        "model": model,
        "created": created,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


async def _sse(request: web.Request, chunks: AsyncIterator[dict[str, Any]]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-store"})
    await response.prepare(request)
    async for chunk in chunks:
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _read_body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except ValueError:
        return _error(422, "request body is not valid JSON")
    if not isinstance(body, dict):
        return _error(422, "request body must be a JSON object")
    return body


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions (streaming or not)."""
    body = await _read_body(request)
    if isinstance(body, web.Response):
        return body
    return await _generate(request, body, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions (streaming or not)."""
    body = await _read_body(request)
    if isinstance(body, web.Response):
        return body
    if not isinstance(body.get("messages"), list):
        return _error(422, "messages: Field required")
    return await _generate(request, body, chat=True)


async def _generate(request: web.Request, body: dict[str, Any], *, chat: bool) -> web.StreamResponse:
    fake = body.get("fake") or {}
    hang_after = _env_int("FAKE_HANG_AFTER", -1)
    if hang_after >= 0:
        request.app[SETTINGS]["generations"] = request.app[SETTINGS].get("generations", 0) + 1
        if request.app[SETTINGS]["generations"] > hang_after:
            await asyncio.Event().wait()  # accepted, never answered
    async with request.app[GENERATION_LOCK]:  # one generation at a time, like llama_cpp.server
        if fake.get("fail"):
            return _error(int(fake["fail"]), "fake failure requested by the test")
        tokens, delay, finish = _plan(body)
        model, created = _alias(request, body), int(time.time())
        stream = _tokens(tokens, delay, bool(fake.get("crash")))
        if body.get("stream"):
            chunks = _chat_stream(model, created, stream, finish) if chat else _completion_stream(
                model, created, stream, finish
            )
            return await _sse(request, chunks)
        text = "".join([t async for t in stream])
        usage = _usage(_prompt_tokens(body), len(tokens))
        if chat:
            return web.json_response({
                "id": f"chatcmpl-{uuid.uuid4()}",
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage,
            })
        result = _completion_chunk(f"cmpl-{uuid.uuid4()}", model, created, text, finish)
        result["usage"] = usage
        return web.json_response(result)


async def _completion_stream(
    model: str, created: int, tokens: AsyncIterator[str], finish: str
) -> AsyncIterator[dict[str, Any]]:
    cid = f"cmpl-{uuid.uuid4()}"
    async for token in tokens:
        yield _completion_chunk(cid, model, created, token, None)
    yield _completion_chunk(cid, model, created, "", finish)


async def _chat_stream(
    model: str, created: int, tokens: AsyncIterator[str], finish: str
) -> AsyncIterator[dict[str, Any]]:
    cid = f"chatcmpl-{uuid.uuid4()}"
    yield _chat_chunk(cid, model, created, {"role": "assistant"}, None)
    async for token in tokens:
        yield _chat_chunk(cid, model, created, {"content": token}, None)
    yield _chat_chunk(cid, model, created, {}, finish)


async def embeddings(request: web.Request) -> web.Response:
    """POST /v1/embeddings: deterministic vectors; 500 unless loaded with embedding=true."""
    body = await _read_body(request)
    if isinstance(body, web.Response):
        return body
    async with request.app[GENERATION_LOCK]:
        if not request.app[SETTINGS].get("embedding"):
            return _error(500, "Llama model must be created with embedding=True to call this method")
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        data = [{"object": "embedding", "embedding": _vector(str(item)), "index": i} for i, item in enumerate(items)]
        n = sum(max(1, len(str(item).split())) for item in items)
        return web.json_response({"object": "list", "data": data, "model": _alias(request, body),
                                  "usage": {"prompt_tokens": n, "total_tokens": n}})


def _vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [(b - 128) / 128 for b in digest[:EMBEDDING_DIM]]


async def models(request: web.Request) -> web.Response:
    """GET /v1/models: waits behind a running generation, as in llama_cpp.server."""
    async with request.app[GENERATION_LOCK]:
        alias = request.app[SETTINGS]["model_alias"]
        return web.json_response({"object": "list", "data": [
            {"id": alias, "object": "model", "owned_by": "me", "permissions": []}]})


async def health(request: web.Request) -> web.Response:
    """GET /health: lock-free, like the real runner's."""
    return web.json_response({"status": "ok", "model": request.app[SETTINGS]["model_alias"], "pid": os.getpid()})


def require_secret(secret: str) -> Any:
    """The real runner's guard (hoshikage_runner.server.RequireSecret) as aiohttp middleware."""
    expected = f"Bearer {secret}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "GET" and request.path == "/health":
            return await handler(request)
        given = request.headers.getall("Authorization", [])
        if len(given) != 1 or not hmac.compare_digest(given[0].encode(), expected):
            body = {"error": {"message": "missing or invalid runner secret", "type": "invalid_request_error",
                              "param": None, "code": "invalid_api_key"}}
            return web.json_response(body, status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return middleware


def build_app(settings: dict[str, Any]) -> web.Application:
    app = web.Application(middlewares=[require_secret(settings["secret"])])
    settings = dict(settings)
    settings.setdefault("model_alias", settings["model"])
    app[SETTINGS] = settings
    app[GENERATION_LOCK] = asyncio.Lock()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app


# ------------------------------------------------------------------ serving


async def serve(settings: dict[str, Any]) -> None:
    """Serve on the inherited socket until SIGTERM (unless told to ignore it)."""
    sock = socket.socket(fileno=settings["fd"])
    if sock.family != socket.AF_UNIX or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        fail(f"fd {settings['fd']} is not a listening Unix stream socket")
    runner = web.AppRunner(build_app(settings), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    print(f"fake runner serving {settings['model_alias']} on {sock.getsockname()}", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    if os.environ.get("FAKE_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_signal_handler(signal.SIGINT, done.set)
    crash_after = _env_float("FAKE_CRASH_AFTER")
    if crash_after > 0:
        loop.call_later(crash_after, _crash)
    await done.wait()
    await runner.cleanup()


def _crash() -> None:
    print("GGML_ASSERT(fake) failed: FAKE_CRASH_AFTER elapsed", file=sys.stderr, flush=True)
    os.abort()


def main() -> int:
    lifeline = Lifeline.install()
    settings = lifeline.read_settings()
    settings.setdefault("model_alias", settings.get("model"))
    load(settings)
    asyncio.run(serve(settings))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
