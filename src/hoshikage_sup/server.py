"""`Server`: start-up, main loop and shutdown of the supervisor.

start-up: make the private directory runner sockets live in, pick the
device source, build the planner and the scheduler, bind the listening
socket behind the connection limits, preload the models that ask for it,
tell systemd we are ready.  (Each runner has its own HTTP client, on its
socket with its secret: see process.py.)
main loop: serve until SIGTERM or SIGINT.
shutdown: stop accepting, fail waiting requests, stop every runner (SIGTERM,
then SIGKILL after stop_timeout), remove the runtime directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Callable

from aiohttp import web

from .api.common import Context
from .app import build_app
from .auth import KeyRing, is_loopback
from .config import Config
from .devices import DeviceSource, detect_source
from .gateway import Gateway
from .httpguard import ConnectionLimits, GuardedAppRunner
from .logs import get_logger
from .planner import MemoryPlanner
from .runtime import create_runtime_dir, remove_runtime_dir
from .scheduler import Scheduler, SpawnFn
from .sdnotify import notify

log = get_logger("hoshikage.server")


class Server:
    def __init__(self, config: Config, *, devices: DeviceSource | None = None, spawn: SpawnFn | None = None):
        self.config = config
        self.devices = devices
        self.spawn = spawn
        self.scheduler: Scheduler | None = None
        self.runner: web.AppRunner | None = None
        self.port: int | None = None
        self.runtime_dir: Path | None = None  # runner sockets, see hoshikage_sup.runtime
        self._stop = asyncio.Event()

    async def startup(self) -> None:
        cfg = self.config
        self.runtime_dir = create_runtime_dir(cfg.server.runtime_dir)
        log.info("runner sockets", runtime_dir=str(self.runtime_dir))
        if self.devices is None:
            self.devices = detect_source()
        planner = MemoryPlanner(cfg, self.devices)
        self.scheduler = Scheduler(cfg, planner, spawn=self.spawn, runtime_dir=self.runtime_dir)
        keys = KeyRing.from_config(cfg.server)
        context = Context(
            config=cfg, scheduler=self.scheduler, gateway=Gateway(cfg, self.scheduler),
            started=time.time(), keys=keys,
        )
        context.extra["planner"] = planner
        context.extra["devices"] = self.devices
        app = build_app(context)
        # handler_cancellation: a client that goes away cancels its handler, so
        # it leaves the queue and its upstream request is closed.
        self.runner = GuardedAppRunner(
            app, limits=ConnectionLimits.from_config(cfg.server), handler_cancellation=True, access_log=None
        )
        await self.runner.setup()
        # A backlog as deep as the connection limit: with the default 128 a burst
        # of connections sees drops and a client retry a second later.
        site = web.TCPSite(
            self.runner, cfg.server.host, cfg.server.port, reuse_address=True,
            backlog=max(128, cfg.server.max_connections),
        )
        await site.start()
        sockets = [s for s in (site._server.sockets if site._server else [])]  # noqa: SLF001
        self.port = sockets[0].getsockname()[1] if sockets else cfg.server.port
        log.info(
            "listening", host=cfg.server.host, port=self.port, models=sorted(cfg.models),
            max_loaded_models=self.scheduler.max_loaded, devices=type(self.devices).__name__,
            api_keys=len(keys.api), admin_keys=len(keys.admin),
        )
        if keys.open and not is_loopback(cfg.server.host):
            log.warning(
                "no API keys configured and listening beyond loopback: anyone who can reach "
                f"{cfg.server.host}:{self.port} can use every model (set [server] api_keys or HOSHIKAGE_API_KEYS)"
            )
        for model in cfg.models.values():
            if model.preload:
                task = self.scheduler.preload(model)
                task.add_done_callback(lambda t, name=model.name: _log_preload(t, name))
        notify("READY=1")

    def request_stop(self) -> None:
        self._stop.set()

    async def main_loop(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        await self._stop.wait()

    async def shutdown(self) -> None:
        notify("STOPPING=1")
        log.info("shutting down")
        if self.runner is not None:
            with contextlib.suppress(Exception):
                await self.runner.shutdown()
        if self.scheduler is not None:
            await self.scheduler.close()
        if self.runner is not None:
            with contextlib.suppress(Exception):
                await self.runner.cleanup()
        if self.devices is not None:
            with contextlib.suppress(Exception):
                self.devices.close()
        if self.runtime_dir is not None:
            remove_runtime_dir(self.runtime_dir)  # after the runners: their sockets are in it
        log.info("stopped")

    async def serve(self, ready: Callable[["Server"], None] | None = None) -> None:
        try:
            await self.startup()
            if ready:
                ready(self)
            await self.main_loop()
        finally:
            await self.shutdown()

    def run(self) -> None:
        asyncio.run(self.serve())


def _log_preload(task: asyncio.Task, name: str) -> None:
    if task.cancelled():
        return
    e = task.exception()
    if e is not None:
        log.error("preload failed", model=name, error=str(e))
