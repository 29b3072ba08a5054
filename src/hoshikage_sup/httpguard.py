"""Defences of the HTTP front against slow, hostile or broken clients.

A supervisor that serves long generations keeps connections open for minutes
on purpose, so it must be strict about everything else: a client may only hold
a connection while it is sending a request at a reasonable pace, waiting for
its answer, or briefly between two requests.  Each limit below protects one
resource, and every failure is a 4xx with a JSON body in the API's own shape
that touches no other client.

Request head (`header_timeout`, `GuardedRequestHandler`): a connection must
deliver a complete request line and headers within `header_timeout` seconds of
connecting, or of the first byte of a later request on a kept-alive connection.
The deadline is fixed when the head starts; bytes that trickle in do not move
it, so a slowloris client (one header byte every few seconds) is closed at
`header_timeout` like one that sends nothing.  A client that sent part of a
head gets a 408 before the close.

Idle keep-alive (`idle_timeout`): a kept-alive connection on which no new
request starts within `idle_timeout` of the previous response is closed.  This
is aiohttp's own `keepalive_timeout`, which only closes a connection whose
handler loop is waiting for a request, never one whose request is in progress.

Connections (`max_connections`): beyond that many open connections a new one
is answered `503` with a JSON body and `Retry-After: 1` at once and closed, so
a flood of sockets cannot exhaust file descriptors or memory; established
connections are not affected.

Request body (`read_body`): a pause of more than `body_timeout` between two
pieces of the body, or a body that is not complete `body_deadline` seconds
after the handler started reading it, is a 408 and the connection is closed
without waiting for the rest (1 byte a second is within any pause limit, but
not within the deadline).  A body over `max_body_size` is a 413 as soon as
that is known (from Content-Length, or while reading) without reading the rest.
aiohttp's automatic request decompression is turned off; `read_body` decodes
gzip, x-gzip and deflate itself, incrementally, capping the decoded size at the
same limit, so a decompression bomb is a 413 after at most `max_body_size`
bytes of output, never a memory blow-up.  Other encodings are a 415.

JSON (`parse_json_object`): stricter than Python's `json`: no NaN/Infinity, no
lone surrogates, no floats that overflow to infinity, bounded nesting (checked
without recursion, and a RecursionError of the C decoder is a 400 too).

None of these limits applies to writing a response: a streaming generation
that runs for minutes is never cut by them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import math
import re
import zlib
from dataclasses import dataclass
from itertools import chain
from http import HTTPStatus
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from .errors import BadRequest, HoshikageError, PayloadTooLarge, RequestTimeout, UnsupportedMediaType

__all__ = [
    "ConnectionLimits",
    "GuardedAppRunner",
    "GuardedRequestHandler",
    "GuardedServer",
    "parse_json_object",
    "read_body",
]


# ---------------------------------------------------------------- error bodies


def _ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def _error_body(path: str, message: str, *, kind: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """The same two shapes as `app.error_middleware`: Ollama under /api/, OpenAI elsewhere."""
    if _ollama_path(path):
        return {"error": message}
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _raw_response(status: int, body: dict[str, Any], *, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 response for the cases where no aiohttp request exists yet."""
    payload = json.dumps(body).encode()
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(payload)}",
        "Connection: close",
    ]
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + payload


_REQUEST_TARGET = re.compile(rb"[A-Za-z]+ +(\S+)")


def _path_of_head(prefix: bytes) -> str:
    """The request target of a partial request head, or "/" when it is not there yet."""
    m = _REQUEST_TARGET.match(prefix)
    if m is None or (m.end() == len(prefix)):  # the target may still be incomplete
        return "/"
    return m.group(1).decode("latin-1")


# ---------------------------------------------------------------- connection limits


