"""Ollama-compatible endpoints, so Ollama's clients and UIs work unchanged.

A thin translation onto the gateway, like the OpenAI layer: every request
becomes an `InferenceRequest` (non-raw /api/generate and /api/chat go to the
runner's chat endpoint so the model's chat format applies; raw or `suffix`
generate goes to /v1/completions as is; embeddings to /v1/embeddings), and
the answer is rewritten into Ollama's shapes (`ollama_shapes.py`).

- Streams are NDJSON: one complete JSON object a line, written as each token
  arrives; a failure after the first line is sent as a last `{"error": ...}`
  line, which Ollama's clients raise.
- Counts and durations (nanoseconds): a non-streamed answer takes
  `prompt_eval_count`/`eval_count` from the runner's `usage`, and since the
  runner does not split its time, `eval_duration` spans the whole runner
  call and `prompt_eval_duration` is left out.  A stream carries no `usage`
  (llama_cpp.server has no stream_options), so `eval_count` counts the
  chunks with text (one token each, except where the runner holds back
  bytes of a multi-byte character or a possible stop string), exact when
  generation stops at `num_predict`; `prompt_eval_count` is left out;
  `prompt_eval_duration` runs from sending the request to the first token
  and `eval_duration` from the first token to the last.  Ollama itself
  omits these fields when they are zero, so clients cope with their absence.
- An empty prompt (generate) or empty `messages` (chat) loads the model and
  answers `done_reason: "load"`; with `keep_alive: 0` it unloads it instead
  (`"unload"`), and the answer waits (briefly) until the runner is gone.
- /api/show's `model_info` is the GGUF header; the big arrays (the
  vocabulary) are null whether or not `verbose` is asked for, since the
  header reader skips them.  `template` is the runner's chat format name (or
  the GGUF's Jinja template when none is configured), not a Go template.
- /api/tags lists every configured name and alias; `digest` is a sha256 of
  the file's path, size and mtime, not of its bytes.
- /api/pull, push, create, copy, delete and blobs answer 501: models are
  configured in the TOML file, not managed through the API.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from .. import __version__, overflow
from ..durations import format_duration
from ..errors import BadRequest, HoshikageError, RunnerFailed, event_error, runner_error
from ..gateway import InferenceRequest
from ..status import ReplicaStatus
from . import ollama_shapes as shapes
from .common import StreamResponse, ctx, keep_alive_of, read_json

NDJSON_HEADERS = {"Content-Type": shapes.NDJSON, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _since(t0: int) -> int:
    return time.monotonic_ns() - t0


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


# ------------------------------------------------------------------ generate and chat


class _Call:
    """One /api/generate or /api/chat request, parsed."""

    def __init__(self, request: web.Request, body: dict[str, Any], chat: bool):
        self.t0 = time.monotonic_ns()
        self.request = request
        self.chat = chat
        self.name = shapes.model_name(body)
        self.keep_alive = keep_alive_of(body)
        self.context_overflow = overflow.policy_of(body.pop("context_overflow", None))
        self.stream = shapes.stream_flag(body)
        self.gateway = ctx(request).gateway
        self.model = self.gateway.resolve(self.name)
        self.sampling, self.runner_options = shapes.translate_options(body.get("options"), self.model)
        self.fmt: dict[str, Any] | None = None

    async def read_format(self, body: dict[str, Any]) -> None:
        """`format`; a schema becomes a grammar (to check it) off the event loop."""
        fmt = body.get("format")
        self.fmt = await asyncio.to_thread(shapes.response_format, fmt) if isinstance(fmt, dict) else shapes.response_format(fmt)

    def head(self) -> dict[str, Any]:
        return {"model": self.name, "created_at": shapes.rfc3339()}

    def message(self, content: str, **extra: Any) -> dict[str, Any]:
        """The per-line payload: `response` for generate, `message` for chat."""
        if self.chat:
            return {"message": {"role": "assistant", "content": content, **extra}}
        return {"response": content}

    async def load_or_unload(self) -> web.StreamResponse:
        c = ctx(self.request)
        if self.keep_alive == 0:
            model = self.gateway.unload(self.name)
            await c.scheduler.wait_unloaded([model.name], c.config.server.stop_timeout + 1.0)
            reason, extra = "unload", {}
        else:
            lease = await self.gateway.load(self.name, self.keep_alive, self.runner_options or None)
            reason = "load"
            extra = {"total_duration": _since(self.t0), "load_duration": shapes.ns(lease.load_duration)}
        obj = {**self.head(), **self.message(""), "done": True, "done_reason": reason, **extra}
        if self.stream:
            return web.Response(body=_line(obj), content_type=shapes.NDJSON)
        return web.json_response(obj)

    async def run(self, kind: str, body: dict[str, Any]) -> web.StreamResponse:
        body["stream"] = self.stream
        req = InferenceRequest(
            model=self.name, kind=kind, body=body, keep_alive=self.keep_alive,
            runner_options=self.runner_options or None, context_overflow=self.context_overflow,
        )
        t_open = time.monotonic_ns()
        async with self.gateway.open(req) as up:
            if up.status >= 400:
                raise runner_error(up.status, await up.read(), self.model.name)
            # The lease was granted `queued` seconds after the request was
            # queued (after any context_overflow work); the runner got the
            # request right after.
            t_sent = t_open + shapes.ns(up.fit_seconds) + shapes.ns(up.lease.queued)
            load = shapes.ns(up.lease.load_duration)
            if not self.stream or not up.streaming:
                data = await up.json()
                return web.json_response(self._report(self._whole(data, kind, t_sent, load), up))
            return await self._relay(up, kind, t_sent, load)

    @staticmethod
    def _report(obj: dict[str, Any], up: Any) -> dict[str, Any]:
        """The last object, with what the context_overflow policy did to the conversation, if anything."""
        if up.overflow is not None:
            obj["hoshikage"] = {"context_overflow": up.overflow}
        return obj

    def _whole(self, data: Any, kind: str, t_sent: int, load: int) -> dict[str, Any]:
        try:
            choice = data["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise RunnerFailed(f"runner for model '{self.model.name}' answered without choices: {str(data)[:200]}") from None
        usage = data.get("usage") or {}
        if kind == "chat":
            msg = choice.get("message") or {}
            extra = {}
            if msg.get("tool_calls"):
                extra["tool_calls"] = shapes.ollama_tool_calls(msg["tool_calls"])
            payload = self.message(msg.get("content") or "", **extra)
        else:
            payload = self.message(choice.get("text") or "")
        obj = {**self.head(), **payload, "done": True, "done_reason": shapes.done_reason(choice.get("finish_reason"))}
        obj["total_duration"] = _since(self.t0)
        obj["load_duration"] = load
        if isinstance(usage.get("prompt_tokens"), int):
            obj["prompt_eval_count"] = usage["prompt_tokens"]
        if isinstance(usage.get("completion_tokens"), int):
            obj["eval_count"] = usage["completion_tokens"]
        obj["eval_duration"] = max(0, time.monotonic_ns() - t_sent)
        return obj

    async def _relay(self, up: Any, kind: str, t_sent: int, load: int) -> web.StreamResponse:
        """NDJSON lines as tokens arrive.  Headers go out with the first line:
        a failure before it (a prompt over the context, a runner that dies
        during prompt processing) is answered with its own status and a JSON
        error; after it, the failure is the stream's last line."""
        resp = StreamResponse(status=200, headers=NDJSON_HEADERS)

        async def write(obj: dict[str, Any], *, last: bool = False) -> None:
            if not resp.prepared:
                await resp.prepare(self.request)
            if last:
                await resp.write_eof(_line(obj))  # the last line and the end in one write
            else:
                await resp.write(_line(obj))

        n = 0
        first = last = None
        finish = None
        usage: dict[str, Any] = {}
        tools = shapes.ToolCallAccumulator()
        try:
            async for event in up.iter_events():
                if "error" in event:
                    raise event_error(event, self.model.name)
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"]
                choices = event.get("choices") or []
                if not choices:
                    continue
                choice = choices[0]
                if kind == "chat":
                    delta = choice.get("delta") or {}
                    text = delta.get("content")
                    tools.add(delta.get("tool_calls"))
                else:
                    text = choice.get("text")
                if text:
                    n += 1
                    last = time.monotonic_ns()
                    first = first or last
                    await write({**self.head(), **self.message(text), "done": False})
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
            if finish is None:
                raise RunnerFailed(f"runner for model '{self.model.name}' ended the stream before finishing")
            calls = tools.result()
            if calls:
                await write({**self.head(), **self.message("", tool_calls=calls), "done": False})
            eval_count = usage.get("completion_tokens")
            if not isinstance(eval_count, int):
                eval_count = n
                if finish == "length" and self.sampling.get("max_tokens"):
                    eval_count = self.sampling["max_tokens"]  # generation stopped at exactly num_predict
            now = time.monotonic_ns()
            final = {
                **self.head(), **self.message(""), "done": True, "done_reason": shapes.done_reason(finish),
                "total_duration": _since(self.t0), "load_duration": load,
            }
            if isinstance(usage.get("prompt_tokens"), int):
                final["prompt_eval_count"] = usage["prompt_tokens"]
            final["prompt_eval_duration"] = max(0, (first or now) - t_sent)
            final["eval_count"] = eval_count
            final["eval_duration"] = max(0, (last or now) - (first or now))
            await write(self._report(final, up), last=True)
        except HoshikageError as e:
            if not resp.prepared:
                raise  # nothing sent yet: answered with its own status
            # Headers are gone: the failure is the last line, which clients raise.
            await resp.write_eof(_line({"error": e.message}))
        return resp


