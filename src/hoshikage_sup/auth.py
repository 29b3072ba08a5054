"""Client authentication: API keys for the model APIs, admin keys for /admin/.

None configured = open, as Ollama is; an operator who exposes the daemon
on a LAN sets `[server] api_keys` (or `HOSHIKAGE_API_KEYS`, or
`api_keys_file` with one key a line).  A key is sent as
`Authorization: Bearer KEY` (OpenAI clients) or `x-api-key: KEY`.
`/health` and `GET /` ("Ollama is running") stay open for load balancers and
liveness checks, and so does the status page's static files (`/ui`, see
`api/ui.py`): they hold no data, and every admin call the page makes is
checked like any other.  `/admin/` takes the admin keys; with none configured it
takes the API keys.

Keys are compared in constant time against every configured key (no early
exit that would tell an attacker how many leading bytes matched, nor which
key), and are never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from typing import Iterable

from aiohttp import web

from .config import ServerConfig, read_keys_file

OPEN_PATHS = frozenset({"/health", "/", "/ui", "/ui/", "/ui/ui.js", "/ui/ui.css", "/ui/icon.svg"})


def _encode(keys: Iterable[str]) -> tuple[bytes, ...]:
    return tuple(dict.fromkeys(k.encode("utf-8") for k in keys if k))


@dataclass(frozen=True)
class KeyRing:
    api: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @classmethod
    def from_config(cls, server: ServerConfig) -> "KeyRing":
        """The configured keys; `api_keys_file` is read now (again on every reload)."""
        keys = list(server.api_keys)
        if server.api_keys_file is not None:
            keys += read_keys_file(server.api_keys_file)
        return cls(api=_encode(keys), admin=_encode(server.admin_keys))

    @property
    def open(self) -> bool:
        return not self.api and not self.admin

    def keys_for(self, path: str) -> tuple[bytes, ...]:
        """The keys that open `path`; empty when it needs none."""
        if path in OPEN_PATHS:
            return ()
        if path.startswith("/admin/") or path == "/admin":
            return self.admin or self.api
        return self.api

    @staticmethod
    def matches(presented: bytes, keys: tuple[bytes, ...]) -> bool:
        ok = False
        for key in keys:  # every key is compared, whatever matched before
            ok |= hmac.compare_digest(presented, key)
        return ok


def presented_key(request: web.Request) -> bytes | None:
    """The key a client sent: `Authorization: Bearer KEY`, else `x-api-key`."""
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip().encode("utf-8", "surrogateescape")
    key = request.headers.get("x-api-key", "").strip()
    return key.encode("utf-8", "surrogateescape") if key else None


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
