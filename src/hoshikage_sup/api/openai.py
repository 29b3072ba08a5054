"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions,
/v1/embeddings, /v1/models.

Bodies go to the runner as they are (llama_cpp.server speaks this API), with
`model` rewritten to the configured name and our own `keep_alive` extension
taken out.  Streams are passed through byte for byte as they arrive.
"""

from __future__ import annotations

import json

from aiohttp import web

from ..errors import BadRequest, HoshikageError
from ..gateway import InferenceRequest
from .common import ctx, keep_alive_of, read_json

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def error_body(e: HoshikageError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


async def _proxy(request: web.Request, kind: str) -> web.StreamResponse:
    body = await read_json(request)
    if "model" not in body:
        raise BadRequest("missing required field 'model'", param="model")
    keep_alive = keep_alive_of(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"invalid 'stream': expected true or false, got {stream!r}", param="stream")
    req = InferenceRequest(model=body["model"], kind=kind, body=body, keep_alive=keep_alive)
    async with ctx(request).gateway.open(req) as up:
        if not up.streaming:
            payload = await up.read()
            return web.Response(body=payload, status=up.status, content_type=up.content_type or "application/json")
        resp = web.StreamResponse(status=up.status, headers=SSE_HEADERS)
        await resp.prepare(request)
        try:
            async for chunk in up.iter_raw():
                await resp.write(chunk)
        except HoshikageError as e:
            # Headers are gone already: report the failure as a last event.
            await resp.write(b"data: " + json.dumps(error_body(e)).encode() + b"\n\n")
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
