"""Answer what llama_cpp.server gets wrong about failing requests, before and during a stream.

How llama_cpp.server (0.3.x) answers a request that cannot be served:

* A streamed completion or chat returns an ``EventSourceResponse`` at once;
  sse-starlette sends ``http.response.start`` (200, ``text/event-stream``)
  before ``get_event_publisher`` has even taken the model lock.  The prompt
  is tokenised and checked on the generator's first ``next()``, in that
  publisher, so a prompt longer than the context, a bad ``logit_bias``,
  ``logprobs`` without ``logits_all``... all fail after the headers: the
  exception escapes the response's task group, uvicorn logs it and drops
  the connection, and the client sees a 200 with no event at all.  A failure
  between two chunks ends the stream the same way.
* Non-streamed, the same prompt gets a 400 from its context-length formatter,
  which prints ``None`` for a missing ``max_tokens`` and the wrong context
  size (below).
* ``/v1/embeddings`` calls ``Llama.embed`` with ``truncate=True``: an input
  longer than what the model can embed is cut without a word.  An empty
  input list reaches ``llama_decode`` with an empty batch (500 "llama_decode
  returned -1").  An empty string embeds the BOS token alone.
* llama.cpp pads the context it allocates (n_ctx 128 becomes 256), and
  ``Llama`` checks prompts and caps generation against that padded size
  while its token buffer has the size that was asked for: a prompt between
  the two sizes, or a generation that runs past the requested size, dies
  with a numpy broadcast error.

`install` fixes these for the runner, touching as little of llama_cpp as it
can: one ASGI middleware (`RequestGuard`), llama_cpp.server's stream
publisher and resource preparation (module functions the routes look up at
request time), its context-length error formatter, and two attributes of the
one loaded ``Llama`` instance.  Everything else behaves as llama_cpp.server
does.

* A streamed response's headers wait for its first event.  Anything that
  fails before it is answered like the same request without ``stream``: a
  JSON error with its status (400 ``context_length_exceeded`` for a prompt
  that does not fit).  This also means a stream shows nothing while the
  prompt is processed; the supervisor waits for the first event anyway.
* A failure after the first event ends the stream with one last event,
  ``data: {"error": {..., "type": "server_error"}}``, and is logged with its
  traceback; the supervisor adds ``data: [DONE]``.
* An embedding input longer than the model takes is a 400
  ``context_length_exceeded`` unless the request carries
  ``X-Hoshikage-Truncate: true`` (the supervisor sets it for Ollama's
  ``truncate``); empty inputs are a 400.
* A ``grammar`` that llama.cpp cannot use is a 400 before llama.cpp sees it
  (an invalid grammar crashes the process with SIGSEGV).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
import sys
import traceback
from typing import Any, Awaitable, Callable, MutableMapping, Sequence

import anyio
import llama_cpp
import llama_cpp.server.app as llama_app
import llama_cpp.server.errors as llama_errors
from fastapi import FastAPI, HTTPException, Request
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from hoshikage_runner.gbnf import GrammarError, check_grammar

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The request header with which the supervisor allows an embedding input to be cut.
TRUNCATE_HEADER = b"x-hoshikage-truncate"
# Whether the request being served carries TRUNCATE_HEADER.  Set by `RequestGuard`
# around the whole request; the embedding runs in a worker thread, and anyio copies
# the context into it (starlette's run_in_threadpool -> anyio.to_thread.run_sync).
truncate_allowed: contextvars.ContextVar[bool] = contextvars.ContextVar("hoshikage_truncate", default=False)

# Where `RequestGuard` puts a request's `StreamState` in the ASGI scope.
STATE_KEY = "hoshikage.stream"

# llama_cpp's own messages, which llama_cpp.server's route handler also matches.
CONTEXT_OVERFLOW = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")
BATCH_OVERFLOW = re.compile(r"Requested tokens \((\d+)\) exceed batch size of (\d+)")

# Response headers of an event stream that a JSON error answer must not keep.
_STREAM_HEADERS = frozenset({b"content-type", b"content-length", b"cache-control", b"x-accel-buffering",
                             b"connection", b"transfer-encoding"})


class RequestRejected(ValueError):
    """A request we refuse before llama.cpp runs it, as an OpenAI error.

    A ValueError, so that without `install`'s handler it is still a 400
    (see ``server.classify_request_errors``), just without param and code.
    """

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.status = status
        self.response = llama_errors.ErrorResponse(
            message=message, type="invalid_request_error", param=param, code=code
        )


# ------------------------------------------------------------------ the context


def fit_context(llama: llama_cpp.Llama) -> int:
    """Make ``llama`` check prompts and cap generation against the context it can hold; return it.

    llama.cpp rounds the context up (to a multiple of 256 for the demo
    model), ``Llama._n_ctx`` takes that rounded size from ``llama_n_ctx``,
    while ``Llama.input_ids`` (every evaluated token is stored there) has the
    size the runner was started with.  ``_create_completion`` rejects prompts
    and truncates ``max_tokens`` against ``_n_ctx``, so a prompt of 200
    tokens with n_ctx 128 passed the check and failed in ``eval`` with
    numpy's "could not broadcast input array from shape ...", and a
    generation that reached token 128 failed the same way mid-stream.  Lowering ``_n_ctx`` on
    this instance to the buffer's size makes llama_cpp's own checks right;
    it is also the context the supervisor planned memory for and reports.
    """
    usable = min(llama.n_ctx(), len(llama.input_ids))
    if llama._n_ctx > usable:
        llama._n_ctx = usable
    return usable


def context_length_formatter(n_ctx: int) -> Callable[[Any, re.Match[str]], tuple[int, llama_errors.ErrorResponse]]:
    """llama_cpp.server's context-length formatter, with the right numbers and field.

    Its own says "(N in the messages, None in the completion)" when
    ``max_tokens`` is null, names ``messages`` for /v1/completions too, and
    prints llama.cpp's padded context size (see `fit_context`).  A prompt is
    refused when it fills the context: there must be room for one token.
    """

    def context_length_exceeded(request: Any, match: re.Match[str]) -> tuple[int, llama_errors.ErrorResponse]:
        prompt_tokens = int(match.group(1))
        return 400, overflow_error(request, prompt_tokens, n_ctx)

    return context_length_exceeded


def overflow_error(request: Any, prompt_tokens: int, n_ctx: int) -> llama_errors.ErrorResponse:
    """The OpenAI error for a prompt of ``prompt_tokens`` that does not fit in ``n_ctx``."""
    field = "messages" if hasattr(request, "messages") else "prompt"
    max_tokens = getattr(request, "max_tokens", None)
    message = (
        f"This model's maximum context length is {n_ctx} tokens. "
        f"However, your {field} resulted in {prompt_tokens} tokens"
    )
    if prompt_tokens <= n_ctx:
        message += ", which leaves no room for the completion"
    if max_tokens is not None and max_tokens > 0:
        message += f" (max_tokens asks for {max_tokens} more)"
    message += f". Please reduce the length of the {field}."
    return llama_errors.ErrorResponse(
        message=message, type="invalid_request_error", param=field, code="context_length_exceeded"
    )


# ------------------------------------------------------------------ embeddings


def guard_embeddings(llama: llama_cpp.Llama, n_ctx: int) -> None:
    """Refuse empty and over-long embedding inputs on this ``Llama`` instead of failing or cutting them.

    ``create_embedding`` (what the route calls) always calls ``embed`` with
    its default ``truncate=True``, which cuts every input to ``n_batch``
    tokens (at most the context) without saying so.  The route offers no way
    in, so ``embed`` is wrapped on the loaded instance (not on the class: the
    runner serves this one model): it truncates only when the request allowed
    it (`truncate_allowed`), and otherwise turns llama_cpp's own overflow
    error into a 400 that names the input.  Counting every input's tokens up
    front would tokenise each input twice; the overflow is found by
    llama_cpp, and only then are the inputs counted to name the culprit.

    After any failure the model's token bookkeeping is reset: ``embed``
    clears the KV cache and calls ``reset`` only when it succeeds, so a
    failure half-way would leave ``n_tokens`` describing a cache that no
    longer holds those tokens, and the next completion would reuse them.
    """
    embed = llama.embed
    if getattr(embed, "hoshikage_guard", False):
        return

    def guarded_embed(input: str | list[str], normalize: bool = False, truncate: bool = True,
                      return_count: bool = False) -> Any:
        texts = [input] if isinstance(input, str) else list(input)
        check_embedding_inputs(texts)
        cut = truncate and truncate_allowed.get()
        try:
            return embed(input, normalize=normalize, truncate=cut, return_count=return_count)
        except Exception as error:
            llama.reset()
            if not cut and BATCH_OVERFLOW.search(str(error)):
                raise embedding_overflow(llama, texts, n_ctx) from None
            raise

    guarded_embed.hoshikage_guard = True  # type: ignore[attr-defined]
    llama.embed = guarded_embed  # type: ignore[method-assign]


def check_embedding_inputs(texts: Sequence[str]) -> None:
    """400 for nothing to embed: an empty list, or an empty string (OpenAI refuses both).

    Inputs are named by their index in the list; ``create_embedding`` has
    already made a single string a list of one.
    """
    if not texts:
        raise RequestRejected("'input' is an empty list: give a string or a list of non-empty strings",
                              param="input")
    for index, text in enumerate(texts):
        if not text:
            raise RequestRejected(f"input[{index}] is an empty string: there is nothing to embed", param="input")


def embedding_overflow(llama: llama_cpp.Llama, texts: Sequence[str], n_ctx: int) -> RequestRejected:
    """The 400 for the first input over the limit, counted the way ``embed`` counts it."""
    limit = llama.n_batch
    for index, text in enumerate(texts):
        tokens = len(llama.tokenize(text.encode("utf-8")))
        if tokens > limit:
            break
    else:  # cannot happen: llama_cpp found one; say what we know
        index, tokens = 0, limit + 1
    if limit >= n_ctx:
        bound = f"this model's maximum context length of {n_ctx} tokens"
    else:
        bound = f"the {limit} tokens this model embeds at once (n_batch {limit}; context length {n_ctx})"
    return RequestRejected(
        f"input[{index}] is {tokens} tokens long, more than {bound}. "
        "Please shorten it, or ask for it to be truncated.",
        param="input",
        code="context_length_exceeded",
    )


# ------------------------------------------------------------------ grammars


def check_request_grammar(grammar: str, llama: llama_cpp.Llama) -> None:
    """400 for a grammar llama.cpp would reject or mishandle; it must never reach llama.cpp.

    ``<name>`` token references are checked against this model's vocabulary,
    the way llama.cpp resolves them (exactly one token, special tokens
    allowed).
    """

    def is_single_token(text: str) -> bool:
        return len(llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)) == 1

    try:
        check_grammar(grammar, "root", is_single_token=is_single_token)
    except GrammarError as e:
        raise RequestRejected(str(e), param="grammar") from None


def guarded_prepare_request_resources(
    original: Callable[..., llama_cpp.Llama],
) -> Callable[..., llama_cpp.Llama]:
    """llama_cpp.server's ``prepare_request_resources`` with the grammar checked first.

    Both completion routes (streamed and not) call it, and it is where the
    request's grammar becomes a ``LlamaGrammar``; llama.cpp only parses it
    when sampling starts, and crashes the process on a bad one.
    """

    def prepare_request_resources(
        body: Any, llama_proxy: Any, body_model: str | None, kwargs: dict[str, Any]
    ) -> llama_cpp.Llama:
        if getattr(body, "grammar", None) is not None and llama_proxy is not None:
            check_request_grammar(body.grammar, llama_proxy(body_model))
        return original(body, llama_proxy, body_model, kwargs)

    prepare_request_resources.hoshikage_guard = True  # type: ignore[attr-defined]
    return prepare_request_resources


# ------------------------------------------------------------------ streams


class StreamState:
    """What the stream publisher tells `RequestGuard` about one request.

    ``rejection`` is (status, error) when the stream failed before its first
    event: the held headers are then replaced by that JSON answer.
    """

    __slots__ = ("rejection",)

    def __init__(self) -> None:
        self.rejection: tuple[int, Any] | None = None


def classify(request: Request, error: Exception, body: Any) -> tuple[int, Any]:
    """Status and OpenAI error for ``error``, as the route would answer it without ``stream``."""
    if isinstance(error, HTTPException):
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        response = llama_errors.ErrorResponse(message=str(error.detail), type=kind, param=None, code=None)
        return error.status_code, response
    route = request.scope.get("route")
    if isinstance(route, llama_errors.RouteErrorHandler):
        return route.error_message_wrapper(error=error, body=body)
    handler = llama_errors.RouteErrorHandler  # its wrapper only reads class attributes
    return handler.error_message_wrapper(handler, error=error, body=body)  # type: ignore[arg-type]


def stream_error_event(error: BaseException) -> dict[str, str]:
    """The last event of a stream that failed after it started."""
    payload = {"error": {"message": str(error) or type(error).__name__, "type": "server_error",
                         "param": None, "code": None}}
    return {"data": json.dumps(payload)}


async def event_publisher(
    request: Request,
    inner_send_chan: Any,
    body: CreateCompletionRequest | CreateChatCompletionRequest,
    body_model: str | None,
    llama_call: Callable[..., Any],
    kwargs: dict[str, Any],
) -> None:
    """llama_cpp.server's ``get_event_publisher``, with failures reported instead of lost.

    Same locking, resource preparation, chunks, disconnect and interrupt
    handling as the original (0.3.x).  The differences: resource
    preparation runs inside the error handling (a grammar or ``logit_bias``
    problem is a request error too); a failure before the first chunk is
    handed to `RequestGuard` (through the scope's `StreamState`) to be
    answered with a status, classified by the route's own error handler; a
    failure after it is logged and sent as a final error event.
    """
    server_settings = next(llama_app.get_server_settings())
    interrupt_requests = server_settings.interrupt_requests if server_settings else False
    state = request.scope.get(STATE_KEY)
    cancelled = anyio.get_cancelled_exc_class()
    async with contextlib.asynccontextmanager(llama_app.get_llama_proxy)() as llama_proxy:
        async with inner_send_chan:
            sent = 0
            try:
                llama = llama_app.prepare_request_resources(body, llama_proxy, body_model, kwargs)
                iterator = await run_in_threadpool(llama_call, llama, **kwargs)
                async for chunk in iterate_in_threadpool(iterator):
                    await inner_send_chan.send(dict(data=json.dumps(chunk)))
                    sent += 1
                    if await request.is_disconnected():
                        raise cancelled()
                    if interrupt_requests and llama_app.llama_outer_lock.locked():
                        await inner_send_chan.send(dict(data="[DONE]"))
                        raise cancelled()
                await inner_send_chan.send(dict(data="[DONE]"))
            except cancelled:
                with anyio.move_on_after(1, shield=True):
                    print(f"Disconnected from client (via refresh/close) {request.client}")
                raise
            except Exception as error:
                if sent == 0 and isinstance(state, StreamState):
                    state.rejection = classify(request, error, body)
                    return
                print(f"Exception in stream after {sent} chunks: {error!r}", file=sys.stderr)
                traceback.print_exc(file=sys.stderr)
                await inner_send_chan.send(stream_error_event(error))


class RequestGuard:
    """ASGI middleware: per-request state for the guards, and headers held until a stream has begun.

    * Sets `truncate_allowed` from ``X-Hoshikage-Truncate`` for the request.
    * An event-stream response's ``http.response.start`` is held until its
      first event.  Keep-alive comments before it are dropped (there is
      nothing to keep alive yet: the client has no headers).  If the
      publisher reports a failure before the first event, the stream's end
      is answered with that status and a JSON error instead.

    Pure ASGI, so the stream itself passes through untouched; other
    responses are not delayed.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = StreamState()
        scope[STATE_KEY] = state
        token = truncate_allowed.set(_header_is_true(scope, TRUNCATE_HEADER))
        try:
            await self.app(scope, receive, _holding_send(state, send))
        finally:
            truncate_allowed.reset(token)


def _header_is_true(scope: Scope, name: bytes) -> bool:
    return any(k == name and v.strip().lower() in (b"true", b"1") for k, v in scope.get("headers", ()))


def _is_event_stream(message: Message) -> bool:
    headers = message.get("headers", ())
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)


