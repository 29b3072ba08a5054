"""The scheduler: the one owner of all runner state.

Everything that decides which runner serves which request, when a runner is
loaded, evicted, reloaded or restarted lives here, in one object driven by one
event loop (Ollama's `server/sched.go` idea, in asyncio form).  State changes
only happen in synchronous methods of this class; after each change
`_schedule()` runs one pass over the pending requests and makes every decision
that the new state allows.  Carrying the decisions out is the runner pool's
job (pool.py: spawn, load, stop, the replica state machine, the watchdog),
which reports back (`loaded`, `load_failed`, `stopped`, `crashed`); the
choices themselves are pure functions in policy.py.  docs/design.md
describes the states and decisions.

Vocabulary:
- a *slot* is one loaded model (by configured name) with its runner options;
  it holds one or more *replicas* (runner processes, `parallel` at most).
- a *lease* is one request's hold on one replica; while any lease is out the
  replica is never stopped (the refcount).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import itertools
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from .config import Config, ModelConfig
from .durations import FOREVER, format_duration
from . import policy
from .events import EventLog
from .errors import (
    HoshikageError,
    InsufficientMemory,
    ModelCoolingDown,
    ModelLoadError,
    ModelNotFound,
    QueueFull,
    ShuttingDown,
)
from .logs import get_logger
from .status import ModelStatus, ReplicaStatus, SchedulerStatus
from .pool import Replica, ReplicaState, RunnerPool, SpawnFn, runner_spec

log = get_logger("hoshikage.scheduler")

# What deciding for one waiting request came to (Scheduler._decide).
DECIDED = 0  # served, failed, or something started: the next request must be looked at
WAITS = 1  # it waits, and so would every request like it behind it
LOAD_WAITS = 2  # it waits for a load that cannot start yet: later loads wait behind it



# ------------------------------------------------------------------ options


@dataclass(frozen=True)
class RunnerOptions:
    """The options that shape a runner process.  Two requests whose options
    differ cannot share a runner; sampling options are not in here and never
    force a reload."""

    n_ctx: int
    n_batch: int
    n_threads: int
    n_gpu_layers: int | str
    flash_attn: bool | str
    cache_type_k: str
    cache_type_v: str

    @classmethod
    def for_model(cls, model: ModelConfig, overrides: Mapping[str, Any] | None = None) -> "RunnerOptions":
        o = cls(
            n_ctx=model.n_ctx,
            n_batch=model.n_batch,
            n_threads=model.n_threads,
            n_gpu_layers=model.n_gpu_layers,
            flash_attn=model.flash_attn,
            cache_type_k=model.cache_type_k,
            cache_type_v=model.cache_type_v,
        )
        if overrides:
            o = replace(o, **{k: v for k, v in overrides.items() if v is not None})
        return o

    def serves(self, wanted: "RunnerOptions") -> bool:
        """Can a runner loaded with these options serve a request that wants
        `wanted`?  Yes when they are equal, and also when only the context
        differs and ours is the larger: a smaller num_ctx fits in a larger
        context, and reloading for it is the thrashing Ollama users know
        (ollama#12783)."""
        if self is wanted or self == wanted:
            return True
        return (
            wanted.n_ctx > 0
            and self.n_ctx >= wanted.n_ctx
            and replace(self, n_ctx=wanted.n_ctx) == wanted
        )

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def _overrides(options: RunnerOptions, defaults: RunnerOptions) -> dict[str, Any]:
    """The fields a request set differently from its model's defaults."""
    mine, base = options.describe(), defaults.describe()
    return {k: v for k, v in mine.items() if v != base[k]}


def _replica_status(r: "Replica") -> ReplicaStatus:
    measured = r.measured
    return ReplicaStatus(
        index=r.index, state=str(r.state), pid=r.process.pid, generation=r.generation, retiring=r.retiring,
        inflight=r.inflight, served=r.served, n_ctx=r.plan.n_ctx, n_gpu_layers=r.plan.n_gpu_layers,
        load_duration=r.process.load_duration, estimate_cpu_bytes=r.plan.cpu_bytes,
        estimate_gpu_bytes=dict(r.plan.gpu_bytes),
        measured_cpu_bytes=measured.rss if measured else None,
        measured_gpu_bytes=dict(measured.gpu) if measured and measured.gpu else None,
        footprint_cpu_bytes=r.footprint_cpu(), footprint_gpu_bytes=dict(r.footprint_gpu()),
    )


def _load_of(r: "Replica") -> policy.ReplicaLoad:
    return policy.ReplicaLoad(index=r.index, available=r.available, inflight=r.inflight, served=r.served)


# ------------------------------------------------------------------ memory planning interface


@dataclass
class LoadPlan:
    """How a runner will be started: its layer placement and its footprint."""

    n_gpu_layers: int
    tensor_split: tuple[float, ...] | None
    flash_attn: bool
    cache_type_k: str
    cache_type_v: str
    n_ctx: int
    cpu_bytes: int
    gpu_bytes: dict[int, int]
    weights_key: str  # replicas with the same key share mmap'd weights on CPU
    weights_cpu: int = 0
    pooling_type: int | None = None  # embedding runners of models without pooling: mean
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.cpu_bytes + sum(self.gpu_bytes.values())


@dataclass
class Fit:
    ok: bool
    needed: int = 0
    available: int = 0
    reason: str = ""


class Planner(Protocol):
    """Memory awareness, kept out of the scheduler's state machine."""

    def plan(self, model: ModelConfig, options: RunnerOptions, released: list["Replica"]) -> LoadPlan:
        """Placement for a new runner, as if the `released` replicas were gone."""
        ...

    def fits(self, plan: LoadPlan, keep: list["Replica"], released: list["Replica"]) -> Fit:
        """Would `plan` fit beside the `keep` replicas once `released` are stopped?"""
        ...

    def fits_alone(self, plan: LoadPlan) -> Fit: ...

    def gpu_free(self) -> dict[int, int]: ...

    async def wait_for_recovery(self, replica: "Replica", baseline: dict[int, int]) -> bool: ...

    def measure(self, replica: "Replica") -> None: ...


# ------------------------------------------------------------------ runtime state
# Replica, ReplicaState and TRANSITIONS live with the process machinery (pool.py).

class Slot:
    """One loaded model.  `draining` means: take no new requests, stop once idle
    (reason "evict", "reload", "unload" or "expire")."""

    def __init__(self, model: ModelConfig, options: RunnerOptions, session: float):
        self.model = model
        self.options = options
        self.session = session
        self.replicas: list[Replica] = []
        self.draining: str | None = None
        self.expires_at: float | None = None  # wall-clock time, for the APIs
        self.timer: Any = None
        self.armed = False  # the idle countdown is set (or the session is forever)
        self.resume_at: float | None = None  # after a crash: when the interrupted session ends
        self.generation = 0  # bumped by a restart: replicas of older generations retire

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def refcount(self) -> int:
        return sum(r.inflight for r in self.replicas)

    @property
    def loading(self) -> bool:
        return any(r.state == ReplicaState.LOADING for r in self.replicas)

    @property
    def ready(self) -> bool:
        return any(r.state == ReplicaState.READY for r in self.replicas)

    @property
    def current_ready(self) -> bool:
        """A replica of the newest generation serves."""
        return any(r.state == ReplicaState.READY and r.generation == self.generation for r in self.replicas)

    def live_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.state in (ReplicaState.LOADING, ReplicaState.READY)]

    def state(self) -> str:
        if self.draining:
            return "draining" if self.refcount else "stopping"
        if self.ready:
            return "busy" if self.refcount else "idle"
        if self.loading:
            return "loading"
        return "stopping"