async def generate(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    call = _Call(request, body, chat=False)
    await call.read_format(body)
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise BadRequest(f"invalid prompt: expected a string, got {type(prompt).__name__}", param="prompt")
    if not prompt:
        return await call.load_or_unload()
    system = shapes.optional_str(body, "system")
    suffix = shapes.optional_str(body, "suffix")
    raw = body.get("raw") is True
    if raw or suffix:
        # No template: the prompt goes to /v1/completions as it is (with a
        # suffix, llama_cpp.server builds a fill-in-the-middle prompt from the
        # model's FIM tokens).  Images need the chat path.
        if body.get("images"):
            raise BadRequest("images cannot be sent with a raw prompt or a suffix", param="images")
        # `system` has no place in a template-less prompt; like Ollama's raw mode, it is not used.
        upstream: dict[str, Any] = {"prompt": prompt}
        if suffix:
            upstream["suffix"] = suffix
        if call.fmt is not None:
            upstream["grammar"] = shapes.completion_grammar(call.fmt)
        upstream.update(call.sampling)
        return await call.run("completion", upstream)
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    if body.get("images"):
        messages[-1]["images"] = body["images"]
    upstream = {"messages": shapes.chat_messages(messages, call.model)}
    if call.fmt is not None:
        upstream["response_format"] = call.fmt
    upstream.update(call.sampling)
    return await call.run("chat", upstream)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    call = _Call(request, body, chat=True)
    await call.read_format(body)
    messages = body.get("messages")
    if not messages:
        if messages is not None and not isinstance(messages, list):
            raise BadRequest("invalid messages: expected a list", param="messages")
        return await call.load_or_unload()
    upstream: dict[str, Any] = {"messages": shapes.chat_messages(messages, call.model)}
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise BadRequest("invalid tools: expected a list", param="tools")
        upstream["tools"] = tools
    if call.fmt is not None:
        upstream["response_format"] = call.fmt
    upstream.update(call.sampling)
    return await call.run("chat", upstream)


# ------------------------------------------------------------------ embeddings


async def _embed(request: web.Request, body: dict[str, Any], inputs: list[str]) -> tuple[list[list[float]], dict[str, Any], int]:
    name = shapes.model_name(body)
    keep_alive = keep_alive_of(body)
    gateway = ctx(request).gateway
    model = gateway.resolve(name)
    _, runner_options = shapes.translate_options(body.get("options"), model)
    if not inputs:
        lease = await gateway.load(name, keep_alive, runner_options or None)
        return [], {}, shapes.ns(lease.load_duration)
    # Ollama's `truncate`: cut inputs longer than the context; otherwise they are a 400.
    truncate = body.get("truncate") is True
    req = InferenceRequest(model=name, kind="embedding", body={"input": inputs}, keep_alive=keep_alive,
                           runner_options=runner_options or None, truncate=truncate)
    async with gateway.open(req) as up:
        if up.status >= 400:
            raise runner_error(up.status, await up.read(), model.name)
        data = await up.json()
        load = shapes.ns(up.lease.load_duration)
    try:
        items = sorted(data["data"], key=lambda d: d.get("index", 0))
        vectors = [shapes.pool(d["embedding"]) for d in items]
    except (KeyError, TypeError) as e:
        raise RunnerFailed(f"runner for model '{model.name}' answered an unexpected embedding body: {e}") from None
    return vectors, data.get("usage") or {}, load


async def embed(request: web.Request) -> web.Response:
    t0 = time.monotonic_ns()
    body = await read_json(request)
    inputs = shapes.embed_inputs(body.get("input"))
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise BadRequest(f"invalid dimensions: expected a positive integer, got {dimensions!r}", param="dimensions")
    truncate = body.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise BadRequest(f"invalid truncate: expected true or false, got {truncate!r}", param="truncate")
    name = shapes.model_name(body)
    vectors, usage, load = await _embed(request, body, inputs)
    if dimensions:
        vectors = [v[:dimensions] for v in vectors]
    out: dict[str, Any] = {
        "model": name,
        "embeddings": [shapes.normalize(v) for v in vectors],
        "total_duration": _since(t0),
        "load_duration": load,
    }
    if isinstance(usage.get("prompt_tokens"), int):
        out["prompt_eval_count"] = usage["prompt_tokens"]
    return web.json_response(out)


async def embeddings(request: web.Request) -> web.Response:
    """The older endpoint: one `prompt`, one `embedding`, not normalised."""
    body = await read_json(request)
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise BadRequest(f"invalid prompt: expected a string, got {type(prompt).__name__}", param="prompt")
    vectors, _, _ = await _embed(request, body, [prompt] if prompt else [])
    return web.json_response({"embedding": vectors[0] if vectors else []})


# ------------------------------------------------------------------ model listings


async def tags(request: web.Request) -> web.Response:
    """Every configured model under its name and under each alias, as Ollama lists each tag."""
    c = ctx(request)
    entries = []
    for model in c.config.models.values():
        info = await asyncio.to_thread(shapes.model_info, model)
        for name in model.names:
            entries.append(shapes.tag_entry(name, model, info))
    return web.json_response({"models": entries})


async def ps(request: web.Request) -> web.Response:
    c = ctx(request)
    now = time.time()
    out = []
    for m in c.scheduler.status().models:
        model = m.model
        info = await asyncio.to_thread(shapes.model_info, model)
        out.append({
            "name": m.name,
            "model": m.name,
            "size": int(m.cpu_bytes + m.gpu_bytes),
            "digest": shapes.digest(model),
            "details": shapes.details(model, info),
            "expires_at": shapes.expires_at(m, now),
            "size_vram": int(m.gpu_bytes),
            "context_length": m.context_length,
            # Hoshikage's own fields
            "aliases": list(model.aliases),
            "state": m.state,
            "keep_alive": format_duration(m.session),
            "pinned": m.pinned,
            "requests_in_flight": m.refcount,
            "pids": m.pids,
            "options": m.options.describe(),
            "estimate_bytes": int(m.estimate_bytes),
            "measured_bytes": m.measured_bytes,
            "replicas": [_replica(r) for r in m.replicas],
        })
    return web.json_response({"models": out})


def _replica(r: ReplicaStatus) -> dict[str, Any]:
    return {
        "replica": r.index, "state": r.state, "pid": r.pid, "inflight": r.inflight, "served": r.served,
        "estimate_cpu_bytes": r.estimate_cpu_bytes, "estimate_gpu_bytes": dict(r.estimate_gpu_bytes),
        "measured_cpu_bytes": r.measured_cpu_bytes,
        "measured_gpu_bytes": dict(r.measured_gpu_bytes) if r.measured_gpu_bytes else None,
        "n_gpu_layers": r.n_gpu_layers, "load_duration": r.load_duration,
    }


async def show(request: web.Request) -> web.Response:
    body = await read_json(request)
    c = ctx(request)
    name = shapes.model_name(body, legacy=True)
    model = c.gateway.resolve(name)
    info = await asyncio.to_thread(shapes.model_info, model)
    if info is None:
        raise HoshikageError(f"cannot read the GGUF metadata of model '{model.name}' ({model.path})")
    model_info = await asyncio.to_thread(shapes.gguf_model_info, model, info)
    _, mtime = shapes.file_facts(model)
    out: dict[str, Any] = {
        "modelfile": shapes.modelfile(model, c.config.source),
        "parameters": shapes.parameters(model),
        "template": shapes.template(model, info),
        "details": shapes.details(model, info),
        "model_info": model_info,
        "capabilities": shapes.capabilities(model, info),
        "modified_at": shapes.rfc3339(mtime),
    }
    if isinstance(model_info.get("general.license"), str):
        out["license"] = model_info["general.license"]
    return web.json_response(out)


# ------------------------------------------------------------------ what we do not do


def _not_supported(what: str):
    async def handler(request: web.Request) -> web.Response:
        raise shapes.NotSupported(
            f"{what} is not supported: Hoshikage serves the GGUF files configured in the [models] "
            "tables of its TOML config; add or change a model there and restart"
        )

    return handler


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", root)  # aiohttp answers HEAD for GET routes
    app.router.add_get("/api/version", version)
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/embed", embed)
    app.router.add_post("/api/embeddings", embeddings)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/show", show)
    app.router.add_post("/api/pull", _not_supported("pulling models (/api/pull)"))
    app.router.add_post("/api/push", _not_supported("pushing models (/api/push)"))
    app.router.add_post("/api/create", _not_supported("creating models (/api/create)"))
    app.router.add_post("/api/copy", _not_supported("copying models (/api/copy)"))
    app.router.add_delete("/api/delete", _not_supported("deleting models (/api/delete)"))
    app.router.add_route("HEAD", "/api/blobs/{digest}", _not_supported("model blobs (/api/blobs)"))
    app.router.add_post("/api/blobs/{digest}", _not_supported("model blobs (/api/blobs)"))
