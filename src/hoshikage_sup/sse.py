"""Server-sent events as runners send them (llama_cpp.server's sse-starlette).

`split` cuts a byte stream into whole events without re-serialising them, so
a proxy can pass each one on as it came and still see which is the last
(`[DONE]`) or an error, and `frame` writes one event of our own.  `runs` does
the same a read at a time: the whole events that one read completed, as one
piece of bytes, looked at one by one only when they may hold the end or an
error.
"""

from __future__ import annotations

import json
import re
from typing import Any, AsyncIterator

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"
# `"error":` can only be a key: inside a JSON string its quotes would be escaped.
_ERROR_KEY = re.compile(rb'"error"\s*:')


async def split(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[bytes, bytes | None]]:
    """(event, data) for each whole event: the event's bytes ending in a
    blank line (CRLF normalised to LF), and its `data:` lines joined, or None
    for an event without data (a comment or a keep-alive ping).  A partial
    event at the end of the stream is dropped: the stream was cut."""
    buf = b""
    async for chunk in chunks:
        # sse-starlette ends lines with CRLF; normalise over the whole buffer
        # so a CR and LF split across two chunks still pair up.
        buf = (buf + chunk).replace(b"\r\n", b"\n")
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
            yield event + b"\n\n", (b"\n".join(lines).strip() if lines else None)


async def runs(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[bytes, list[tuple[bytes, bytes | None]] | None]]:
    """(run, events) for each read that completes events: `run` is those
    whole events' bytes (CRLF normalised to LF, as `split` gives them), and
    `events` is None when none of them can be `[DONE]` or an error (neither
    appears in the bytes), else each event as `split` gives it.  Bytes
    identical to `split`'s events, joined; a partial event at the end of the
    stream is dropped."""
    buf = b""
    async for chunk in chunks:
        buf = (buf + chunk).replace(b"\r\n", b"\n")
        parts = buf.split(b"\n\n")
        if len(parts) == 1:
            continue
        rest = parts[-1]
        run = buf[: len(buf) - len(rest)]
        buf = rest
        if DONE in run or b'"error"' in run:
            yield run, [_event(e) for e in parts[:-1]]
        else:
            yield run, None


def events_of(run: bytes) -> list[tuple[bytes, bytes | None]]:
    """The events of a run (see `runs`), as `split` gives them."""
    return [_event(e) for e in run.split(b"\n\n")[:-1]]


def _event(event: bytes) -> tuple[bytes, bytes | None]:
    lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return event + b"\n\n", (b"\n".join(lines).strip() if lines else None)


def frame(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def is_error(data: bytes) -> dict[str, Any] | None:
    """The event's object when it is an error (`{"error": ...}`), else None.
    Cheap for ordinary chunks: only data with an "error" key is parsed."""
    if not _ERROR_KEY.search(data):
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and "error" in obj else None
