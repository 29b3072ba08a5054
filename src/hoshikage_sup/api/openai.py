"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions,
/v1/embeddings, /v1/models.

Bodies are validated at the edge (`validation.py`), then go to the runner
as they are (llama_cpp.server speaks this API), with `model` rewritten to the
configured name and our own `keep_alive` (and, for embeddings, `truncate`)
taken out.  Streamed events are passed through as they arrive, each whole
event as the runner wrote it; runner errors are re-wrapped in OpenAI's shape.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from .. import sse, validation
from ..errors import HoshikageError, RunnerFailed, event_error, runner_error
from ..gateway import InferenceRequest, Upstream
from .common import ctx, keep_alive_of, read_json, vocab_size

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def error_body(e: HoshikageError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


async def _proxy(request: web.Request, kind: str) -> web.StreamResponse:
    body = await read_json(request)
    name = validation.model_name(body.get("model"))
    keep_alive = keep_alive_of(body)
    # Ollama's `truncate`, accepted here too: an input over the context is a
    # 400 unless the client asked for it to be cut.
    truncate = validation.flag(body, "truncate") if kind == "embedding" else False
    if kind == "embedding":
        body.pop("truncate", None)
    gateway = ctx(request).gateway
    model = gateway.resolve(name)
    # The vocabulary bounds token ids (logit_bias, <[id]> in a grammar); only
    # those requests pay for looking it up.
    vocab = vocab_size(model) if "logit_bias" in body or "grammar" in body else None
    if "grammar" in body or "response_format" in body:
        # Checking a grammar (or building one from a schema) can take a good
        # fraction of a second for a hostile one: not on the event loop.
        body = await asyncio.to_thread(validation.openai_body, kind, body, model, vocab)
    else:
        body = validation.openai_body(kind, body, model, vocab)
    stream = validation.flag(body, "stream")
    req = InferenceRequest(model=name, kind=kind, body=body, keep_alive=keep_alive, truncate=truncate)
    async with gateway.open(req) as up:
        if up.status >= 400:
            raise runner_error(up.status, await up.read(), model.name)
        if not stream or not up.streaming:
            payload = await up.read()
            return web.Response(body=payload, status=up.status, content_type=up.content_type or "application/json")
        return await _relay(request, up)


async def _relay(request: web.Request, up: Upstream) -> web.StreamResponse:
    """Pass the runner's events on as they come, and end every stream honestly.

    Headers wait for the first event: a runner that fails before it (a
    prompt longer than the context, a crash during prompt processing) is
    answered with the proper status and a JSON error, not a 200.  Once the
    stream has started, any failure ends it with an error event in OpenAI's
    shape followed by `data: [DONE]`, so clients never mistake a cut stream
    for a finished one.
    """
    name = up.model.name
    events = sse.split(up.iter_raw())
    first = None
    async for raw, data in events:  # a HoshikageError here is answered with its status
        if data is not None:
            first = raw, data
            break
    if first is None or first[1] == sse.DONE:
        raise RunnerFailed(f"runner for model '{name}' ended the stream without sending anything")
    err = sse.is_error(first[1])
    if err is not None:
        raise event_error(err, name)
    resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await resp.prepare(request)
    await resp.write(first[0])
    try:
        async for raw, data in events:
            if data == sse.DONE:
                await resp.write(raw)
                break
            err = sse.is_error(data) if data is not None else None
            if err is not None:
                await resp.write(sse.frame(error_body(event_error(err, name))) + sse.DONE_EVENT)
                break
            await resp.write(raw)
        else:
            raise RunnerFailed(f"runner for model '{name}' ended the stream before finishing")
    except HoshikageError as e:
        await resp.write(sse.frame(error_body(e)) + sse.DONE_EVENT)
    await resp.write_eof()
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _proxy(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _proxy(request, "completion")


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _proxy(request, "embedding")


async def list_models(request: web.Request) -> web.Response:
    c = ctx(request)
    data = []
    created = int(c.started)
    for model in c.config.models.values():
        for name in model.names:
            data.append({"id": name, "object": "model", "created": created, "owned_by": "hoshikage"})
    return web.json_response({"object": "list", "data": data})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