@dataclass(frozen=True)
class ConnectionLimits:
    """Limits on connections, enforced by `GuardedAppRunner` (seconds, count)."""

    header_timeout: float = 10.0
    idle_timeout: float = 30.0
    max_connections: int = 1024

    def __post_init__(self) -> None:
        if not self.header_timeout > 0:
            raise ValueError(f"header_timeout must be above zero, got {self.header_timeout!r}")
        if not self.idle_timeout > 0:
            raise ValueError(f"idle_timeout must be above zero, got {self.idle_timeout!r}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {self.max_connections!r}")

    @classmethod
    def from_config(cls, server: Any) -> "ConnectionLimits":
        """From a `config.ServerConfig` (or anything with the same three attributes)."""
        return cls(header_timeout=server.header_timeout, idle_timeout=server.idle_timeout, max_connections=server.max_connections)


# A rejected connection is half-closed after its 503 and fully closed when the
# client closes or after this long; reading what the client still sends until
# then keeps the kernel from answering it with a reset that could destroy the
# 503 before the client reads it.  Past _MAX_LINGERING_REJECTS such
# connections at once, new rejects are closed without waiting.
_REJECT_LINGER = 1.0
_MAX_LINGERING_REJECTS = 256
_HEAD_PREFIX = 64  # bytes of a request head kept to pick the shape of its 408

# Internals of aiohttp's RequestHandler that the guard reads or overrides; checked
# once when a GuardedAppRunner is made so that an aiohttp upgrade which renames
# one fails at start-up instead of silently dropping a limit.
_HANDLER_INTERNALS = (
    "_waiter", "_messages", "_request_count", "_force_close", "_keepalive_handle", "_lingering_time", "_process_keepalive",
)


def _check_aiohttp_internals() -> None:
    missing = [name for name in _HANDLER_INTERNALS if not hasattr(RequestHandler, name)]
    if "auto_decompress" not in inspect.signature(RequestHandler.__init__).parameters:
        missing.append("RequestHandler(auto_decompress=)")
    if missing:
        import aiohttp

        raise RuntimeError(
            f"aiohttp {aiohttp.__version__} lacks {', '.join(missing)}: "
            "hoshikage_sup.httpguard was written against aiohttp 3.14 and needs updating"
        )


class GuardedRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol plus a request-head deadline, the
    connection count and JSON bodies for the errors aiohttp answers itself.

    The head deadline runs only while the handler loop waits for a request
    (aiohttp's `_waiter` is pending and no parsed request is queued): it is
    armed at connection time and by the first byte that arrives in that state,
    and disarmed when the parser delivers a request (or a parse error).  While
    a request is being handled nothing here can close the connection.
    """

    __slots__ = ("_limits", "_guard", "_counted", "_rejected", "_reject_timer", "_head_timer", "_head_prefix", "_closing_after_response")

    def __init__(self, manager: "GuardedServer", *, limits: ConnectionLimits, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._guard = manager
        self._counted = False
        self._rejected: asyncio.Transport | None = None
        self._reject_timer: asyncio.TimerHandle | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_prefix = b""
        self._closing_after_response = False

    # -------------------------------------------------------- connection count

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if guard.active_connections >= self._limits.max_connections:
            self._reject(transport)  # type: ignore[arg-type]
            return
        guard.active_connections += 1
        self._counted = True
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._rejected is not None:
            self._rejected = None
            self._guard._rejecting.discard(self)  # noqa: SLF001
            if self._reject_timer is not None:
                self._reject_timer.cancel()
                self._reject_timer = None
            return
        if self._counted:
            self._counted = False
            self._guard.active_connections -= 1
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _reject(self, transport: asyncio.Transport) -> None:
        guard = self._guard
        guard.rejected_connections += 1
        self._rejected = transport
        body = _error_body(
            "/",
            f"server busy: {self._limits.max_connections} connections are already open (max_connections), please retry",
            kind="server_busy",
            code="server_busy",
        )
        try:
            transport.write(_raw_response(503, body, retry_after=1))
            if len(guard._rejecting) < _MAX_LINGERING_REJECTS and transport.can_write_eof():  # noqa: SLF001
                transport.write_eof()
                guard._rejecting.add(self)  # noqa: SLF001
                self._reject_timer = asyncio.get_running_loop().call_later(_REJECT_LINGER, transport.close)
            else:
                transport.close()
            # When the client closes its side, RequestHandler.eof_received
            # returns None and the transport closes itself.
        except Exception:  # the socket is already unusable
            transport.abort()

    def _close_rejected(self) -> None:
        if self._rejected is not None:
            self._rejected.close()

    # -------------------------------------------------------- request head deadline

    def _awaiting_request(self) -> bool:
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_prefix = b""
            self._head_timer = self._loop.call_later(self._limits.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_prefix = b""

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or self._force_close or not self._awaiting_request():
            return  # closed already, or a request is in progress: not ours to cut
        if self._head_prefix:
            path = _path_of_head(self._head_prefix)
            message = f"request headers not received within {self._limits.header_timeout:g} s (header_timeout)"
            with contextlib.suppress(Exception):
                transport.write(_raw_response(408, _error_body(path, message, kind="invalid_request_error", code="request_timeout")))
        self.force_close()

    def data_received(self, data: bytes) -> None:
        if self._rejected is not None:
            return  # read and dropped until the linger ends
        # First bytes of a new request on a kept-alive connection start the
        # deadline; armed only if they do not hold the whole head already
        # (the usual case: no timer made and cancelled for nothing).
        starts = bool(data) and self._head_timer is None and self._awaiting_request()
        if self._head_timer is not None and len(self._head_prefix) < _HEAD_PREFIX:
            self._head_prefix += data[: _HEAD_PREFIX - len(self._head_prefix)]
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:  # a complete head (or a parse error) was delivered
            self._disarm_head_timer()
        elif starts and self._head_timer is None and self.transport is not None and not self._force_close:
            self._arm_head_timer()
            self._head_prefix = data[:_HEAD_PREFIX]

    def _process_keepalive(self) -> None:
        # aiohttp's idle timer also fires while the head of the next request is
        # arriving; that head is governed by header_timeout instead.
        if self._head_timer is not None:
            self._keepalive_handle = None
            return
        super()._process_keepalive()

    # -------------------------------------------------------- helpers for read_body

    def close_after_response(self) -> None:
        """Close once the current response is written, without reading the rest of
        the request body first (aiohttp would otherwise linger, reading it)."""
        self._closing_after_response = True
        with contextlib.suppress(AttributeError):
            self._lingering_time = 0.0
        self.close()

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        if self._closing_after_response and isinstance(resp, web.StreamResponse) and not resp.prepared:
            resp.force_close()  # tell the client: "Connection: close"
        return await super().finish_response(request, resp, start_time)

    # -------------------------------------------------------- errors aiohttp answers

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """JSON instead of aiohttp's plain text for errors raised before or around
        a handler (malformed request line, oversized headers, unhandled errors)."""
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:
            self.logger.debug("Bad request from %s: %s", request.remote, message or exc)
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        if status == 500:
            text = "internal server error"
        elif status == 504:
            text = "the request handler timed out"
        elif message:
            text = f"invalid HTTP request: {message}" if status == 400 else message
        else:
            try:
                text = HTTPStatus(status).phrase
            except ValueError:
                text = f"HTTP {status}"
        if len(text) > 300:
            text = text[:300] + "..."
        body = _error_body(
            request.path, text, kind="server_error" if status >= 500 else "invalid_request_error", code=None
        )
        resp = web.Response(status=status, text=json.dumps(body), content_type="application/json")
        resp.force_close()
        return resp


class GuardedServer(Server):
    """aiohttp's low-level server making `GuardedRequestHandler`s and counting them."""

    def __init__(self, handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]], *, limits: ConnectionLimits, **kwargs: Any):
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.active_connections = 0  # accepted and not yet lost
        self.rejected_connections = 0  # answered 503 since start
        self._rejecting: set[GuardedRequestHandler] = set()

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, limits=self.limits, **self._kwargs)

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        for handler in list(self._rejecting):
            handler._close_rejected()  # noqa: SLF001


