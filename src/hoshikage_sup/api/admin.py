"""The admin API under `/admin/`: what the daemon is doing, and a hand on it.

Ops (and the `hoshikage` command line, see `client.py`) need to see every
configured model whether loaded or not, load and unload one by hand, read
what a runner printed before it crashed, and follow lifecycle events as they
happen.  The model APIs cannot say any of that, and should not: these
routes are guarded by `[server] admin_keys` (falling back to `api_keys`,
see `auth.py`), and errors come in OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`) like every non-Ollama path.

- `GET /admin/status`: version, uptime, address, counts, scheduler counters,
  the daemon's clock, and each memory device (RAM, GPUs) with its total and
  free bytes beside what the runners are estimated and measured to use.
- `GET /admin/models`: every configured model with its state and replicas
  (a loaded one's memory also per device: `memory.devices`).
- `POST /admin/models/{name}/load` (optional body `{"keep_alive": ...}`),
  `POST /admin/models/{name}/unload`, `POST /admin/unload` (every model).
- `GET /admin/models/{name}/logs?lines=N&after=SEQ&follow=1`: runner output.
- `GET /admin/events?after=SEQ&model=NAME&limit=N&follow=1`: lifecycle events.

With `follow=1` the answer is an NDJSON stream (one JSON object a line): the
backlog first, then each new line or event as it comes, until the client
leaves or the daemon shuts down.

Everything about loaded models comes from `Scheduler.status()` (frozen
`status.ModelStatus` values), turned into this API's shape by `loaded_view`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections import Counter
from typing import Any, AsyncIterator, Mapping

from aiohttp import web

from .. import __version__
from ..config import ModelConfig
from ..durations import FOREVER, format_duration
from ..errors import BadRequest, HoshikageError, ModelNotFound
from ..httpguard import parse_json_object, read_body
from ..runnerlogs import runner_logs_of
from ..scheduler import Scheduler
from ..status import ModelStatus
from .common import ctx, keep_alive_of

NDJSON_HEADERS = {"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Runner output lines answered when `lines` is not given.
DEFAULT_LOG_LINES = 100
# Set when the application shuts down: follow streams end instead of holding the shutdown up.
CLOSING: web.AppKey[asyncio.Event] = web.AppKey("hoshikage_admin_closing", asyncio.Event)


class NotRecorded(HoshikageError):
    """The scheduler keeps no event log to read."""

    status = 501
    kind = "server_error"
    code = "not_supported"


# ------------------------------------------------------------------ JSON


def _plain(value: Any) -> Any:
    """`value` as strict JSON allows: no NaN or Infinity (a forever session is null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(_plain(value), separators=(",", ":"), ensure_ascii=False, default=str)


def _json(value: Any, status: int = 200) -> web.Response:
    return web.json_response(value, status=status, dumps=_dumps)


# ------------------------------------------------------------------ models


def _seconds(value: float | None) -> float | None:
    return None if value is None or value == FOREVER else round(value, 3)


def _bytes(gpu: Mapping[Any, int] | None) -> dict[str, int]:
    return {str(k): int(v) for k, v in sorted((gpu or {}).items())}


def _device_memory(m: ModelStatus) -> list[dict[str, Any]]:
    """A loaded model's memory per device ("cpu", "gpu0", ...): its estimate
    and what was measured (null until every replica is measured, and on a GPU
    whose driver does not report per-process memory)."""
    replicas = m.replicas
    measured_cpu = [r.measured_cpu_bytes for r in replicas]
    out = [{
        "device": "cpu",
        "gpu": None,
        "estimate_bytes": sum(int(r.estimate_cpu_bytes) for r in replicas),
        "measured_bytes": sum(measured_cpu) if measured_cpu and None not in measured_cpu else None,  # type: ignore[arg-type]
    }]
    indexes = sorted({i for r in replicas for i in (*r.estimate_gpu_bytes, *(r.measured_gpu_bytes or {}))})
    for i in indexes:
        measured = [None if not r.measured_gpu_bytes else int(r.measured_gpu_bytes.get(i, 0)) for r in replicas]
        out.append({
            "device": f"gpu{i}",
            "gpu": i,
            "estimate_bytes": sum(int(r.estimate_gpu_bytes.get(i, 0)) for r in replicas),
            "measured_bytes": sum(measured) if None not in measured else None,  # type: ignore[arg-type]
        })
    return out


def loaded_view(m: ModelStatus, now: float) -> dict[str, Any]:
    """A loaded model's status in the admin shape."""
    replicas = [{
        "index": r.index,
        "state": r.state,
        "pid": r.pid,
        "generation": r.generation,
        "retiring": r.retiring,
        "in_flight": r.inflight,
        "served": r.served,
        "load_duration": _seconds(r.load_duration),
        "n_gpu_layers": r.n_gpu_layers,
        "memory": {
            "estimate_bytes": int(r.estimate_bytes),
            "estimate_cpu_bytes": int(r.estimate_cpu_bytes),
            "estimate_gpu_bytes": _bytes(r.estimate_gpu_bytes),
            "measured_bytes": r.measured_bytes,
            "measured_cpu_bytes": r.measured_cpu_bytes,
            "measured_gpu_bytes": _bytes(r.measured_gpu_bytes) if r.measured_gpu_bytes else None,
        },
    } for r in m.replicas]
    return {
        "name": m.name,
        "model": m.model,
        "state": m.state,
        "draining": m.draining,
        "session": m.session,
        "expires_at": m.expires_at,
        "expires_in": round(max(0.0, m.expires_at - now), 3) if m.expires_at is not None else None,
        "in_flight": m.refcount,
        "queued": m.queued,
        "options": m.options.describe(),
        "memory": {
            # what the model holds now: measured where known, else the estimate
            "size_bytes": int(m.cpu_bytes + m.gpu_bytes),
            "gpu_bytes": int(m.gpu_bytes),
            "estimate_bytes": m.estimate_bytes,
            "measured_bytes": m.measured_bytes,
            "devices": _device_memory(m),
        },
        "replicas": replicas,
    }


def devices_view(c: Any, models: tuple[ModelStatus, ...]) -> list[dict[str, Any]]:
    """Each memory device ("cpu", then "gpu0", ...): its total and free bytes
    as the device source reads them now, and what the loaded models' runners
    are estimated to use on it and were measured to use."""
    source = c.extra.get("devices")
    memory = c.config.memory
    per_model = [d for m in models for d in _device_memory(m)]

    def used(device: str) -> tuple[int, int | None]:
        rows = [d for d in per_model if d["device"] == device]
        measured = [d["measured_bytes"] for d in rows if d["measured_bytes"] is not None]
        return sum(d["estimate_bytes"] for d in rows), (sum(measured) if measured else None)

    system = None
    gpus = []
    if source is not None:
        with contextlib.suppress(Exception):
            system = source.system()
        with contextlib.suppress(Exception):
            gpus = list(source.gpus())
    spare = 0
    planner = c.extra.get("planner")
    if planner is not None:
        with contextlib.suppress(Exception):
            spare = int(planner.spare_bytes())
    estimate, measured = used("cpu")
    out = [{
        "id": "cpu",
        "kind": "cpu",
        "gpu": None,
        "name": "System RAM",
        "total_bytes": int(system.total) if system else None,
        "free_bytes": int(system.available) if system else None,
        "reserve_bytes": int(memory.system_reserve),
        "limit_bytes": int(memory.limit) or None,  # [memory] limit on the runners; null: none
        "estimate_bytes": estimate,
        "measured_bytes": measured,
        "spare_bytes": spare,  # the warm spare runners, measured
    }]
    for g in gpus:
        estimate, measured = used(f"gpu{g.index}")
        out.append({
            "id": f"gpu{g.index}",
            "kind": "gpu",
            "gpu": g.index,
            "name": g.name,
            "total_bytes": int(g.total),
            "free_bytes": int(g.free),
            "reserve_bytes": int(memory.gpu_overhead),
            "limit_bytes": None,
            "estimate_bytes": estimate,
            "measured_bytes": measured,
            "spare_bytes": 0,
        })
    return out


def _loaded(scheduler: Scheduler) -> dict[str, dict[str, Any]]:
    now = time.time()
    return {m.name: loaded_view(m, now) for m in scheduler.status().models}


def _queued(scheduler: Scheduler) -> Counter[str]:
    return Counter(scheduler.status(measure=False).waiting)


def model_view(model: ModelConfig, loaded: dict[str, Any] | None, scheduler: Scheduler,
               queued: Counter[str], *, configured: bool = True) -> dict[str, Any]:
    """A model as `/admin/models` shows it, loaded or not."""
    session = loaded["session"] if loaded else scheduler.default_session(model)
    return {
        "name": model.name,
        "aliases": list(model.aliases),
        "configured": configured,
        "path": str(model.path),
        "state": loaded["state"] if loaded else "unloaded",
        "loaded": loaded is not None,
        "draining": loaded["draining"] if loaded else None,
        "pinned": model.pinned,
        "preload": model.preload,
        "parallel": model.parallel,
        "embedding": model.embedding,
        "keep_alive": format_duration(session),
        "keep_alive_seconds": _seconds(session),  # null: forever
        "expires_at": loaded["expires_at"] if loaded else None,
        "expires_in": loaded["expires_in"] if loaded else None,
        "in_flight": loaded["in_flight"] if loaded else 0,
        "queued": queued.get(model.name, 0),
        "options": loaded["options"] if loaded else None,
        "memory": loaded["memory"] if loaded else None,
        "replicas": loaded["replicas"] if loaded else [],
    }


def _models(request: web.Request) -> list[dict[str, Any]]:
    c = ctx(request)
    loaded = _loaded(c.scheduler)
    queued = _queued(c.scheduler)
    out = [model_view(m, loaded.pop(name, None), c.scheduler, queued) for name, m in c.config.models.items()]
    # Models a config reload removed that still have runners (draining).
    for name, view in sorted(loaded.items()):
        out.append(model_view(view["model"], view, c.scheduler, queued, configured=False))
    return out


def _one(request: web.Request, model: ModelConfig) -> dict[str, Any]:
    c = ctx(request)
    loaded = _loaded(c.scheduler).get(model.name)
    return model_view(model, loaded, c.scheduler, _queued(c.scheduler), configured=model.name in c.config.models)


# ------------------------------------------------------------------ query and body


def _int_query(request: web.Request, name: str, default: int | None, *, maximum: int | None = None) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0 or (maximum is not None and value > maximum):
        upper = f" and {maximum}" if maximum is not None else ""
        raise BadRequest(f"invalid {name}: expected an integer between 0{upper}, got {raw[:40]!r}", param=name)
    return value


def _flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise BadRequest(f"invalid {name}: expected 1 or 0, got {raw[:40]!r}", param=name)


async def _optional_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, or {} when it has no body."""
    if not request.body_exists:
        return {}
    server = ctx(request).config.server
    raw = await read_body(
        request, max_size=server.max_body_size, body_timeout=server.body_timeout, body_deadline=server.body_deadline
    )
    return parse_json_object(raw) if raw.strip() else {}


def _resolve(request: web.Request) -> ModelConfig:
    return ctx(request).gateway.resolve(request.match_info["name"])


# ------------------------------------------------------------------ streams


async def _until_closing(source: AsyncIterator[Any], closing: asyncio.Event) -> AsyncIterator[Any]:
    """The items of `source` until it ends or `closing` is set; `source` is closed either way."""
    closed = asyncio.ensure_future(closing.wait())
    step: asyncio.Future[Any] | None = None
    try:
        while True:
            step = asyncio.ensure_future(source.__anext__())
            await asyncio.wait({step, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                return
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            step = None
            yield item
    finally:
        closed.cancel()
        if step is not None and not step.done():
            step.cancel()
            await asyncio.wait({step})
        with contextlib.suppress(RuntimeError):
            await source.aclose()  # type: ignore[attr-defined]


async def _ndjson(request: web.Request, backlog: list[dict[str, Any]], live: AsyncIterator[dict[str, Any]]) -> web.StreamResponse:
    """Answer with `backlog`, then each item of `live`, one JSON object a line."""
    response = web.StreamResponse(headers=NDJSON_HEADERS)
    await response.prepare(request)
    try:
        if backlog:
            await response.write("".join(_dumps(obj) + "\n" for obj in backlog).encode())
        async with contextlib.aclosing(_until_closing(live, request.app[CLOSING])) as stream:
            async for obj in stream:
                await response.write((_dumps(obj) + "\n").encode())
        await response.write_eof()
    except ConnectionResetError:  # the client left
        pass
    return response


# ------------------------------------------------------------------ handlers


async def status(request: web.Request) -> web.Response:
    c = ctx(request)
    now = time.time()
    models = c.scheduler.status().models
    loaded = {m.name: loaded_view(m, now) for m in models}
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    port = sockname[1] if isinstance(sockname, tuple) and len(sockname) >= 2 else c.config.server.port
    return _json({
        "version": __version__,
        "pid": os.getpid(),
        "started_at": c.started,
        "uptime_seconds": round(now - c.started, 3) if c.started else None,
        "host": c.config.server.host,
        "port": port,
        "config": str(c.config.source) if c.config.source else None,
        "models_configured": len(c.config.models),
        "models_loaded": len(loaded),
        "max_loaded_models": c.scheduler.max_loaded,
        "requests_in_flight": sum(v["in_flight"] for v in loaded.values()),
        "requests_queued": c.scheduler.queue_depth(),
        "max_queue": c.config.server.max_queue,
        "counters": dict(c.scheduler.counters),
        "time": round(now, 3),  # the daemon's clock, for countdowns to expires_at
        "devices": devices_view(c, models),
    })


async def models(request: web.Request) -> web.Response:
    return _json({"models": _models(request)})


async def load(request: web.Request) -> web.Response:
    c = ctx(request)
    model = _resolve(request)
    body = await _optional_body(request)
    keep_alive = keep_alive_of(body)
    if body:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(body))} (only keep_alive is read)", param=sorted(body)[0])
    t0 = time.monotonic()
    lease = await c.gateway.load(model.name, keep_alive)
    return _json({
        "model": _one(request, model),
        "load_duration": round(lease.load_duration, 3),  # spent loading for this request (0: it was loaded)
        "total_duration": round(time.monotonic() - t0, 3),
    })


async def restart(request: web.Request) -> web.Response:
    """Replace a loaded model's runners without downtime; answers once a runner
    of the new generation serves (the old ones finish their requests and stop)."""
    c = ctx(request)
    model = _resolve(request)
    scheduler = c.scheduler
    t0 = time.monotonic()
    if not scheduler.restart(model.name):
        raise BadRequest(f"model '{model.name}' is not loaded: load it instead", param="model")
    generation = scheduler.model_status(model.name).generation  # type: ignore[union-attr]

    def settled() -> bool:  # a runner of the new generation serves (or the model went)
        now = scheduler.model_status(model.name)
        return now is None or now.generation != generation or any(
            r.generation == generation and r.state == "ready" for r in now.replicas)

    await scheduler.wait_until(settled, c.config.server.load_timeout)
    return _json({"model": _one(request, model), "restart_duration": round(time.monotonic() - t0, 3)})


async def reload(request: web.Request) -> web.Response:
    """Read the config file again and apply it (as SIGHUP does): unchanged
    models keep their runners, changed ones restart without downtime, removed
    ones drain, new ones can be requested.  An invalid file changes nothing:
    400 with each problem, as `hoshikage check` prints them."""
    reload_config = ctx(request).extra.get("reload")
    if reload_config is None:
        raise HoshikageError("this daemon cannot reload its config (it was not started from a file)")
    result = reload_config()
    if not result.get("ok"):
        problems = result.get("problems") or ["the config could not be read"]
        raise BadRequest("config rejected, the running one stays: " + "; ".join(problems), param="config")
    return _json(result)


async def unload(request: web.Request) -> web.Response:
    c = ctx(request)
    model = c.gateway.unload(request.match_info["name"])
    await c.scheduler.wait_unloaded([model.name], c.config.server.stop_timeout + 1.0)
    return _json({"model": _one(request, model)})


async def unload_all(request: web.Request) -> web.Response:
    c = ctx(request)
    names = [m.name for m in c.scheduler.status(measure=False).models]
    for name in names:
        c.scheduler.unload(name)
    await c.scheduler.wait_unloaded(names, c.config.server.stop_timeout + 1.0)
    loaded = _loaded(c.scheduler)
    queued = _queued(c.scheduler)
    out = []
    for name in names:
        model = c.config.models.get(name) or (loaded[name]["model"] if name in loaded else None)
        if model is not None:
            out.append(model_view(model, loaded.get(name), c.scheduler, queued, configured=name in c.config.models))
    return _json({"models": out})


async def logs(request: web.Request) -> web.StreamResponse:
    c = ctx(request)
    name = request.match_info["name"]
    registry = runner_logs_of(c.scheduler)
    model = c.config.resolve(name)
    if model is not None:
        name = model.name
        runner_log = registry.for_model(name)
    else:  # a model a config reload removed keeps its log
        found = registry.get(name)
        if found is None:
            raise ModelNotFound(name)
        runner_log = found
    after = _int_query(request, "after", 0) or 0
    default_lines = None if "after" in request.query else DEFAULT_LOG_LINES
    lines = _int_query(request, "lines", default_lines)
    backlog = runner_log.recent(after=after, limit=lines)
    shown = [{"model": name, **line.to_json()} for line in backlog]
    if not _flag(request, "follow"):
        return _json({"model": name, "lines": shown, "last_seq": runner_log.last_seq})
    start = backlog[-1].seq if backlog else max(after, runner_log.last_seq)

    async def live() -> AsyncIterator[dict[str, Any]]:
        async for line in runner_log.follow(after=start):
            yield {"model": name, **line.to_json()}

    return await _ndjson(request, shown, live())


async def events(request: web.Request) -> web.StreamResponse:
    c = ctx(request)
    log = getattr(c.scheduler, "events", None)
    if log is None:
        raise NotRecorded("this supervisor does not record lifecycle events")
    after = _int_query(request, "after", 0) or 0
    limit = _int_query(request, "limit", None)
    model: str | None = request.query.get("model") or None
    if model is not None:
        found = c.config.resolve(model)
        if found is not None:
            model = found.name
        elif not log.recent(model=model, limit=1):  # a removed model's past events are still shown
            raise ModelNotFound(model)
    backlog = [] if limit == 0 else log.recent(after=after, model=model, limit=limit)
    last = log.recent(limit=1)
    last_seq = last[-1].seq if last else 0
    if not _flag(request, "follow"):
        return _json({"events": [e.to_json() for e in backlog], "last_seq": last_seq})
    start = backlog[-1].seq if backlog else max(after, last_seq)

    async def live() -> AsyncIterator[dict[str, Any]]:
        async for event in log.follow(after=start, model=model):
            yield event.to_json()

    return await _ndjson(request, [e.to_json() for e in backlog], live())


async def _closing(app: web.Application) -> None:
    app[CLOSING].set()


def add_routes(app: web.Application) -> None:
    app[CLOSING] = asyncio.Event()
    app.on_shutdown.append(_closing)
    app.router.add_get("/admin/status", status)
    app.router.add_get("/admin/models", models)
    app.router.add_post("/admin/models/{name:.+}/load", load)
    app.router.add_post("/admin/models/{name:.+}/unload", unload)
    app.router.add_post("/admin/models/{name:.+}/restart", restart)
    app.router.add_get("/admin/models/{name:.+}/logs", logs)
    app.router.add_post("/admin/unload", unload_all)
    app.router.add_post("/admin/reload", reload)
    app.router.add_get("/admin/events", events)
