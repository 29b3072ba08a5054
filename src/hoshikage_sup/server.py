"""`Server`: start-up, main loop, reload and shutdown of the supervisor.

start-up: make the private directory runner sockets live in, pick the
device source, build the planner and the scheduler, bind the listening
socket behind the connection limits, preload the models that ask for it,
tell systemd we are ready.  (Each runner has its own HTTP client, on its
socket with its secret: see process.py.)

main loop: serve until SIGTERM or SIGINT; SIGHUP reloads the config.

reload (`Server.reload`): read the config again from the same file, with
the same environment and command-line flags, and validate it.  A config
with problems changes nothing (each problem is logged).  A valid one applies
what can change while serving: API keys (`api_keys_file` is read again),
everything the API layers and the planner read, the connection limits that
apply per new connection, and, through `Scheduler.apply_config`, the models
and scheduling settings: a model whose runner would start the same way keeps
its runner.  What cannot change without binding again (host, port, the
runtime directory, the keep-alive timeout aiohttp fixed at start) is
reported as needing a restart and stays as it is.

shutdown: a stopping daemon must not turn answers that are being generated
into errors.  On SIGTERM/SIGINT it stops listening, answers requests that
still arrive on open connections with 503 "shutting down" (the connection
is closed after it), runs the application's on_shutdown hooks (responses
that never end by themselves, such as followed event logs, end now), and
lets the requests in flight finish, streams included, for up to
`shutdown_timeout`.  Only then does it stop the runners (`Scheduler.close`:
requests still waiting get 503, a generation still running ends with the
API's error event) and close the remaining connections.  A second signal
ends the wait at once.  aiohttp's own shutdown (`AppRunner.cleanup`) is not
used to drain: it closes idle connections without an answer and, when its
timeout passes, cancels handlers before the runners under them are
stopped, which cuts a stream without its error event; it runs last, with a
short grace, once the requests are done.

systemd (`sdnotify`): READY=1 once listening, STATUS= with the loaded
models and the queue, WATCHDOG=1 from a task on the event loop,
RELOADING=1/READY=1 around a reload, STOPPING=1 when shutdown starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

import structlog
from aiohttp import web

from . import sdnotify
from .api.common import Context
from .app import build_app
from .auth import KeyRing, is_loopback
from .config import Config, ConfigError, load_config
from .devices import DeviceSource, detect_source
from .errors import ShuttingDown
from .gateway import Gateway
from .httpguard import ConnectionLimits, GuardedAppRunner, GuardedRequestHandler, GuardedServer
from .logs import get_logger
from .planner import MemoryPlanner
from .runtime import create_runtime_dir, remove_runtime_dir
from .scheduler import Scheduler, SpawnFn

log = get_logger("hoshikage.server")

# After the runners are stopped, the requests they were serving end with an
# error event; this is how long those handlers get to write it before their
# connections are closed (aiohttp's shutdown timeout).
CLOSE_GRACE = 5.0
# Server settings that are fixed once the daemon listens: a reload that
# changes them says so and keeps the running value.
RESTART_SETTINGS = ("host", "port", "runtime_dir", "idle_timeout")
# Models named in one STATUS= line at most (systemctl shows one line).
STATUS_MODELS = 8


def _drain_middleware(server: "Server") -> Callable[..., Awaitable[web.StreamResponse]]:
    """Counts the requests in flight, and answers 503 "shutting down" to any
    request that arrives once the drain has begun, closing its connection."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if server.draining:
            protocol = request.protocol
            if isinstance(protocol, GuardedRequestHandler):
                protocol.close_after_response()  # "Connection: close", without reading the body
            raise ShuttingDown("the server is shutting down")
        server._request_started()  # noqa: SLF001
        try:
            return await handler(request)
        finally:
            server._request_ended()  # noqa: SLF001

    return middleware