class GuardedAppRunner(web.AppRunner):
    """`web.AppRunner` whose server enforces `ConnectionLimits`.

    Written against aiohttp 3.14 (read from 3.14.5's web_runner.py,
    web_server.py and web_protocol.py): `_make_server` lets AppRunner build its
    `Server` (application start-up, handler arguments) and then builds a
    `GuardedServer` with the same handler, request factory and arguments.
    Runs with `keepalive_timeout=limits.idle_timeout` and
    `auto_decompress=False` (request bodies are decoded by `read_body`).
    Other keyword arguments go to AppRunner as usual.  Besides the methods it
    overrides, the guard reads a few of RequestHandler's private attributes
    (`_HANDLER_INTERNALS`) and Server's `_kwargs`; the constructor checks that
    they exist, so a changed aiohttp fails at start-up, not silently.

    Give the listening site a `backlog` near `max_connections` (TCPSite's
    default is 128): a burst of connects beyond the backlog is not refused
    with a 503 but waits for the kernel to retry the SYN, about a second.
    """

    def __init__(self, app: web.Application, *, limits: ConnectionLimits, **kwargs: Any):
        _check_aiohttp_internals()
        kwargs["keepalive_timeout"] = limits.idle_timeout
        kwargs["auto_decompress"] = False
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_server(self) -> Server:
        plain = await super()._make_server()
        return GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            limits=self.limits,
            **plain._kwargs,  # noqa: SLF001
        )

    @property
    def active_connections(self) -> int:
        server = self.server
        return server.active_connections if isinstance(server, GuardedServer) else 0


# ---------------------------------------------------------------- request bodies

_ACCEPTED_ENCODINGS = "identity, gzip, x-gzip, deflate"
_MAX_CODINGS = 3
_GZIP_MAGIC = b"\x1f\x8b"


def _zlib_header(head: bytes) -> bool:
    """Whether a deflate body starts with a zlib (RFC 1950) header rather than raw
    deflate (RFC 1951); clients send both as "deflate"."""
    cmf, flg = head[0], head[1]
    return cmf & 0x0F == 8 and cmf >> 4 <= 7 and (cmf * 256 + flg) % 31 == 0


class _Inflater:
    """Incremental gzip/deflate decoding with a cap on the decoded size.

    Every `decompress` call asks for at most one byte more than the room left,
    so the output never exceeds the cap by more than one byte, whatever the
    compression ratio.  gzip may hold several members (RFC 1952); anything
    else after the end of the stream is an error.
    """

    def __init__(self, coding: str, limit: int):
        self.coding = coding
        self.gzip = coding in ("gzip", "x-gzip")
        self.left = limit
        self.limit = limit
        self._d: Any = None  # zlib decompress object of the current member
        self._head = b""  # bytes of a member whose format is not known yet
        self._members = 0

    def _invalid(self, why: str) -> BadRequest:
        return BadRequest(f"request body is not valid {self.coding} data (Content-Encoding: {self.coding}): {why}")

    def _take(self, out: bytes) -> bytes:
        if len(out) > self.left:
            raise PayloadTooLarge(
                f"decompressed request body is larger than {self.limit} bytes (max_body_size)"
            )
        self.left -= len(out)
        return out

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        while data:
            if self._d is None:
                head = self._head + data
                if self.gzip:
                    if len(head) < 2 and _GZIP_MAGIC.startswith(head):
                        self._head = head
                        break
                    if not head.startswith(_GZIP_MAGIC):
                        raise self._invalid("data after the end of the stream" if self._members else "missing gzip header")
                    self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                else:
                    if self._members:
                        raise self._invalid("data after the end of the stream")
                    if len(head) < 2:
                        self._head = head
                        break
                    self._d = zlib.decompressobj(zlib.MAX_WBITS if _zlib_header(head) else -zlib.MAX_WBITS)
                self._head = b""
                data = head
            try:
                chunk = self._d.decompress(data, self.left + 1)
            except zlib.error as e:
                raise self._invalid(str(e)) from None
            out.append(self._take(chunk))
            if self._d.eof:
                data = self._d.unused_data
                self._d = None
                self._members += 1
            else:
                data = b""  # output stayed under max_length, so all input was consumed
        return b"".join(out)

    def finish(self) -> bytes:
        if self._d is None:
            if self._head or not self._members:
                raise self._invalid("the stream is truncated")
            return b""
        try:
            tail = self._d.flush()
        except zlib.error as e:
            raise self._invalid(str(e)) from None
        out = self._take(tail)
        if not self._d.eof:
            raise self._invalid("the stream is truncated")
        return out


