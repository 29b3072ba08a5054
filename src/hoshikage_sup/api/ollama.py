"""Ollama-compatible endpoints (the probes clients send before anything else)."""

from __future__ import annotations

from aiohttp import web

from .. import __version__


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", root)  # aiohttp answers HEAD for GET routes
    app.router.add_get("/api/version", version)
