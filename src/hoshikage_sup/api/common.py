"""Pieces every API layer shares: the app context, JSON bodies, keep_alive."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..auth import KeyRing
from ..config import Config, ModelConfig
from ..durations import DurationError, parse_keep_alive
from ..errors import BadRequest
from ..gateway import Gateway
from ..gguf import GGUFError, load_model_info
from ..httpguard import parse_json_object, read_body
from ..scheduler import Scheduler


@dataclass
class Context:
    """What the handlers need; stored on the app under CONTEXT."""

    config: Config
    scheduler: Scheduler
    gateway: Gateway
    started: float = 0.0
    keys: KeyRing = field(default_factory=KeyRing)
    extra: dict[str, Any] = field(default_factory=dict)


CONTEXT: web.AppKey[Context] = web.AppKey("hoshikage_context", Context)


class StreamResponse(web.StreamResponse):
    """aiohttp's StreamResponse, with its headers sent together with its
    first bytes (as aiohttp's Response does) instead of in a write of their
    own at `prepare`: a streamed answer's head and first event leave in one
    packet, and `write_eof(data)` sends the last bytes with the end."""

    _send_headers_immediately = False


def ctx(request: web.Request) -> Context:
    return request.app[CONTEXT]


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object, read within the configured size
    and time limits and decoded strictly (see `httpguard`)."""
    return (await read_json_raw(request))[1]


async def read_json_raw(request: web.Request) -> tuple[bytes, dict[str, Any]]:
    """`read_json`, with the body's bytes (decoded from any Content-Encoding)."""
    server = ctx(request).config.server
    raw = await read_body(
        request, max_size=server.max_body_size, body_timeout=server.body_timeout, body_deadline=server.body_deadline
    )
    return raw, parse_json_object(raw)


def vocab_size(model: ModelConfig) -> int | None:
    """The model's vocabulary size from its GGUF header (cached), if readable."""
    try:
        return load_model_info(model.path).vocab_size
    except (OSError, GGUFError, ValueError):
        return None


def keep_alive_of(body: dict[str, Any], field_name: str = "keep_alive") -> float | None:
    """Parse and remove keep_alive; None when absent (the session stays as it is)."""
    if field_name not in body:
        return None
    value = body.pop(field_name)
    if value is None:
        return None
    try:
        return parse_keep_alive(value)
    except DurationError as e:
        raise BadRequest(f"invalid {field_name}: {e}", param=field_name) from None
