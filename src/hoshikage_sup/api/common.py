"""Pieces every API layer shares: the app context, JSON bodies, keep_alive."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..config import Config
from ..durations import DurationError, parse_keep_alive
from ..errors import BadRequest
from ..gateway import Gateway
from ..scheduler import Scheduler


@dataclass
class Context:
    """What the handlers need; stored on the app under CONTEXT."""

    config: Config
    scheduler: Scheduler
    gateway: Gateway
    started: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


CONTEXT: web.AppKey[Context] = web.AppKey("hoshikage_context", Context)


def ctx(request: web.Request) -> Context:
    return request.app[CONTEXT]


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        raise BadRequest("request body is empty: expected a JSON object")
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise BadRequest(f"invalid JSON in request body: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"expected a JSON object as request body, got {type(body).__name__}")
    return body


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