@dataclass(eq=False)  # identity: the scheduler keeps the leases out in a set
class Lease:
    """A request's hold on one replica.  Release it exactly once."""

    replica: Replica
    queued: float  # seconds spent waiting in the queue (load included)
    load_duration: float  # seconds of that spent loading a runner for this request
    released: bool = False
    load_only: bool = False  # held only to learn the model is loaded; served nothing

    @property
    def model(self) -> ModelConfig:
        return self.replica.slot.model

    @property
    def alive(self) -> bool:
        return self.replica.state == ReplicaState.READY


@dataclass
class ModelHealth:
    """A model's failures in a row, kept across its slots (a slot goes with its last runner)."""

    crashes: int = 0  # reset by a runner that stays up policy.HEALTHY_RESET seconds
    load_failures: int = 0  # reset by a load that succeeds
    retry_at: float = 0.0  # monotonic: no new load before this (crash backoff or cooldown)
    last_error: str = ""
    restart_timer: Any = None  # the pending replacement of a crashed runner (crash backoff)


@dataclass(eq=False)  # identity: queues index requests by the object
class Pending:
    model: ModelConfig
    options: RunnerOptions
    keep_alive: float | None
    future: asyncio.Future
    enqueued: float
    load_started: float | None = None
    load_only: bool = False
    seq: int = 0  # arrival order
    queued: bool = False  # waiting in the queue (False once granted, failed or gone)
    keep_alive_change: bool = False  # its keep_alive differs from the one before it in its model's queue


class ModelQueue:
    """One model's waiting requests in arrival order, and what a pass needs
    to know about them without looking at each one.

    `items` may still hold requests that left the queue (`queued` False);
    they are skipped and dropped in bulk, never removed one by one, and a
    new list replaces the old one when it is compacted (a pass walking the
    old one is not disturbed).  `start` is where the live part begins.

    The requests that carry keep_alive are kept apart (`keep_alives`), and
    among them the *changes* (`changes`): those whose keep_alive differs
    from the one before them, or whose predecessor left.  Between two
    changes, requests only set the session to the value it already has.
    """

    __slots__ = ("items", "start", "live", "dead", "options", "load_only", "fresh", "keep_alives", "changes",
                 "head_seq")

    def __init__(self) -> None:
        self.items: list[Pending] = []
        self.start = 0
        self.live = 0
        self.dead = 0  # entries in `items` that left the queue
        self.options: dict[RunnerOptions, int] = {}  # how many ask for each set of runner options
        self.load_only = 0
        self.fresh: list[Pending] = []  # not yet stamped with the start of a load
        self.keep_alives: list[Pending] = []  # those that carry keep_alive, arrival order
        self.changes: list[Pending] = []  # of those, the ones that change the value, arrival order
        self.head_seq = -1  # the arrival number under which Scheduler._heads knows this queue

    @property
    def uniform(self) -> bool:
        """Every request waiting asks for the same runner options and a real
        request: each one would be decided like the first that waits."""
        return self.load_only == 0 and len(self.options) == 1

    def first(self) -> int | None:
        """Index of the oldest waiting request (skipping those that left)."""
        items, i = self.items, self.start
        while i < len(items) and not items[i].queued:
            i += 1
        if i > 64 and i * 2 > len(items):
            self.items = items = items[i:]  # a new list: a pass may hold the old one
            self.dead -= i
            i = 0
        self.start = i
        return i if i < len(items) else None

    def index(self, p: Pending) -> int:
        """Where `p` is in `items` (a binary search: items are in arrival order)."""
        return bisect.bisect_left(self.items, p.seq, key=_seq_of)

    def next_keep_alive(self, after: int) -> Pending | None:
        """The first waiting request after arrival number `after` that carries keep_alive."""
        kas = self.keep_alives
        i = bisect.bisect_right(kas, after, key=_seq_of)
        while i < len(kas) and not kas[i].queued:
            i += 1
        return kas[i] if i < len(kas) else None

    def next_change(self, after: int) -> Pending | None:
        changes = self.changes
        i = bisect.bisect_right(changes, after, key=_seq_of)
        while i < len(changes) and not changes[i].queued:
            i += 1
        return changes[i] if i < len(changes) else None


def _seq_of(p: Pending) -> int:
    return p.seq