class Server:
    # Seconds between two looks at the loaded models for systemd's STATUS=;
    # it is sent only when it changed.
    status_interval = 2.0

    def __init__(
        self,
        config: Config,
        *,
        devices: DeviceSource | None = None,
        spawn: SpawnFn | None = None,
        path: str | os.PathLike[str] | None = None,
        host: str | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ):
        """`path`, `host`, `port` and `env` are what a reload needs to read the
        config the way it was read at start: the config path as given (not
        resolved, so a symlink switched to a new version is followed; default:
        the file `config` came from), the command-line flags (they win over
        the file and the environment) and the environment (default: this
        process's, as it is now)."""
        self.config = config
        self.devices = devices
        self.spawn = spawn
        self.path: str | os.PathLike[str] | None = path if path is not None else config.source
        self.flags: dict[str, Any] = {"host": host, "port": port}
        self.env: dict[str, str] = dict(os.environ if env is None else env)
        self.scheduler: Scheduler | None = None
        self.planner: MemoryPlanner | None = None
        self.context: Context | None = None
        self.runner: GuardedAppRunner | None = None
        self.port: int | None = None
        self.runtime_dir: Path | None = None  # runner sockets, see hoshikage_sup.runtime
        self.draining = False  # shutdown has begun: new requests get 503
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()  # a second stop signal: do not wait for requests any longer
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._watchdog: asyncio.Task | None = None
        self._status: asyncio.Task | None = None
        self._last_status: str | None = None
        self._signals: list[int] = []
        self._shutdown: asyncio.Task | None = None

    # ------------------------------------------------------------ start-up

    async def startup(self) -> None:
        cfg = self.config
        interval = sdnotify.watchdog_interval()
        if interval is not None:  # first: systemd may already be counting
            self._watchdog = asyncio.ensure_future(sdnotify.watchdog(interval))
        self.runtime_dir = create_runtime_dir(cfg.server.runtime_dir)
        log.info("runner sockets", runtime_dir=str(self.runtime_dir))
        if self.devices is None:
            self.devices = detect_source()
        self.planner = planner = MemoryPlanner(cfg, self.devices)
        self.scheduler = Scheduler(cfg, planner, spawn=self.spawn, runtime_dir=self.runtime_dir)
        keys = KeyRing.from_config(cfg.server)
        self.context = context = Context(
            config=cfg, scheduler=self.scheduler, gateway=Gateway(cfg, self.scheduler),
            started=time.time(), keys=keys,
        )
        context.extra["planner"] = planner
        context.extra["devices"] = self.devices
        context.extra["reload"] = self.reload  # for an admin endpoint: returns what reload() returns
        app = build_app(context)
        # Innermost, so its 503 gets the API's error shape from the app's error middleware.
        app.middlewares.append(_drain_middleware(self))
        # handler_cancellation: a client that goes away cancels its handler, so
        # it leaves the queue and its upstream request is closed.
        # shutdown_timeout: aiohttp's, used only once the drain is over (see shutdown).
        self.runner = GuardedAppRunner(
            app, limits=ConnectionLimits.from_config(cfg.server), handler_cancellation=True, access_log=None,
            shutdown_timeout=CLOSE_GRACE,
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
        self._warn_if_open(keys)
        for model in cfg.models.values():
            if model.preload:
                task = self.scheduler.preload(model)
                task.add_done_callback(lambda t, name=model.name: _log_preload(t, name))
        self.scheduler.pool.start()  # the warm spare (runner_pool), once no preload is loading
        sdnotify.notify("READY=1")
        if sdnotify.enabled():
            self._status = asyncio.ensure_future(self._status_loop())

    def _warn_if_open(self, keys: KeyRing) -> None:
        host = self.config.server.host
        if keys.open and not is_loopback(host):
            log.warning(
                "no API keys configured and listening beyond loopback: anyone who can reach "
                f"{host}:{self.port} can use every model (set [server] api_keys or HOSHIKAGE_API_KEYS)"
            )

    # ------------------------------------------------------------ main loop and signals

    def request_stop(self) -> None:
        self._stop.set()

    def _install_signals(self) -> None:
        if self._signals:
            return
        loop = asyncio.get_running_loop()
        for sig, handler in (
            (signal.SIGTERM, self._on_stop_signal),
            (signal.SIGINT, self._on_stop_signal),
            (signal.SIGHUP, self._on_reload_signal),
        ):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, handler, sig)
                self._signals.append(sig)

    def _remove_signals(self) -> None:
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            for sig in self._signals:
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
        self._signals.clear()

    def _on_stop_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self._stop.is_set():
            if not self._hurry.is_set():
                log.warning("second stop signal: not waiting for requests in flight any longer", signal=name)
            self._hurry.set()
            return
        log.info("stop signal", signal=name)
        self.request_stop()

    def _on_reload_signal(self, sig: int) -> None:
        if self._stop.is_set() or self.draining:
            log.info("reload signal ignored: shutting down", signal=signal.Signals(sig).name)
            return
        self.reload()

    async def main_loop(self) -> None:
        self._install_signals()
        await self._stop.wait()

    async def serve(self, ready: Callable[["Server"], None] | None = None) -> None:
        # Signals first: a SIGTERM or SIGHUP during start-up must not kill the daemon outright.
        self._install_signals()
        try:
            await self.startup()
            if ready:
                ready(self)
            await self.main_loop()
        finally:
            await self.shutdown()

    def run(self) -> None:
        asyncio.run(self.serve())

    # ------------------------------------------------------------ requests in flight

    def _request_started(self) -> None:
        self._inflight += 1
        self._idle.clear()

    def _request_ended(self) -> None:
        self._inflight -= 1
        if self._inflight <= 0:
            self._inflight = 0
            self._idle.set()

    @property
    def requests_in_flight(self) -> int:
        return self._inflight

    async def _wait_requests(self, timeout: float, *, hurry: bool) -> bool:
        """Wait until no request is in flight, at most `timeout` seconds (less
        if `hurry` and a second stop signal comes); True if none is left."""
        if self._inflight == 0:
            return True
        waits = [asyncio.ensure_future(self._idle.wait())]
        if hurry:
            waits.append(asyncio.ensure_future(self._hurry.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return self._inflight == 0

    # ------------------------------------------------------------ reload

    def reload(self) -> dict[str, Any]:
        """Read the config again and apply it; see the module docstring.

        Returns {"ok": bool, "problems": [one line each], "models": the
        scheduler's changes by kind ({} when nothing was applied),
        "restart_needed": ["server.port: 11434 -> 8080", ...]}."""
        sdnotify.reloading()
        try:
            result = self._reload()
        except Exception as e:  # a bug: the daemon keeps serving what it has
            log.exception("reload failed")
            result = _rejected([f"reload failed: {type(e).__name__}: {e}"])
        finally:
            sdnotify.notify("READY=1")
        self._send_status()
        return result

    def _reload(self) -> dict[str, Any]:
        if self.scheduler is None or self.context is None or self.draining:
            problems = ["not serving (starting or shutting down): nothing to reload"]
            log.warning("reload rejected", problems=problems)
            return _rejected(problems)
        if self.path is None:
            problems = ["the running config was not read from a file: nothing to reload from"]
            log.warning("reload rejected", problems=problems)
            return _rejected(problems)
        try:
            new = load_config(self.path, self.env, **self.flags)
        except ConfigError as e:
            return self._reject(e.problems)
        try:
            keys = KeyRing.from_config(new.server)  # reads api_keys_file again
        except (OSError, UnicodeDecodeError) as e:  # changed since load_config checked it
            return self._reject([f"{new.source}: server.api_keys_file: cannot read {str(new.server.api_keys_file)!r}: {e}"])
        old = self.config
        restart_needed = []
        kept = {}
        for key in RESTART_SETTINGS:
            before, after = getattr(old.server, key), getattr(new.server, key)
            if before != after:
                restart_needed.append(f"server.{key}: {before} -> {after}")
                kept[key] = before
        if kept:  # what runs is what the config says, until a restart
            new = replace(new, server=replace(new.server, **kept))
            log.warning("reload: these settings need a restart and keep their running values", settings=restart_needed)

        assert self.planner is not None
        self.planner.config = new
        try:
            models = self.scheduler.apply_config(new)
        except BaseException:
            self.planner.config = old
            raise
        self.config = new
        self.context.config = new
        self.context.gateway.config = new
        self.context.keys = keys
        self._apply_limits(new)
        if new.server.log_level != old.server.log_level:
            level = logging.getLevelName(new.server.log_level.upper())
            structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))
        log.info(
            "reloaded", source=str(new.source or self.path),
            added=models.get("added", []), removed=models.get("removed", []),
            restarted=models.get("restarted", []), updated=models.get("updated", []),
            unchanged=len(models.get("unchanged", [])), api_keys=len(keys.api), admin_keys=len(keys.admin),
            restart_needed=restart_needed,
        )
        self._warn_if_open(keys)
        return {"ok": True, "problems": [], "models": models, "restart_needed": restart_needed}

    def _reject(self, problems: list[str]) -> dict[str, Any]:
        for line in problems:
            log.error("reload: config error", problem=line)
        log.warning("reload rejected: the running config stays", source=str(self.path), problems=len(problems))
        return _rejected(problems)

    def _apply_limits(self, new: Config) -> None:
        """header_timeout and max_connections apply to every connection made
        from now on (GuardedServer hands its `limits` to each new connection;
        open ones keep theirs).  idle_timeout is aiohttp's keepalive_timeout,
        fixed when the server was made: it is among RESTART_SETTINGS and
        `new` still holds the running value."""
        assert self.runner is not None
        limits = ConnectionLimits.from_config(new.server)
        server = self.runner.server
        if isinstance(server, GuardedServer):
            server.limits = limits
        self.runner.limits = limits

    # ------------------------------------------------------------ systemd status

    def status_text(self) -> str:
        """One line for systemd's STATUS=: the loaded models and their states, the queue."""
        s = self.scheduler
        if s is None:
            return "starting"
        if self.draining:
            n = self._inflight
            return f"shutting down: {n} request{'' if n == 1 else 's'} in flight"
        status = s.status(measure=False)
        models = [f"{m.name} ({m.state})" for m in status.models]
        queued = f"{status.queued} queued"
        if not models:
            return f"no model loaded; {queued}"
        shown = models[:STATUS_MODELS]
        if len(models) > STATUS_MODELS:
            shown.append(f"{len(models) - STATUS_MODELS} more")
        return f"serving {len(models)} model{'' if len(models) == 1 else 's'}: {', '.join(shown)}; {queued}"

    def _send_status(self) -> None:
        try:
            text = self.status_text()
        except Exception:  # noqa: BLE001 - a status line is never worth a crash
            log.debug("status line failed", exc_info=True)
            return
        if text != self._last_status:
            self._last_status = text
            sdnotify.status(text)

    async def _status_loop(self) -> None:
        while True:
            self._send_status()
            await asyncio.sleep(self.status_interval)

    # ------------------------------------------------------------ shutdown

    async def shutdown(self) -> None:
        """Drain, stop the runners, close everything (see the module docstring).
        Safe to call more than once: later calls wait for the first."""
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._shutdown_now())
        await self._shutdown

    async def _shutdown_now(self) -> None:
        started = time.monotonic()
        timeout = self.config.server.shutdown_timeout
        sdnotify.notify("STOPPING=1")
        self.draining = True
        if self.scheduler is not None:
            self.scheduler.refuse_new()  # what the HTTP layer does not see either (preloads)
        log.info(
            "shutting down", requests_in_flight=self._inflight,
            queued=self.scheduler.queue_depth() if self.scheduler else 0, shutdown_timeout=timeout,
        )
        self._send_status()
        if self.runner is not None:
            for site in list(self.runner.sites):  # no new connections from now on
                with contextlib.suppress(Exception):
                    await site.stop()
            # The application's on_shutdown hooks: responses that never end by
            # themselves (followed logs and events) end now, not at the timeout.
            with contextlib.suppress(Exception):
                await self.runner.shutdown()
        drained = await self._wait_requests(timeout, hurry=True)
        if not drained:
            log.warning(
                "requests still in flight: stopping the runners under them", requests_in_flight=self._inflight,
                shutdown_timeout=timeout, second_signal=self._hurry.is_set(),
            )
        if self._status is not None:
            self._status.cancel()
        if self.scheduler is not None:
            await self.scheduler.close()
        if self.runner is not None:
            # Requests whose runner was just stopped end with an error; let them write it.
            await self._wait_requests(CLOSE_GRACE, hurry=False)
            with contextlib.suppress(Exception):
                await self.runner.cleanup()
        if self.devices is not None:
            with contextlib.suppress(Exception):
                self.devices.close()
        if self.runtime_dir is not None:
            remove_runtime_dir(self.runtime_dir)  # after the runners: their sockets are in it
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._remove_signals()
        log.info("stopped", drained=drained, seconds=round(time.monotonic() - started, 3))


def _rejected(problems: list[str]) -> dict[str, Any]:
    return {"ok": False, "problems": problems, "models": {}, "restart_needed": []}


def _log_preload(task: asyncio.Task, name: str) -> None:
    if task.cancelled():
        return
    e = task.exception()
    if e is not None:
        log.error("preload failed", model=name, error=str(e))
