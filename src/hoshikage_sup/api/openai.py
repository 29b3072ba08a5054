"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions,
/v1/embeddings, /v1/models.

Bodies are validated at the edge (`validation.py`), then go to the runner
as they are (llama_cpp.server speaks this API), with `model` rewritten to the
configured name and our own `keep_alive` (and, for embeddings, `truncate`)
taken out; a body that checking leaves as it was (the usual case) goes on as
the very bytes the client sent.  Streamed events are passed through as they
arrive, as the runner wrote them; runner errors are re-wrapped in OpenAI's
shape.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from .. import overflow, sse, validation
from ..errors import HoshikageError, RunnerFailed, event_error, runner_error
from ..gateway import InferenceRequest, Upstream
from .common import StreamResponse, ctx, keep_alive_of, read_json_raw, vocab_size

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def error_body(e: HoshikageError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


async def _proxy(request: web.Request, kind: str) -> web.StreamResponse:
    raw, body = await read_json_raw(request)
    fields = len(body)
    name = validation.model_name(body.get("model"))
    keep_alive = keep_alive_of(body)
    # Ollama's `truncate`, accepted here too: an input over the context is a
    # 400 unless the client asked for it to be cut.
    truncate = validation.flag(body, "truncate") if kind == "embedding" else False
    if kind == "embedding":
        body.pop("truncate", None)
    # Ours too: what to do with a chat longer than the context (overflow.py).
    context_overflow = overflow.policy_of(body.pop("context_overflow", None))
    gateway = ctx(request).gateway
    model = gateway.resolve(name)
    # The vocabulary bounds token ids (logit_bias, <[id]> in a grammar); only
    # those requests pay for looking it up.
    vocab = vocab_size(model) if "logit_bias" in body or "grammar" in body else None
    if "grammar" in body or "response_format" in body:
        # Checking a grammar (or building one from a schema) can take a good
        # fraction of a second for a hostile one: not on the event loop.
        checked = await asyncio.to_thread(validation.openai_body, kind, body, model, vocab)
    else:
        checked = validation.openai_body(kind, body, model, vocab)
    stream = validation.flag(checked, "stream")
    # Nothing taken out, the configured name, nothing normalised: the client's
    # bytes go to the runner as they are (no second encoding of the body).
    same = name == model.name and len(checked) == fields and checked == body
    req = InferenceRequest(model=name, kind=kind, body=checked, keep_alive=keep_alive, truncate=truncate,
                           context_overflow=context_overflow, raw=raw if same else None)
    async with gateway.open(req) as up:
        if up.status >= 400:
            raise runner_error(up.status, await up.read(), model.name)
        if not stream or not up.streaming:
            payload = await up.read()
            if up.overflow is not None:
                payload = _with_report(payload, up.overflow)
            return web.Response(body=payload, status=up.status, content_type=up.content_type or "application/json")
        return await _relay(request, up)


def _with_report(data: bytes, report: dict) -> bytes:
    """A runner's JSON answer (or event) with what the context_overflow policy did."""
    try:
        obj = json.loads(data)
    except ValueError:
        return data
    if not isinstance(obj, dict):
        return data
    obj["hoshikage"] = {"context_overflow": report}
    return json.dumps(obj, separators=(",", ":")).encode()


async def _relay(request: web.Request, up: Upstream) -> web.StreamResponse:
    """Pass the runner's events on as they come, and end every stream honestly.

    Headers wait for the first event: a runner that fails before it (a
    prompt longer than the context, a crash during prompt processing) is
    answered with the proper status and a JSON error, not a 200.  Once the
    stream has started, any failure ends it with an error event in OpenAI's
    shape followed by `data: [DONE]`, so clients never mistake a cut stream
    for a finished one.  In between, what a read from the runner completed
    is written on in one piece, as it came (`sse.runs`); only a piece that
    may hold the end or an error is looked at event by event.  The headers
    leave with the first event and the end of the stream with the last.
    """
    name = up.model.name
    raw = up.iter_raw()
    runs = sse.runs(raw)
    try:
        first: tuple[bytes, bytes] | None = None
        rest: list[tuple[bytes, bytes | None]] = []
        async for run, events in runs:  # a HoshikageError here is answered with its status
            events = events if events is not None else sse.events_of(run)
            for i, (event, data) in enumerate(events):
                if data is not None:
                    first, rest = (event, data), events[i + 1:]
                    break
            if first is not None:
                break
        if first is None or first[1] == sse.DONE:
            raise RunnerFailed(f"runner for model '{name}' ended the stream without sending anything")
        err = sse.is_error(first[1])
        if err is not None:
            raise event_error(err, name)
        if up.overflow is not None:  # the first event says what was done to the conversation
            data = _with_report(first[1], up.overflow)
            first = (b"data: " + data + b"\n\n", data)
        resp = StreamResponse(status=200, headers=SSE_HEADERS)
        await resp.prepare(request)
        try:
            out, over = _events_out([first, *rest], name)
            if not over:
                await resp.write(out)  # with the headers
                async for run, events in runs:
                    if events is None:
                        await resp.write(run)
                        continue
                    out, over = _events_out(events, name)
                    if over:
                        break  # the last bytes go with the end
                    await resp.write(out)
                else:
                    raise RunnerFailed(f"runner for model '{name}' ended the stream before finishing")
        except HoshikageError as e:
            out = sse.frame(error_body(e)) + sse.DONE_EVENT
        await resp.write_eof(out)
        return resp
    finally:
        # Closed here, not by the garbage collector's hook (a thread-safe
        # wake-up of the event loop for each stream).
        await runs.aclose()
        await raw.aclose()


def _events_out(events: list[tuple[bytes, bytes | None]], name: str) -> tuple[bytes, bool]:
    """The bytes to send for these events, as they came, up to the end
    (`[DONE]`) or an error, which becomes an error event in OpenAI's shape
    and `[DONE]`; and whether the stream is over."""
    out = []
    for event, data in events:
        if data == sse.DONE:
            out.append(event)
            return b"".join(out), True
        err = sse.is_error(data) if data is not None else None
        if err is not None:
            out.append(sse.frame(error_body(event_error(err, name))) + sse.DONE_EVENT)
            return b"".join(out), True
        out.append(event)
    return b"".join(out), False


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
