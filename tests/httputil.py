"""HTTP helpers shared by the API tests."""

from __future__ import annotations

import json
from typing import Any

import aiohttp


async def post_json(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any, Any]:
    """POST `body` (an object, or raw str/bytes sent as they are) as JSON;
    return (status, the parsed JSON answer or the raw bytes, headers)."""
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    async with http.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        raw = await r.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw
        return r.status, parsed, r.headers