def _content_codings(request: web.BaseRequest) -> list[str]:
    """The Content-Encoding codings in the order applied; 415 for ones we do not read."""
    if "Content-Encoding" not in request.headers:  # the usual case
        return []
    values = request.headers.getall("Content-Encoding", [])
    codings = [c.strip().lower() for v in values for c in v.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    unknown = [c for c in codings if c not in ("gzip", "x-gzip", "deflate")]
    if unknown or len(codings) > _MAX_CODINGS:
        shown = ", ".join(values)
        what = f"Content-Encoding {shown!r} is not supported" if unknown else f"Content-Encoding {shown!r} stacks more than {_MAX_CODINGS} codings"
        raise UnsupportedMediaType(f"{what}: send the body as one of {_ACCEPTED_ENCODINGS}")
    return codings


def _close_connection(request: web.BaseRequest) -> None:
    """After a timeout: close the connection once the 408 is written."""
    protocol = request.protocol
    if isinstance(protocol, GuardedRequestHandler):
        protocol.close_after_response()
    elif protocol is not None:
        protocol.close()


async def read_body(request: web.BaseRequest, *, max_size: int, body_timeout: float, body_deadline: float) -> bytes:
    """The request body, decoded from its Content-Encoding, within the limits.

    RequestTimeout (408) when the client pauses longer than `body_timeout` or
    the body is not complete after `body_deadline` (the connection is closed
    after the answer); PayloadTooLarge (413) above `max_size` bytes, sent or
    decoded; UnsupportedMediaType (415) for an encoding other than identity,
    gzip, x-gzip or deflate; BadRequest (400) for a body that is not valid in
    its encoding or a transfer that breaks off.  Raises nothing else but
    CancelledError.

    Under a plain AppRunner (aiohttp decompressing by itself) the body is taken
    as aiohttp decoded it; only the limits apply.
    """
    try:
        length = request.content_length
    except ValueError:  # aiohttp's parser has vetted it; kept so nothing but our errors escapes
        raise BadRequest("invalid Content-Length header") from None
    if length is not None and length > max_size:
        raise PayloadTooLarge(f"request body of {length} bytes is larger than {max_size} bytes (max_body_size)")
    decoders: list[_Inflater] = []
    if isinstance(request.protocol, GuardedRequestHandler):
        decoders = [_Inflater(c, max_size) for c in reversed(_content_codings(request))]

    loop = asyncio.get_running_loop()
    deadline = loop.time() + body_deadline
    content = request.content
    parts: list[bytes] = []
    raw_seen = 0
    while True:
        try:
            if content.is_eof():
                # All of it has arrived (a small body comes with the head):
                # nothing to wait for, so no timer.
                chunk = content.read_nowait()
            else:
                left = deadline - loop.time()
                wait = min(body_timeout, left)
                if wait <= 0:
                    raise TimeoutError
                async with asyncio.timeout(wait):
                    chunk = await content.readany()
        except TimeoutError:
            _close_connection(request)
            if wait < body_timeout:
                raise RequestTimeout(f"request body not complete within {body_deadline:g} s (body_deadline)") from None
            raise RequestTimeout(f"no request body data received for {body_timeout:g} s (body_timeout)") from None
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the payload stream failed: disconnect, broken chunked encoding
            raise BadRequest(f"could not read the request body: {str(e) or type(e).__name__}") from None
        if not chunk:
            break
        raw_seen += len(chunk)
        if raw_seen > max_size:
            raise PayloadTooLarge(f"request body is larger than {max_size} bytes (max_body_size)")
        try:
            for decoder in decoders:
                chunk = decoder.feed(chunk)
        except HoshikageError:
            raise
        except Exception as e:  # zlib limits or states not foreseen above
            raise BadRequest(f"could not decode the request body: {e}") from None
        parts.append(chunk)
    if decoders and raw_seen:
        tail = b""
        try:
            for decoder in decoders:
                tail = decoder.feed(tail) if tail else tail
                tail += decoder.finish()
        except HoshikageError:
            raise
        except Exception as e:
            raise BadRequest(f"could not decode the request body: {e}") from None
        parts.append(tail)
    return b"".join(parts)


# ---------------------------------------------------------------- JSON bodies

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # "\ud800".."\udfff" escapes in the raw text
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


class _Constant(Exception):
    pass


def _reject_constant(name: str) -> Any:
    raise _Constant(name)


# Made once: json.loads with an argument builds a decoder for every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _too_deep(max_depth: int) -> BadRequest:
    return BadRequest(f"JSON in request body is nested too deeply (more than {max_depth} levels of objects and arrays)")


def parse_json_object(raw: bytes, *, max_depth: int = 100) -> dict[str, Any]:
    """A request body as a JSON object, parsed strictly; BadRequest (400) otherwise.

    Rejects, beyond invalid JSON: an empty body, invalid UTF-8, a top level that
    is not an object, NaN/Infinity/-Infinity, strings or keys holding lone
    surrogates ("\\ud800"), numbers that overflow a float (1e400), and nesting
    deeper than `max_depth` objects/arrays (the top-level object is level 1).
    Big integers stay ints.  A RecursionError of the C decoder (nesting of about
    a thousand levels) is a 400 as well; everything else is checked after
    decoding by `_check_tree`, which does not recurse.
    """
    if not raw or not raw.strip():
        raise BadRequest("request body is empty: expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        if text.startswith("\ufeff"):  # as json.loads says it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        body = _DECODER.decode(text)
    except _Constant as e:
        raise BadRequest(f"invalid JSON in request body: {e} is not a valid JSON number") from None
    except RecursionError:
        raise _too_deep(max_depth) from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"invalid JSON in request body: {e}") from None
    except ValueError as e:  # e.g. an integer longer than int_max_str_digits
        raise BadRequest(f"number out of range in request body: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"expected a JSON object as request body, got {_JSON_TYPES.get(type(body), type(body).__name__)}")
    _check_tree(body, max_depth, check_strings=_SURROGATE_ESCAPE.search(raw) is not None)
    return body


def _check_tree(body: dict[str, Any], max_depth: int, *, check_strings: bool) -> None:
    """Depth, float overflow and (when the raw text has surrogate escapes) lone
    surrogates, in one breadth-first walk without recursion.

    The walk goes level by level and does the per-value work in C (chain,
    set(map(type, ...)), `in`), so the Python-level cost is per container, and
    a level of scalars (a long array of numbers, the strings of many messages)
    costs one C pass.
    """
    level: list[Any] = [body]
    depth = 1
    while True:
        dicts = [c for c in level if type(c) is dict]
        lists = [c for c in level if type(c) is list] if len(dicts) != len(level) else []
        if check_strings and dicts and _SURROGATE.search("".join(chain.from_iterable(dicts))):
            raise BadRequest("invalid string in request body: a key holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
        values = list(chain(chain.from_iterable(map(dict.values, dicts)), chain.from_iterable(lists)))
        types = set(map(type, values))
        if float in types and (math.inf in values or -math.inf in values):
            raise BadRequest("number out of range in request body: too large for a 64-bit float")
        if check_strings and str in types and _SURROGATE.search("".join([v for v in values if type(v) is str])):
            raise BadRequest("invalid string in request body: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
        if dict not in types and list not in types:
            return
        depth += 1
        if depth > max_depth:
            raise _too_deep(max_depth)
        level = [v for v in values if type(v) is dict or type(v) is list]