class Scheduler:
    def __init__(
        self,
        config: Config,
        planner: Planner,
        *,
        spawn: SpawnFn | None = None,
        timer: Callable[[float, Callable[[], None]], Any] | None = None,
        clock: Callable[[], float] = time.time,
        runtime_dir: Path | None = None,
    ):
        self.config = config
        self.planner = planner
        # The private directory runner sockets go in (hoshikage_sup.runtime);
        # a spawn function reads it here.  None: each runner makes its own.
        self.runtime_dir = runtime_dir
        self._timer = timer
        self._clock = clock
        self.slots: dict[str, Slot] = {}
        # The queue: every waiting request in arrival order, and per model.
        self._waiting: dict[Pending, None] = {}
        self._queues: dict[str, ModelQueue] = {}
        # The models with requests waiting, by the arrival of their oldest one
        # (a heap; entries whose queue moved on are corrected or dropped when met).
        self._heads: list[tuple[int, str]] = []
        self._seq = itertools.count()
        # Work done by the scheduling passes, counted (tests and benchmarks):
        # `decisions` is the number of requests a pass looked at.
        self.stats: dict[str, int] = {"passes": 0, "decisions": 0}
        self.events = EventLog()
        self._closed = False
        self._refusing = False  # a shutdown's drain: requests in flight finish, no new ones
        self._in_schedule = False
        self._again = False
        self._changed = asyncio.Event()
        self.counters: dict[str, int] = {
            "loads": 0, "load_failures": 0, "evictions": 0, "expirations": 0,
            "reloads": 0, "crashes": 0, "restarts": 0, "requests": 0, "rejected_queue_full": 0,
            "scheduling_errors": 0,
        }
        self.leases: set[Lease] = set()  # every lease handed out and not yet released
        self.health: dict[str, ModelHealth] = {}  # failures in a row, per model, across its slots
        # The process machinery: spawn, load, stop, the state machine, the watchdog.
        self.pool = RunnerPool(self, events=self.events, counters=self.counters, spawn=spawn)

    # ------------------------------------------------------------ limits

    @property
    def max_loaded(self) -> int:
        configured = self.config.server.max_loaded_models
        if configured > 0:
            return configured
        return 3 * max(1, len(self.planner.gpu_free()))

    def default_session(self, model: ModelConfig) -> float:
        if model.pinned:
            return FOREVER
        return model.keep_alive if model.keep_alive is not None else self.config.server.keep_alive

    # ------------------------------------------------------------ public API

    async def acquire(
        self,
        model: ModelConfig,
        options: RunnerOptions | None = None,
        keep_alive: float | None = None,
        *,
        load_only: bool = False,
    ) -> Lease:
        """Wait for a replica of `model` with `options`; the queue is FIFO per model.
        Raises QueueFull, ModelLoadError, InsufficientMemory, ShuttingDown."""
        if self._closed or self._refusing:
            raise ShuttingDown("the server is shutting down")
        if len(self._waiting) >= self.config.server.max_queue:
            self.counters["rejected_queue_full"] += 1
            raise QueueFull(self.config.server.max_queue)
        loop = asyncio.get_running_loop()
        p = Pending(
            model=model,
            options=options or RunnerOptions.for_model(model),
            keep_alive=keep_alive,
            future=loop.create_future(),
            enqueued=time.monotonic(),
            load_only=load_only,
        )
        ahead = model.name in self._queues
        self._enqueue(p)
        self.counters["requests"] += 1
        if self._in_schedule or not self._arrive(p, ahead):
            self._schedule()
        try:
            return await p.future
        except asyncio.CancelledError:
            # The client went away.  If a lease was handed over in the same
            # instant, give it back; either way leave the queue.
            self._dequeue(p)
            if p.future.done() and not p.future.cancelled() and p.future.exception() is None:
                self.release(p.future.result())
            self._schedule()
            raise

    def _arrive(self, p: Pending, ahead: bool) -> bool:
        """An arrival that only it can be affected by, decided without a pass
        (the pass would decide the same; the state is as the last pass left
        it).  With nobody ahead of it for its model: a free replica that
        serves it is its at once.  Behind others asking for the same options
        in a queue that would only wait: it waits too, and the pass would
        only note a load under way as its load (it carries no keep_alive to
        set).  False when a pass is needed."""
        slot = self.slots.get(p.model.name)
        serves = slot is not None and not slot.draining and slot.options.serves(p.options)
        if not ahead:
            if not serves or (not slot.ready if p.load_only else self._pick_replica(slot) is None):
                return False
            self._decide(p, self.pool.recovering > 0)  # a grant
            self._changed.set()
            return not p.queued
        if p.keep_alive is not None or not self._queues[p.model.name].uniform:
            return False
        if serves and slot.loading:
            p.load_started = time.monotonic()
        self._changed.set()
        return True

    def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        self.leases.discard(lease)
        r = lease.replica
        r.inflight -= 1
        if not lease.load_only:
            r.served += 1
        self._schedule()

    def unload(self, name: str) -> bool:
        """Stop a model once its in-flight requests are done (Ollama's keep_alive 0)."""
        health = self.health.get(name)
        if health is not None and health.restart_timer is not None:
            health.restart_timer.cancel()  # a crashed runner waiting for its replacement: none now
            health.restart_timer = None
        slot = self.slots.get(name)
        if slot is None:
            return False
        self._drain(slot, "unload")
        self._schedule()
        return True

    def restart(self, name: str, reason: str = "restart") -> bool:
        """Replace a loaded model's runners without downtime: start a new
        generation (as many replicas as are live, with the model's current
        config), keep serving on the old one until a new replica is ready,
        then let the old ones finish their requests and stop.  If memory
        cannot hold both, the old ones drain first and requests wait for the
        new ones (they do not fail).  False if the model is not loaded."""
        slot = self.slots.get(name)
        if slot is None or slot.draining:
            return False
        model = self.config.models.get(name)
        if model is None:
            return False
        count = max(1, len([r for r in slot.live_replicas() if not r.killed_for]))
        asked = _overrides(slot.options, RunnerOptions.for_model(slot.model))  # what requests set (num_ctx...)
        slot.model, slot.options = model, RunnerOptions.for_model(model, asked)
        slot.generation += 1
        self.events.record("restarting", name, reason, generation=slot.generation, replicas=count)
        for _ in range(count):
            keep = self._live_replicas()
            plan = self.planner.plan(model, slot.options, [])
            if not self.planner.fits(plan, keep, []).ok:
                # No room for both generations: retire the old one first.
                old = [r for r in slot.replicas if r.generation != slot.generation]
                for r in old:
                    r.generation = -1  # retires as soon as it is idle, whatever serves
                break
            self.pool.launch(slot, plan, reason=reason)
        self._retire_for_room(slot)
        self._schedule()
        return True

    def _retire_for_room(self, slot: Slot) -> None:
        """Stop idle replicas that a restart without room for both generations retired."""
        for r in slot.replicas:
            if r.generation == -1 and r.state == ReplicaState.READY and r.inflight == 0:
                self._stop_replica(r)

    def apply_config(self, config: Config) -> dict[str, list[str]]:
        """Take a new, already validated config (a reload).

        Server settings read from `config` apply at once (max_loaded_models,
        max_queue, timeouts, the keep_alive default).  Per loaded model: one
        whose runners are still right (`_still_right`: the same RunnerSpec)
        keeps its runners (its other
        settings, such as keep_alive, pinned or aliases, apply at once); one
        whose runner would differ is restarted without downtime (`restart`:
        the old runners serve until the new ones are ready); one that is gone drains and its waiting
        requests get 404; a new one can be requested.  Returns the model names
        by what happened to them.
        """
        old_models = self.config.models
        old_defaults = {name: self.default_session(slot.model) for name, slot in self.slots.items()}
        self.config = config
        changes: dict[str, list[str]] = {"added": [], "removed": [], "restarted": [], "updated": [], "unchanged": []}
        for name in sorted(set(old_models) | set(config.models)):
            old, new = old_models.get(name), config.models.get(name)
            if old is None:
                changes["added"].append(name)
            elif new is None:
                changes["removed"].append(name)
            elif name in self.slots and not self._still_right(self.slots[name], new):
                changes["restarted"].append(name)
            elif old != new:
                changes["updated"].append(name)
            else:
                changes["unchanged"].append(name)
        for q in self.pending:
            new = config.models.get(q.model.name)
            if new is None:
                self._dequeue(q)
                if not q.future.done():
                    q.future.set_exception(ModelNotFound(q.model.name))
            elif new is not q.model:
                asked = _overrides(q.options, RunnerOptions.for_model(q.model))
                q.model, q.options = new, RunnerOptions.for_model(new, asked)
        self._requeue()  # options may have changed: count them again
        for name, slot in list(self.slots.items()):
            if name in changes["removed"]:
                self._drain(slot, "removed")
            elif name in changes["restarted"]:
                self.restart(name, reason="reload")  # no downtime: the old runners serve until the new are ready
            else:
                slot.model = config.models[name]
                # A session that is still the default follows the new default;
                # one a request set stays as it was.
                if slot.session == old_defaults[name] or slot.model.pinned:
                    slot.session = self.default_session(slot.model)
                if slot.armed:
                    self._cancel_expiry(slot)  # armed again by the pass, with the new session
        self._schedule()
        return changes

    def set_session(self, name: str, keep_alive: float) -> None:
        slot = self.slots.get(name)
        if slot is not None and not slot.model.pinned:
            slot.session = keep_alive
            self._cancel_expiry(slot)  # the pass arms it again with the new session
            self._schedule()

    def preload(self, model: ModelConfig) -> asyncio.Task:
        """Load a model at start-up (`preload = true`) without holding it."""

        async def _run() -> None:
            lease = await self.acquire(model, load_only=True)
            self.release(lease)

        return asyncio.ensure_future(_run())

    def status(self, *, measure: bool = True) -> SchedulerStatus:
        """What every loaded model is doing, as frozen values for the APIs.
        With `measure`, ready runners' memory is read afresh first (RSS grows
        as a runner touches its mmap'd weights)."""
        waiting = {name: q.live for name, q in self._queues.items()}
        models = []
        for slot in sorted(self.slots.values(), key=lambda s: s.name):
            live = [r for r in slot.replicas if r.state != ReplicaState.GONE]
            if measure:
                for r in live:
                    if r.state == ReplicaState.READY:
                        with contextlib.suppress(Exception):
                            self.planner.measure(r)
            models.append(ModelStatus(
                name=slot.name, model=slot.model, state=slot.state(), draining=slot.draining,
                options=slot.options, session=slot.session, expires_at=slot.expires_at,
                refcount=slot.refcount, queued=waiting.get(slot.name, 0), generation=slot.generation,
                replicas=tuple(_replica_status(r) for r in live),
            ))
        return SchedulerStatus(models=tuple(models), queued=len(self._waiting), max_loaded=self.max_loaded,
                               counters=dict(self.counters), waiting=waiting)

    def model_status(self, name: str) -> ModelStatus | None:
        """One loaded model's status (memory not measured afresh), None if not loaded."""
        return self.status(measure=False).model(name)

    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def pending(self) -> list[Pending]:
        """The requests waiting, in arrival order (a copy)."""
        return list(self._waiting)

    def invariants(self) -> list[str]:
        """What is wrong with the scheduler's state, one line each; empty when
        all is well.  Tests check it after chaos and fuzz runs:
        every pending request is waiting (not answered and still queued),
        every replica's refcount equals the leases out on it, every registered
        slot has a replica."""
        problems = []
        for p in self._waiting:
            if p.future.done():
                problems.append(f"pending request for {p.model.name!r} is answered but still queued")
        counted = sum(q.live for q in self._queues.values())
        if counted != len(self._waiting):
            problems.append(f"{len(self._waiting)} requests waiting but {counted} in the per-model queues")
        held: dict[int, int] = {}
        for lease in self.leases:
            if lease.released:
                problems.append(f"released lease on {lease.model.name!r} still counted")
            held[id(lease.replica)] = held.get(id(lease.replica), 0) + 1
        for slot in self.slots.values():
            if not slot.replicas:
                problems.append(f"model {slot.name!r} is registered without a replica")
            for r in slot.replicas:
                if r.inflight != held.get(id(r), 0):
                    problems.append(
                        f"replica {slot.name}#{r.index}: refcount {r.inflight} but {held.get(id(r), 0)} leases out"
                    )
        return problems

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate()` holds, looking again after every scheduling
        pass (and at least every 100 ms); False if `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.1))
        return True

    async def wait_unloaded(self, names: list[str], timeout: float) -> None:
        """After an unload: until each model's runners are gone, or it is busy
        (it stops when its requests end), or it was loaded again by runners that
        were not there before."""
        status = self.status(measure=False)
        before = {name: set(m.pids) for name in names if (m := status.model(name)) is not None}

        def settled() -> bool:
            now = self.status(measure=False)
            for name, pids in before.items():
                m = now.model(name)
                if m is not None and m.refcount == 0 and set(m.pids) & pids:
                    return False
            return True

        await self.wait_until(settled, timeout)

    async def wait_idle(self, timeout: float) -> None:
        """For tests and shutdown: wait until no request is pending or in flight."""
        idle = lambda: not self._waiting and not any(s.refcount for s in self.slots.values())  # noqa: E731
        if not await self.wait_until(idle, timeout):
            raise TimeoutError("scheduler did not become idle")

    def refuse_new(self) -> None:
        """The start of a shutdown: new requests get ShuttingDown; those in
        flight or already queued are served."""
        self._refusing = True

    async def close(self) -> None:
        """Refuse new work, fail what waits, stop every runner."""
        self._closed = True
        for p in self.pending:
            self._dequeue(p)
            if not p.future.done():
                p.future.set_exception(ShuttingDown("the server is shutting down"))
        replicas = []
        for slot in list(self.slots.values()):
            self._cancel_expiry(slot)
            slot.draining = slot.draining or "shutdown"
            replicas += slot.replicas
        await self.pool.close(replicas)

    # ------------------------------------------------------------ the scheduling pass

    def _schedule(self) -> None:
        """Make every decision the current state allows.  Re-entrant calls
        (a decision that changes state) just ask for one more pass."""
        if self._in_schedule:
            self._again = True
            return
        self._in_schedule = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._pass()
        finally:
            self._in_schedule = False
            self._changed.set()

    def _pass(self) -> None:
        self.stats["passes"] += 1
        self._walk()
        self._settle_slots()

    def _walk(self) -> None:
        """One walk over the queue in arrival order, making every decision the
        state allows.

        The walk visits the waiting requests merged by arrival across models
        (a heap of each model's next request), and stops visiting a model as
        soon as the rest of its queue would only wait: its first request
        that waits for a busy or loading runner, a draining model or a load
        that cannot start yet stands for all the others asking for the same
        runner options (`_decide` says WAITS).  What those others would have done
        while waiting (set the session from their keep_alive, note when a
        load for them began) is done for all of them at once
        (`_settle_rest`).  Models that are not loaded join the walk one at a
        time, oldest request first (`_heads`), and stop joining once a load
        has to wait: every later load waits behind it.  So a pass costs in
        the loaded models and the requests it grants or loads for, not in
        the length of the queue nor in the number of models waiting.  A
        model whose queue mixes runner options or load-only requests is
        walked request by request.
        """
        # A load that needs memory or a model slot is decided in arrival order:
        # once one such load must wait for an eviction, later loads wait behind
        # it (no starvation), while requests for loaded models keep flowing.
        loads_blocked = self.pool.recovering > 0
        queues = self._queues
        heap: list[tuple[int, str, int, list[Pending]]] = []
        for name in self.slots:
            q = queues.get(name)
            if q is not None and (i := q.first()) is not None:
                heap.append((q.items[i].seq, name, i, q.items))
        heapq.heapify(heap)
        walked = {entry[1] for entry in heap}
        taken: list[str] = []  # taken off _heads: put back at the end
        joined: str | None = None  # the model without a slot that joined last, until its turn

        def join_next() -> str | None:
            """Bring the model without a slot whose oldest request is the
            oldest of all such models into the walk."""
            heads = self._heads
            while heads:
                seq, name = heapq.heappop(heads)
                q = queues.get(name)
                if q is None or q.head_seq != seq:
                    continue  # its queue emptied (or was made again): a stale entry
                i = q.first()
                assert i is not None  # a queue exists only while it holds a request
                if q.items[i].seq != seq:  # its oldest request left: file it under the next
                    q.head_seq = q.items[i].seq
                    heapq.heappush(heads, (q.head_seq, name))
                    continue
                taken.append(name)
                if name in walked:
                    continue
                walked.add(name)
                heapq.heappush(heap, (seq, name, i, q.items))
                return name
            return None

        if not loads_blocked:
            joined = join_next()
        while heap:
            _, name, i, items = heapq.heappop(heap)
            if name == joined:  # its oldest request's turn: the next model to load may join
                joined = None
            p = items[i]
            if p.queued:
                if p.future.done():  # cancelled; its acquire() has not seen it yet
                    self._dequeue(p)
                else:
                    self.stats["decisions"] += 1
                    # One request's decision can never poison the pass: whatever
                    # goes wrong while deciding for it fails that request alone.
                    try:
                        outcome = self._decide(p, loads_blocked)
                    except Exception as e:  # noqa: BLE001 - a bug or an absurd input: isolate it
                        self._fail_pending(p, e)
                        outcome = DECIDED
                    if outcome == LOAD_WAITS:
                        loads_blocked = True
                    if outcome != DECIDED and p.queued:
                        q = queues.get(name)
                        if q is not None and q.uniform:
                            nxt = self._settle_rest(name, q, p)
                            # The rest of this model's queue is skipped, but for
                            # the next request that changes the session.
                            items = []
                            if nxt is not None:
                                heapq.heappush(heap, (nxt.seq, name, q.index(nxt), q.items))
            j = i + 1
            while j < len(items) and not items[j].queued:
                j += 1
            if j < len(items):
                heapq.heappush(heap, (items[j].seq, name, j, items))
            if joined is None and not loads_blocked:
                joined = join_next()
        for name in taken:
            q = queues.get(name)
            if q is not None and (i := q.first()) is not None:
                q.head_seq = q.items[i].seq
                heapq.heappush(self._heads, (q.head_seq, name))
        if len(self._heads) > 2 * len(queues) + 64:  # stale entries piling up under a waiting load
            self._heads = []
            for name, q in queues.items():
                if (i := q.first()) is not None:
                    q.head_seq = q.items[i].seq
                    self._heads.append((q.head_seq, name))
            heapq.heapify(self._heads)

    def _settle_slots(self) -> None:
        # Idle countdowns start here, for every slot at once: a slot is idle
        # when it is ready, holds no lease and no request waits for it (a
        # queued request is handed the runner in this same pass, so keep_alive
        # 0 never unloads a model under its own queue).
        waiting = self._queues
        for slot in list(self.slots.values()):
            try:
                if slot.draining:
                    self._maybe_stop(slot)
                    continue
                for r in slot.replicas:  # a restart's old generation, once the new one serves
                    if r.retiring and r.state == ReplicaState.READY and r.inflight == 0:
                        self._stop_replica(r)
                if not slot.armed and slot.refcount == 0 and slot.ready and slot.name not in waiting:
                    self._arm_expiry(slot)
            except Exception:  # noqa: BLE001 - keep the other slots going
                self.counters["scheduling_errors"] += 1
                log.exception("scheduling error on a loaded model", model=slot.name)

    def _settle_rest(self, name: str, q: ModelQueue, p: Pending) -> Pending | None:
        """The requests of `q` after `p` (which waits) would each only wait in
        this pass.  A load under way counts as their load from now on; and
        each would set the session from its keep_alive, at its turn in the
        walk.  Returns the next of them whose keep_alive changes the session
        (it must be walked at its turn: a load decided in between may look
        at the session), or None."""
        slot = self.slots.get(name)
        if slot is None or slot.draining or not slot.options.serves(next(iter(q.options))):
            return None  # they would not touch the session, nor count a load
        if q.fresh and slot.loading:
            now = time.monotonic()
            for x in q.fresh:
                if x.queued and x.load_started is None:
                    x.load_started = now
            q.fresh = []
        if not q.keep_alives:
            return None
        nxt = q.next_keep_alive(p.seq)
        if nxt is not None and p.keep_alive is not None and nxt.keep_alive == p.keep_alive:
            nxt = q.next_change(p.seq)  # the same value as p's, which was just set
        return nxt

    # ------------------------------------------------------------ the queue

    def _enqueue(self, p: Pending, seq: int | None = None) -> None:
        p.seq = next(self._seq) if seq is None else seq
        p.queued = True
        self._waiting[p] = None
        q = self._queues.get(p.model.name)
        if q is None:
            q = self._queues[p.model.name] = ModelQueue()
        q.items.append(p)
        q.live += 1
        q.options[p.options] = q.options.get(p.options, 0) + 1
        q.load_only += p.load_only
        if p.load_started is None:
            q.fresh.append(p)
        if p.keep_alive is not None:
            kas = q.keep_alives
            while kas and not kas[-1].queued:
                kas.pop()
            p.keep_alive_change = not kas or kas[-1].keep_alive != p.keep_alive
            if p.keep_alive_change:
                q.changes.append(p)
            kas.append(p)
        if q.live == 1:  # a new queue: file it under its oldest request
            q.head_seq = p.seq
            heapq.heappush(self._heads, (p.seq, p.model.name))

    def _dequeue(self, p: Pending) -> None:
        """`p` leaves the queue (granted, failed or gone); O(1), idempotent."""
        if not p.queued:
            return
        p.queued = False
        del self._waiting[p]
        name = p.model.name
        q = self._queues[name]
        q.live -= 1
        if q.live == 0:
            del self._queues[name]
            return
        n = q.options[p.options] - 1
        if n:
            q.options[p.options] = n
        else:
            del q.options[p.options]
        q.load_only -= p.load_only
        if p.keep_alive is not None:
            # The next request with a keep_alive no longer follows p's value:
            # it is a change now (at worst it is walked for nothing).
            nxt = q.next_keep_alive(p.seq)
            if nxt is not None and not nxt.keep_alive_change:
                nxt.keep_alive_change = True
                bisect.insort(q.changes, nxt, key=_seq_of)
        q.dead += 1
        if q.dead > 64 and q.dead > q.live:
            # New lists: a pass walking the old ones is not disturbed.
            q.items = [x for x in q.items if x.queued]
            q.start, q.dead = 0, 0
            q.fresh = [x for x in q.fresh if x.queued and x.load_started is None]
            q.keep_alives = [x for x in q.keep_alives if x.queued]
            q.changes = [x for x in q.changes if x.queued]

    def _requeue(self) -> None:
        """Build the per-model queues again from the requests waiting, in arrival order."""
        waiting = list(self._waiting)
        self._waiting.clear()
        self._queues.clear()
        self._heads.clear()
        for p in waiting:
            p.keep_alive_change = False
            self._enqueue(p, p.seq)

    def _decide(self, p: Pending, loads_blocked: bool) -> int:
        """Every decision the state allows for one pending request.  Returns
        LOAD_WAITS when a load had to wait, so later loads wait behind it;
        WAITS when `p` waits and a request just like it behind it (same
        model and runner options, not load-only) would only wait too;
        otherwise DECIDED (served, failed, a load started: look at the next)."""
        name = p.model.name
        slot = self.slots.get(name)
        if slot is not None and slot.draining:
            self._maybe_stop(slot)
            return WAITS if self.slots.get(name) is slot else DECIDED  # gone: the next one may load it
        if slot is not None and not slot.options.serves(p.options):
            # Runner options differ (for example num_ctx): reload after it
            # drains, but only for options that can run at all: a request whose
            # options cannot fit fails alone and the loaded runner stays.
            if not slot.ready:
                # Still loading, for the requests ahead of this one: reload once
                # it has served them (draining it now would load it again for
                # them next, and again for this one, for ever).
                return DECIDED
            if self._options_fail(p):
                return DECIDED
            self.counters["reloads"] += 1
            self._drain(slot, "reload")
            return WAITS if self.slots.get(name) is slot else DECIDED
        if slot is not None:
            self._apply_keep_alive(slot, p)
            if p.load_started is None and slot.loading:
                p.load_started = time.monotonic()
            if p.load_only and slot.ready:
                self._grant(p, None)
                return DECIDED
            r = self._pick_replica(slot)
            if r is not None:
                self._grant(p, r)
                return DECIDED
            # No replica free; one more is started if it can be (a second try
            # in the same pass would meet the same memory).
            if not loads_blocked and self._want_replica(slot):
                self._scale_up(slot, p)
            return DECIDED if p.load_only else WAITS
        if loads_blocked:
            return WAITS
        if not self._try_load(p):
            return LOAD_WAITS
        if p.queued and name not in self.slots:
            return WAITS  # a crash backoff: no load before it ends (see _restart)
        return DECIDED

    def _options_fail(self, p: Pending) -> bool:
        """Fail `p` (and the requests that ask for the same options) when a
        runner with its options could not be planned or could not fit even
        alone; True if it did."""
        return self._plan_or_fail(p) is None

    def _plan_or_fail(self, p: Pending) -> LoadPlan | None:
        """`_options_fail`, answering the plan it made (None: `p` failed)."""
        try:
            plan = self.planner.plan(p.model, p.options, [])
        except (OSError, ValueError, OverflowError) as e:
            self._fail_options(p.model, p.options, ModelLoadError(f"cannot plan model '{p.model.name}' with these options: {e}"))
            return None
        alone = self.planner.fits_alone(plan)
        if not alone.ok:
            self._fail_options(p.model, p.options, InsufficientMemory(
                f"model '{p.model.name}' with these options does not fit even with every other model unloaded: "
                f"{alone.reason}", needed=alone.needed, available=alone.available,
            ))
            return None
        return plan

    def _fail_pending(self, p: Pending, e: Exception) -> None:
        self.counters["scheduling_errors"] += 1
        log.exception("scheduling failed for one request", model=p.model.name)
        self._dequeue(p)
        if not p.future.done():
            error = e if isinstance(e, HoshikageError) else HoshikageError(
                f"cannot schedule this request for model '{p.model.name}': {type(e).__name__}: {e}"
            )
            p.future.set_exception(error)

    def _pick_replica(self, slot: Slot) -> Replica | None:
        replicas = slot.replicas
        if len(replicas) == 1:  # nothing to choose between
            return replicas[0] if replicas[0].available else None
        return policy.pick_replica([(r, _load_of(r)) for r in replicas])

    def _grant(self, p: Pending, r: Replica | None) -> None:
        """Hand `p` a lease; it leaves the queue."""
        now = time.monotonic()
        load = (now - p.load_started) if p.load_started is not None else 0.0
        if r is None:  # load-only request: no replica is held
            slot = self.slots[p.model.name]
            r = next(x for x in slot.replicas if x.state == ReplicaState.READY)
            lease = Lease(replica=r, queued=now - p.enqueued, load_duration=load, load_only=True)
            r.inflight += 1
        else:
            r.inflight += 1
            lease = Lease(replica=r, queued=now - p.enqueued, load_duration=load)
        self._cancel_expiry(r.slot)
        self.leases.add(lease)
        self._dequeue(p)
        p.future.set_result(lease)

    def _apply_keep_alive(self, slot: Slot, p: Pending) -> None:
        if p.keep_alive is not None and not slot.model.pinned:
            slot.session = p.keep_alive

    def _want_replica(self, slot: Slot) -> bool:
        live = slot.live_replicas()
        if len(live) >= slot.model.parallel:  # policy's first answer, without building its input
            return False
        return policy.wants_another_replica([_load_of(r) for r in live], slot.model.parallel, slot.loading)

    # ------------------------------------------------------------ loading

    def _candidates(self, exclude: str) -> list[Slot]:
        """Eviction order: idle first, then those no request is waiting for
        (evicting a model with a queue only means loading it again next),
        then shortest session first, "forever" last, then name.  Pinned,
        loading and already draining slots are not candidates."""
        waiting = self._queues  # models with requests waiting
        slots = {
            s.name: s for s in self.slots.values()
            if s.name != exclude and not s.model.pinned and not s.loading and not s.draining
        }
        order = policy.eviction_order(
            [policy.Candidate(s.name, s.refcount, s.session, s.name in waiting) for s in slots.values()]
        )
        return [slots[c.name] for c in order]

    def _try_load(self, p: Pending) -> bool:
        """Decide a load for `p`.  Returns False when later loads must wait."""
        model, options = p.model, p.options
        health = self.health.get(model.name)
        now = time.monotonic()
        if health is not None and health.retry_at > now:
            if policy.in_cooldown(health.load_failures):
                self._fail_options(model, options, ModelCoolingDown(
                    f"model '{model.name}' failed to load {health.load_failures} times in a row and is cooling "
                    f"down; try again in {math.ceil(health.retry_at - now)} s. Last error: {health.last_error}",
                    retry_after=math.ceil(health.retry_at - now),
                ))
            return True  # crash backoff: the replacement starts when it is over (see _restart)
        keep = self._live_replicas()
        plan = self._plan_or_fail(p)  # the same plan serves below: planning reads the GGUF and devices
        if plan is None:
            return True
        draining = any(s.draining for s in self.slots.values())
        count_ok = self._loaded_count() < self.max_loaded
        if not count_ok and draining:
            # Something is already on its way out; decide again once it is gone
            # (memory is not asked: the answer would be the same).
            return False
        fit = self.planner.fits(plan, keep, [])
        if count_ok and fit.ok:
            self._start_load(p, plan)
            return True
        if draining:
            # Something is already on its way out; decide again once it is gone.
            return False
        victims: list[Slot] = []
        n_left = self._loaded_count()
        for cand in self._candidates(model.name):
            victims.append(cand)
            remaining = [r for r in keep if r.slot not in victims]
            released = [r for r in keep if r.slot in victims]
            n_left = self._loaded_count() - len(victims)
            fit = self.planner.fits(self.planner.plan(model, options, released), remaining, released)
            if n_left < self.max_loaded and fit.ok:
                break
        else:
            # Even with every candidate gone it would not fit.  When all that
            # stays is pinned and settled, nothing will ever make room: fail
            # now (fits_alone judges against totals and cannot see pinned
            # models) instead of evicting for nothing and waiting forever.
            stay = [s for s in self.slots.values() if s.name != model.name and s not in victims]
            if stay and all(s.model.pinned and not s.loading and not s.draining for s in stay):
                pinned = ", ".join(repr(s.name) for s in sorted(stay, key=lambda s: s.name))
                if n_left >= self.max_loaded:
                    error: HoshikageError = ModelLoadError(
                        f"model '{model.name}' cannot be loaded: max_loaded_models is {self.max_loaded} "
                        f"and the pinned models {pinned} stay loaded"
                    )
                else:
                    error = InsufficientMemory(
                        f"model '{model.name}' does not fit beside the pinned models {pinned}: {fit.reason}",
                        needed=fit.needed, available=fit.available,
                    )
                self._fail_options(model, options, error)
                return True
            if not victims:
                # What stays is still loading, or RAM is short for the moment:
                # wait for a change.
                return False
        # Why: the count of loaded models, memory, or both (with the numbers).
        first = self.planner.fits(plan, keep, [])
        why = "count" if self._loaded_count() >= self.max_loaded else "memory"
        if why == "count" and not first.ok:
            why = "count+memory"
        numbers = {"loaded": self._loaded_count(), "max_loaded_models": self.max_loaded}
        if not first.ok:
            numbers.update(needed=first.needed, available=first.available)
        for v in victims:
            log.info(
                "evicting", victim=v.name, for_model=model.name, victim_refcount=v.refcount,
                victim_session=format_duration(v.session),
            )
            self.events.record("evicting", v.name, why, for_model=model.name, refcount=v.refcount,
                               session=format_duration(v.session), **numbers)
            self.counters["evictions"] += 1
            self._drain(v, "evict")
        # Idle victims are stopping now and no longer count.  A load that fits
        # beside their memory (which counts until they are gone) starts while
        # they exit, instead of after: a switch saves the ~0.2 s of a
        # runner's shutdown.  Victims with GPU memory are waited for, as is
        # anything still serving.
        if (not any(r.footprint_gpu() for v in victims for r in v.replicas)
                and self._loaded_count() < self.max_loaded and self.planner.fits(plan, self._live_replicas(), []).ok):
            self._start_load(p, plan)
            return True
        return False

    def _loaded_count(self) -> int:
        """Models loaded or loading, and those still serving while they drain.
        A model whose runners are only stopping (no request left) does not
        count: it serves nobody, and its memory counts until it is gone
        (the planner sees those replicas until then)."""
        return sum(1 for s in self.slots.values() if s.live_replicas() or (s.draining and s.refcount))

    def _live_replicas(self) -> list[Replica]:
        return [r for s in self.slots.values() for r in s.replicas if r.state != ReplicaState.GONE]

    def _start_load(self, p: Pending, plan: LoadPlan) -> None:
        session = p.keep_alive if p.keep_alive is not None else self.default_session(p.model)
        if p.model.pinned:
            session = FOREVER
        slot = Slot(p.model, p.options, session)
        self.slots[p.model.name] = slot
        try:
            self.pool.launch(slot, plan, reason="request")
        except BaseException:
            if not slot.replicas and self.slots.get(slot.name) is slot:
                del self.slots[slot.name]
            raise
        # Later requests for this model are stamped by the pass as they meet the loading slot.
        p.load_started = time.monotonic()

    def _scale_up(self, slot: Slot, p: Pending) -> None:
        """One more replica if it fits; if that cannot be done, `p` simply
        waits for a replica that is already there."""
        try:
            keep = self._live_replicas()
            plan = self.planner.plan(slot.model, slot.options, [])
            if self.planner.fits(plan, keep, []).ok:
                self.pool.launch(slot, plan, reason="parallel")
                p.load_started = p.load_started or time.monotonic()
        except Exception:  # noqa: BLE001
            self.counters["scheduling_errors"] += 1
            log.exception("could not start another replica", model=slot.name)

    def _still_right(self, slot: Slot, model: ModelConfig) -> bool:
        """Would `slot`'s runners be started the same way under this config of
        their model?  Spec equality: the spec the config gives, planned as if
        these runners were gone, against each runner's own.  Where the config
        leaves placement as it was, the layers on the GPUs are not compared:
        they follow the memory free at load time, not the config."""
        options = RunnerOptions.for_model(model, _overrides(slot.options, RunnerOptions.for_model(slot.model)))
        live = [r for r in slot.live_replicas() if not r.retiring]
        if not live:
            return True
        want = runner_spec(model, options, self.planner.plan(model, options, live))
        same_placement = model.n_gpu_layers == slot.model.n_gpu_layers
        for r in live:
            have = r.process.spec
            if same_placement:
                have = replace(have, n_gpu_layers=want.n_gpu_layers, tensor_split=want.tensor_split)
            if have != want:
                return False
        return True

    # ------------------------------------------------------------ what the pool reports

    def changed(self) -> None:
        self._schedule()

    def loaded(self, r: Replica) -> None:
        self._health_of(r.slot.name).load_failures = 0
        self._schedule()

    def load_failed(self, r: Replica, error: Exception, *, by_runner: bool) -> None:
        """A runner did not come up: requests that asked for its options fail
        (others stay queued); a model that keeps failing cools down."""
        slot = r.slot
        if by_runner:
            health = self._health_of(slot.name)
            health.load_failures += 1
            health.last_error = str(error)
            if policy.in_cooldown(health.load_failures):
                delay = policy.restart_delay(health.load_failures)
                health.retry_at = time.monotonic() + delay
                self.events.record("cooldown", slot.name, "load failures", seconds=delay,
                                   failures_in_a_row=health.load_failures)
        if r in slot.replicas:
            slot.replicas.remove(r)
        if not slot.replicas and self.slots.get(slot.name) is slot:
            del self.slots[slot.name]
            if by_runner:
                self._fail_options(slot.model, slot.options, ModelLoadError(f"model '{slot.name}' failed to load: {error}"))
        if not by_runner:  # a bug or an OS error: never leave waiters hanging
            self._fail_options(slot.model, slot.options, ModelLoadError(f"model '{slot.name}' failed to load: {error}"))
        self._schedule()

    def stopped(self, r: Replica) -> None:
        self._remove_replica(r)
        self._schedule()

    def hold(self, r: Replica) -> Lease:
        lease = Lease(replica=r, queued=0.0, load_duration=0.0, load_only=True)
        r.inflight += 1
        self.leases.add(lease)
        return lease

    def unhold(self, lease: Lease) -> None:
        """Give back a probe's hold without touching the model's idle countdown
        (a probe is not a request); a session that ended meanwhile ends now."""
        slot = lease.replica.slot
        self.release(lease)
        if slot.armed and slot.timer is None and slot.expires_at is not None and slot.expires_at <= self._clock():
            self._expire(slot)

    def _fail_options(self, model: ModelConfig, options: RunnerOptions, error: HoshikageError) -> None:
        """Fail the requests that asked for exactly these options; requests for
        the same model with other options (another num_ctx) stay queued and get
        a load of their own."""
        queue = self._queues.get(model.name)
        if queue is None:
            return
        for q in queue.items:
            if q.queued and q.options == options:
                self._dequeue(q)
                if not q.future.done():
                    q.future.set_exception(error)

    def _health_of(self, name: str) -> ModelHealth:
        return self.health.setdefault(name, ModelHealth())

    # ------------------------------------------------------------ expiry and stopping

    def _arm_expiry(self, slot: Slot) -> None:
        self._cancel_expiry(slot)
        slot.armed = True
        if slot.session == FOREVER or slot.model.pinned:
            slot.expires_at = None
            return
        if slot.session <= 0:
            slot.expires_at = self._clock()
            self._drain(slot, "expire")
            return
        delay = slot.session
        if slot.resume_at is not None:  # a replacement after a crash: what was left of the session
            delay, slot.resume_at = max(0.0, slot.resume_at - self._clock()), None
        slot.expires_at = self._clock() + delay
        if self._timer is not None:
            slot.timer = self._timer(delay, lambda s=slot: self._expire(s))
        else:
            slot.timer = asyncio.get_running_loop().call_later(delay, self._expire, slot)

    def _cancel_expiry(self, slot: Slot) -> None:
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        slot.expires_at = None
        slot.armed = False

    def _expire(self, slot: Slot) -> None:
        slot.timer = None
        if self.slots.get(slot.name) is not slot or slot.refcount or slot.draining:
            return
        log.info("session expired", model=slot.name, session=format_duration(slot.session))
        self.counters["expirations"] += 1
        self._drain(slot, "expire")
        self._schedule()

    def _drain(self, slot: Slot, reason: str) -> None:
        if slot.draining:
            return
        slot.draining = reason
        self.events.record("draining", slot.name, reason, refcount=slot.refcount)
        self._cancel_expiry(slot)
        self._maybe_stop(slot)

    def _maybe_stop(self, slot: Slot) -> None:
        """Stop a draining slot's replicas that hold no lease; a loading replica
        finishes loading first (killing it mid-load wastes the work and can
        leave GPU memory in limbo)."""
        for r in slot.replicas:
            if r.state == ReplicaState.READY and r.inflight == 0:
                self._stop_replica(r)
        if not slot.replicas and self.slots.get(slot.name) is slot:
            del self.slots[slot.name]

    def _stop_replica(self, r: Replica) -> None:
        self.pool.stop(r, r.slot.draining or ("restart" if r.retiring else "stop"))

    def _remove_replica(self, r: Replica) -> None:
        slot = r.slot
        if r in slot.replicas:
            slot.replicas.remove(r)
        if not slot.replicas and self.slots.get(slot.name) is slot:
            self._cancel_expiry(slot)
            del self.slots[slot.name]

    # ------------------------------------------------------------ crashes

    def crashed(self, r: Replica, code: int) -> None:
        """A runner exited while ready (a crash, or a watchdog or stall kill):
        its in-flight request fails (the gateway retries those that had not
        started), the replica is replaced while the model's session lasts,
        and waiting requests are served by the replacement."""
        slot = r.slot
        now = time.monotonic()
        health = self._health_of(slot.name)
        health.crashes = policy.failures_after(health.crashes, now - r.loaded_at if r.loaded_at else None)
        health.last_error = r.process.error_summary()
        if slot.armed and slot.expires_at is not None:
            slot.resume_at = slot.expires_at  # the replacement keeps what was left of the session
        self._remove_replica(r)
        # The same slot object stays registered only while other replicas live;
        # otherwise it is replaced proactively unless it was on its way out:
        # at once the first time, then with a growing delay (policy.restart_delay).
        if slot.draining or self._closed:
            self._schedule()
            return
        delay = policy.restart_delay(health.crashes)
        if delay > 0:
            health.retry_at = now + delay
            self.events.record("backoff", slot.name, "crash loop", replica=r.index, delay=delay,
                               crashes_in_a_row=health.crashes)
            health.restart_timer = asyncio.get_running_loop().call_later(delay, self._restart, slot)
            self._schedule()
            return
        self._restart(slot)

    def _restart(self, slot: Slot) -> None:
        """Replace a crashed runner (its slot's session permitting): re-register
        the slot if its last runner went and start one more."""
        self._health_of(slot.name).restart_timer = None
        if self._closed or slot.draining:
            return
        if slot.resume_at is not None and slot.resume_at <= self._clock():
            self._schedule()
            return  # the session ended meanwhile: the next request loads it
        current = self.slots.get(slot.name)
        if current is not None and current is not slot:
            self._schedule()
            return  # loaded again already (a request did not wait for the backoff)
        if self.config.models.get(slot.name) is not slot.model:
            self._schedule()
            return  # the config changed meanwhile
        if current is None:
            self.slots[slot.name] = slot
        try:
            if len(slot.live_replicas()) < slot.model.parallel:
                keep = self._live_replicas()
                plan = self.planner.plan(slot.model, slot.options, [])
                if self.planner.fits(plan, keep, []).ok:
                    self.counters["restarts"] += 1
                    self.pool.launch(slot, plan, reason="crash")
        except Exception:  # noqa: BLE001 - the next request loads it again
            self.counters["scheduling_errors"] += 1
            log.exception("restart after crash failed", model=slot.name)
        if not slot.replicas and self.slots.get(slot.name) is slot:
            del self.slots[slot.name]
        self._schedule()
