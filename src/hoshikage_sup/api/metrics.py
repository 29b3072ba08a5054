"""`GET /metrics`: the scheduler's state in Prometheus' text format.

Counters come from the scheduler's status (`Scheduler.status()`) and, by
kind and reason, from its event log (`events.EventLog.counts`); gauges are
read from the same status at scrape time, so a scrape costs one pass over
the loaded models.
"""

from __future__ import annotations

from aiohttp import web

from .. import __version__
from .common import ctx

COUNTERS = {
    "requests": "Requests that asked the scheduler for a runner.",
    "loads": "Runner processes that became ready.",
    "load_failures": "Runner processes that failed to load.",
    "evictions": "Models chosen to make room for another.",
    "expirations": "Models unloaded after their keep_alive.",
    "reloads": "Models reloaded because a request needed other runner options.",
    "crashes": "Runner processes that exited while serving or idle.",
    "restarts": "Runner processes started again after a crash.",
    "rejected_queue_full": "Requests refused because max_queue requests were waiting.",
    "scheduling_errors": "Requests failed by an error while deciding for them (each failed alone).",
}


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: object) -> None:
        if labels:
            inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{inner}}} {value:g}")
        else:
            self.lines.append(f"{name} {value:g}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


async def metrics(request: web.Request) -> web.Response:
    scheduler = ctx(request).scheduler
    status = scheduler.status()
    w = _Writer()
    w.family("hoshikage_build_info", "gauge", "Version of the supervisor.")
    w.sample("hoshikage_build_info", 1, version=__version__)
    for key, help_text in COUNTERS.items():
        name = f"hoshikage_{key}_total"
        w.family(name, "counter", help_text)
        w.sample(name, status.counters.get(key, 0))
    w.family("hoshikage_queue_depth", "gauge", "Requests waiting for a runner.")
    w.sample("hoshikage_queue_depth", status.queued)
    w.family("hoshikage_max_loaded_models", "gauge", "Models that may be loaded at once.")
    w.sample("hoshikage_max_loaded_models", status.max_loaded)

    w.family("hoshikage_models_loaded", "gauge", "Models with a runner loading, loaded or stopping.")
    w.sample("hoshikage_models_loaded", len(status.models))
    w.family("hoshikage_model_requests_in_flight", "gauge", "Requests a model's runners are serving.")
    for m in status.models:
        w.sample("hoshikage_model_requests_in_flight", m.refcount, model=m.name, state=m.state)
    w.family("hoshikage_model_replicas", "gauge", "Runner processes of a model, by state.")
    for m in status.models:
        states: dict[str, int] = {}
        for r in m.replicas:
            states[r.state] = states.get(r.state, 0) + 1
        for state, n in sorted(states.items()):
            w.sample("hoshikage_model_replicas", n, model=m.name, state=state)
    w.family("hoshikage_model_memory_bytes", "gauge", "A model's memory: the estimate, and what its runners use.")
    for m in status.models:
        for r in m.replicas:
            w.sample("hoshikage_model_memory_bytes", r.estimate_cpu_bytes, model=m.name, replica=r.index, kind="estimate", device="cpu")
            for gpu, b in sorted(r.estimate_gpu_bytes.items()):
                w.sample("hoshikage_model_memory_bytes", b, model=m.name, replica=r.index, kind="estimate", device=f"gpu{gpu}")
            if r.measured_cpu_bytes is not None:
                w.sample("hoshikage_model_memory_bytes", r.measured_cpu_bytes, model=m.name, replica=r.index, kind="measured", device="cpu")
            for gpu, b in sorted((r.measured_gpu_bytes or {}).items()):
                w.sample("hoshikage_model_memory_bytes", b, model=m.name, replica=r.index, kind="measured", device=f"gpu{gpu}")
    tally = ctx(request).gateway.overflow.counts
    w.family("hoshikage_context_overflow_total", "counter",
             "Chats longer than the context that a context_overflow policy fitted, by what it applied.")
    for (model, policy, applied), n in sorted(tally.items()):
        w.sample("hoshikage_context_overflow_total", n, model=model, policy=policy, applied=applied)
    events = scheduler.events
    if events.counts:
        w.family("hoshikage_events_total", "counter", "Lifecycle events, by kind and reason (see /admin/events).")
        for (kind, reason), n in sorted(events.counts.items()):
            w.sample("hoshikage_events_total", n, kind=kind, reason=reason)
    return web.Response(body=w.text().encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)
