"""The status page for ops at `GET /ui`: the daemon serves it itself.

A page of HTML, CSS and plain JavaScript shipped in the package
(`hoshikage_sup/ui/`), with no build step and nothing fetched from
anywhere else.  It reads the admin API (`/admin/status` and `/admin/models`
about once a second, `/admin/events?follow=1` as a stream, a runner's
`logs` on demand) and offers load, unload and restart.

The page and its assets are open, like `/health` (see `auth.OPEN_PATHS`):
they are the same for everyone and hold no data.  Every admin call the page
makes needs the admin key when keys are configured; the page asks for it,
keeps it in the tab's `sessionStorage` and sends it as
`Authorization: Bearer KEY`.

Responses carry an ETag and `Cache-Control: no-cache` (a browser asks again
and gets a 304 while the files are unchanged, and a new version of the page
the moment the daemon is upgraded), and a Content-Security-Policy that
allows only this origin's scripts, styles, images and connections, no inline
script and no framing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

# Same origin only, nothing inline (styles set from script through the CSSOM
# are allowed), no plugins, no framing, no form posts anywhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

# URL path -> (file in hoshikage_sup/ui/, content type)
FILES = {
    "/ui": ("index.html", "text/html; charset=utf-8"),
    "/ui/": ("index.html", "text/html; charset=utf-8"),
    "/ui/ui.js": ("ui.js", "text/javascript; charset=utf-8"),
    "/ui/ui.css": ("ui.css", "text/css; charset=utf-8"),
    "/ui/icon.svg": ("icon.svg", "image/svg+xml"),
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def _read(name: str) -> bytes:
    return resources.files("hoshikage_sup").joinpath("ui", name).read_bytes()


def load_assets() -> dict[str, Asset]:
    """Every file the page needs, read once (they ship with the package)."""
    out = {}
    for path, (name, content_type) in FILES.items():
        body = _read(name)
        out[path] = Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return out


ASSETS: web.AppKey[dict[str, Asset]] = web.AppKey("hoshikage_ui_assets", dict)


async def serve(request: web.Request) -> web.Response:
    asset = request.app[ASSETS][request.path]
    headers = {**HEADERS, "ETag": asset.etag}
    wanted = request.headers.get("If-None-Match", "")
    if asset.etag in (tag.strip() for tag in wanted.split(",")) or wanted.strip() == "*":
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = asset.content_type
    return web.Response(body=asset.body, headers=headers)


def add_routes(app: web.Application) -> None:
    app[ASSETS] = load_assets()
    for path in FILES:
        app.router.add_get(path, serve)  # aiohttp answers HEAD for GET routes