def _holding_send(state: StreamState, send: Send) -> Send:
    held: Message | None = None

    async def guarded_send(message: Message) -> None:
        nonlocal held
        kind = message["type"]
        if kind == "http.response.start" and _is_event_stream(message):
            held = message
            return
        if held is None or kind != "http.response.body":
            await send(message)
            return
        more = message.get("more_body", False)
        if state.rejection is not None:
            if not more:
                start, held = held, None
                await _send_error(send, start, *state.rejection)
            return
        chunk = message.get("body", b"")
        if more and (not chunk or chunk.startswith(b":")):
            return
        start, held = held, None
        await send(start)
        await send(message)

    return guarded_send


async def _send_error(send: Send, start: Message, status: int, error: Any) -> None:
    """Answer with ``{"error": error}`` and the stream's non-stream headers (request id, CORS)."""
    body = json.dumps({"error": error}, separators=(",", ":")).encode()
    headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() not in _STREAM_HEADERS]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# ------------------------------------------------------------------ installation


def _install_error_handling(n_ctx: int) -> None:
    """Our context-length formatter in place of llama_cpp.server's, and `RequestRejected` answered as it says."""
    handler = llama_errors.RouteErrorHandler
    formatters = handler.pattern_and_formatters
    for pattern in [p for p in formatters if p.pattern == CONTEXT_OVERFLOW.pattern]:
        del formatters[pattern]
    formatters[CONTEXT_OVERFLOW] = context_length_formatter(n_ctx)

    current = handler.error_message_wrapper
    if getattr(current, "hoshikage_guard", False):
        return

    def error_message_wrapper(self: Any, error: Exception, body: Any = None) -> tuple[int, Any]:
        if isinstance(error, RequestRejected):
            return error.status, error.response
        return current(self, error, body)

    error_message_wrapper.hoshikage_guard = True  # type: ignore[attr-defined]
    handler.error_message_wrapper = error_message_wrapper  # type: ignore[method-assign]


def loaded_llama() -> llama_cpp.Llama:
    """The ``Llama`` that ``create_app`` has loaded (a runner serves exactly one model)."""
    proxy = llama_app._llama_proxy
    if proxy is None:
        raise RuntimeError("create_app has not loaded a model")
    return proxy()


def install(app: FastAPI) -> None:
    """Install every guard on ``app``, an app from ``create_app`` whose model is loaded.

    Call it once the app is complete (the middleware goes around everything
    added before).  The patches to llama_cpp.server's module functions apply
    to the process; installing again (a second app in one process) re-fits
    the context of the model now loaded and keeps the other patches.
    """
    llama = loaded_llama()
    n_ctx = fit_context(llama)
    guard_embeddings(llama, n_ctx)
    _install_error_handling(n_ctx)
    if not getattr(llama_app.prepare_request_resources, "hoshikage_guard", False):
        llama_app.prepare_request_resources = guarded_prepare_request_resources(llama_app.prepare_request_resources)
    llama_app.get_event_publisher = event_publisher
    app.add_middleware(RequestGuard)


__all__ = ["RequestGuard", "RequestRejected", "install", "loaded_llama", "truncate_allowed"]
