"""The runner pool: the process machinery under the scheduler.

The scheduler (scheduler.py) decides *what* runs: which request gets which
runner, what to load, evict, restart.  The pool carries it out and watches
the processes: it spawns a runner from its spec, loads it, stops it (and
waits for GPU memory to come back), moves each replica through its one
state machine (`ReplicaState`, `TRANSITIONS`), records every transition as
an event, notices exits nobody asked for, and runs the watchdog that kills
runners that stopped working.  It owns no queue, no lease and no policy;
it reports back to its owner (`PoolOwner`), which decides what follows.

    owner.launch decision ─► pool.launch ─► LOADING ─► READY ─► owner.loaded
                                              │  load failed ─► owner.load_failed
    owner.stop decision ──► pool.stop ──► STOPPING ─► GONE ─► owner.stopped
    exit nobody asked for (crash, watchdog or stall kill) ─► GONE ─► owner.crashed

Two things make runners cheaper to have:

* **A warm spare** (``runner_pool`` in ``[server]``, 1 by default, 0 = off):
  a runner process that has already imported llama_cpp and its server stack
  and waits to be told what to load.  `launch` hands it the spec instead of
  spawning a new process, which takes the ~0.3 s of imports off a cold
  request; a new spare starts once no model is loading (its imports would
  compete for the CPU with the load someone waits for).  A spare that dies
  is replaced after the crash backoff.  Its memory is measured and counted
  (`spare_bytes`).
* **The thread budget** (`threads.ThreadBudget`): a replica whose model has
  ``n_threads = 0`` runs with its fair share of the cores, re-read before
  every decode step; each replica's first request in flight and last one
  done move the count of busy CPU runners (`Replica.inflight`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import psutil

from . import policy
from .config import CACHE_TYPE_IDS, Config, ModelConfig
from .devices import ProcessMemory
from .events import EventLog
from .logs import get_logger
from .process import RunnerLoadError, RunnerProcess, RunnerSpec, describe_returncode
from .staging import Stager
from .threads import ThreadBudget

if TYPE_CHECKING:  # the scheduler's types; it imports this module
    from .scheduler import Lease, LoadPlan, Planner, RunnerOptions, Slot

log = get_logger("hoshikage.pool")

SpawnFn = Callable[[RunnerSpec, int], RunnerProcess]
SpareFn = Callable[[], RunnerProcess]  # an unassigned RunnerProcess(None, ...) to `spawn()` as a spare
SPARE_POLL = 0.05  # seconds between looks for a quiet moment to start a due spare in

_replica_ids = itertools.count(1)


class ReplicaState(StrEnum):
    """The lifecycle of one runner process (see TRANSITIONS and docs/design.md)."""

    LOADING = "loading"  # spawned, loading its model
    READY = "ready"  # serving; available when it holds no lease
    STOPPING = "stopping"  # asked to stop (drained, or shutdown)
    GONE = "gone"  # exited: stopped, failed to load or crashed


# Every transition a replica may make; anything else is a bug.
TRANSITIONS: dict[ReplicaState, frozenset[ReplicaState]] = {
    ReplicaState.LOADING: frozenset({ReplicaState.READY, ReplicaState.STOPPING, ReplicaState.GONE}),
    ReplicaState.READY: frozenset({ReplicaState.STOPPING, ReplicaState.GONE}),
    ReplicaState.STOPPING: frozenset({ReplicaState.GONE}),
    ReplicaState.GONE: frozenset(),
}


class Replica:
    """One runner process of a slot; its `state` changes only through
    `RunnerPool.transition`, which checks TRANSITIONS and records the event."""

    def __init__(self, slot: "Slot", plan: "LoadPlan", process: RunnerProcess, index: int):
        self.id = next(_replica_ids)
        self.index = index
        self.slot = slot
        self.plan = plan
        self.process = process
        self.state = ReplicaState.LOADING
        self._inflight = 0
        self.budget: ThreadBudget | None = None  # told when this replica turns busy or idle (CPU runners)
        self.served = 0
        self.loaded_at: float | None = None
        self.last_healthy = 0.0  # monotonic: the last /health answer (the watchdog's)
        self.last_probe = 0.0  # monotonic: the last real generation probe (probe_interval)
        self.killed_for: str | None = None  # why the supervisor killed it (watchdog, stall)
        # A restart starts a new generation of replicas; the old one keeps
        # serving until a new replica is ready, then retires (see Slot.current_ready).
        self.generation = slot.generation
        self.measured: ProcessMemory | None = None  # what the process really uses, once up
        self.measured_at = 0.0
        self.task: asyncio.Task | None = None

    @property
    def inflight(self) -> int:
        """Leases out on this replica (requests in flight, probes, load-only holds)."""
        return self._inflight

    @inflight.setter
    def inflight(self, value: int) -> None:
        before, self._inflight = self._inflight, value
        if self.budget is not None and (before > 0) != (value > 0):
            if value > 0:
                self.budget.started()
            else:
                self.budget.finished()

    @property
    def available(self) -> bool:
        return (self.state == ReplicaState.READY and self.inflight == 0 and not self.slot.draining
                and not self.killed_for and not self.retiring)

    @property
    def retiring(self) -> bool:
        """Of an older generation than its slot's, once the new one serves."""
        return self.generation != self.slot.generation and self.slot.current_ready

    def footprint_cpu(self) -> int:
        return self.measured.rss if self.measured is not None else self.plan.cpu_bytes

    def footprint_gpu(self) -> dict[int, int]:
        if self.measured is not None and self.measured.gpu:
            return {i: b for i, b in self.measured.gpu.items() if b > 0}
        return self.plan.gpu_bytes


class PoolOwner(Protocol):
    """What the pool needs from the scheduler above it."""

    config: Config
    planner: "Planner"
    runtime_dir: Path | None

    def changed(self) -> None:
        """Something changed: make every decision the new state allows."""

    def loaded(self, r: Replica) -> None: ...

    def load_failed(self, r: Replica, error: Exception, *, by_runner: bool) -> None: ...

    def stopped(self, r: Replica) -> None: ...

    def crashed(self, r: Replica, code: int) -> None: ...

    def hold(self, r: Replica) -> "Lease":
        """A lease on an idle runner for a probe (no request meets it meanwhile)."""

    def unhold(self, lease: "Lease") -> None: ...


def runner_spec(m: ModelConfig, options: "RunnerOptions", plan: "LoadPlan") -> RunnerSpec:
    """The one description of how a runner is started (process.RunnerSpec):
    what the runner is sent, and what decides whether a running one is still
    right for a config (Scheduler._still_right)."""
    return RunnerSpec(
        model_name=m.name,
        model_path=str(m.path),
        n_ctx=plan.n_ctx,
        n_threads=options.n_threads,  # 0: a fair share (threads.py)
        n_batch=options.n_batch,
        n_gpu_layers=plan.n_gpu_layers,
        tensor_split=plan.tensor_split,
        flash_attn=plan.flash_attn,
        type_k=CACHE_TYPE_IDS[plan.cache_type_k] if plan.cache_type_k != "f16" else None,
        type_v=CACHE_TYPE_IDS[plan.cache_type_v] if plan.cache_type_v != "f16" else None,
        chat_format=m.chat_format,
        embedding=m.embedding,
        pooling_type=plan.pooling_type,
        rpc_servers=m.rpc_servers,
    )


class RunnerPool:
    """Spawns, loads, stops and watches runner processes for its owner."""

    def __init__(self, owner: PoolOwner, *, events: EventLog, counters: dict[str, int], spawn: SpawnFn | None = None):
        self.owner = owner
        self.events = events
        self.counters = counters
        self._spawn = spawn or self._default_spawn
        # Spares come from the default spawn, or from a custom spawn's `spare` method.
        self._make_spare: SpareFn | None = self._default_spare if spawn is None else getattr(spawn, "spare", None)
        self.spares: list[RunnerProcess] = []  # spawned, imported, waiting for a model
        self._spare_task: asyncio.Task | None = None
        self._spare_failures = 0  # spares that died in a row
        self.budget = ThreadBudget(owner.runtime_dir)
        server = owner.config.server
        self.stager = Stager(server.stage_dir, keep=server.stage_keep, reserve=owner.config.memory.system_reserve,
                             events=events)
        owner.planner.extra_bytes = self.extra_bytes
        self.replicas: set[Replica] = set()  # every replica not yet gone
        self.recovering = 0  # stops whose GPU memory is still coming back
        self.closed = False
        self._stopping: set[asyncio.Task] = set()
        self._watchdog: asyncio.Task | None = None

    @property
    def config(self) -> Config:
        return self.owner.config

    # ------------------------------------------------------------ state machine

    def transition(self, r: Replica, new: ReplicaState, kind: str, reason: str, **detail: Any) -> None:
        """The one way a replica changes state: checked against TRANSITIONS,
        logged and recorded as an event (`kind`, `reason`, `detail`)."""
        if new not in TRANSITIONS[r.state]:
            raise RuntimeError(f"replica {r.slot.name}#{r.index}: {r.state} → {new} is not a transition")
        r.state = new
        if new == ReplicaState.GONE:
            self.replicas.discard(r)
            self.stager.released(r.slot.name, r.process.load_path)
        self.events.record(kind, r.slot.name, reason, replica=r.index, pid=r.process.pid, **detail)

    # ------------------------------------------------------------ start

    def launch(self, slot: "Slot", plan: "LoadPlan", *, reason: str) -> Replica:
        index = max((r.index for r in slot.replicas), default=-1) + 1
        spec = runner_spec(slot.model, slot.options, plan)
        process = self._take_spare(spec, index) or self._spawn(spec, index)
        if spec.n_threads <= 0 and self.budget.path is not None:
            process.thread_budget = str(self.budget.path)
        replica = Replica(slot, plan, process, index)
        if not plan.gpu_bytes:  # a CPU runner: it competes for the cores
            replica.budget = self.budget
        process.on_exit = lambda proc, code, r=replica: self._on_exit(r, code)
        slot.replicas.append(replica)
        self.replicas.add(replica)
        self.events.record(
            "loading", slot.name, reason, replica=index, pid=process.pid, n_ctx=plan.n_ctx,
            n_gpu_layers=plan.n_gpu_layers, estimate_cpu=plan.cpu_bytes, estimate_gpu=plan.gpu_bytes,
        )
        replica.task = asyncio.ensure_future(self._load(replica))
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.ensure_future(self._watch_health())
        return replica

    def _default_spawn(self, spec: RunnerSpec, index: int) -> RunnerProcess:
        from .runnerlogs import runner_logs_of  # the model's output buffer, kept past the runner's exit

        return RunnerProcess(
            spec, replica=index, runtime_dir=self.owner.runtime_dir,
            log=get_logger("hoshikage.runner", model=spec.model_name, replica=index),
            output=runner_logs_of(self.owner).for_model(spec.model_name).append,
        )

    # ------------------------------------------------------------ the warm spare

    def _default_spare(self) -> RunnerProcess:
        return RunnerProcess(None, runtime_dir=self.owner.runtime_dir,
                             log=get_logger("hoshikage.runner", model="(spare)"))

    def start(self) -> None:
        """Start-up: make the first spare (when `runner_pool` asks for one)."""
        self.ensure_spare()

    def ensure_spare(self, delay: float = 0.0) -> None:
        """Start a spare in the background if `policy.wants_spare` says so."""
        if self._make_spare is None:
            return
        starting = self._spare_task is not None and not self._spare_task.done()
        if policy.wants_spare(self.config.server.runner_pool, len(self.spares), starting, self._loading(), self.closed):
            self._spare_task = asyncio.ensure_future(self._start_spare(delay))

    def _loading(self) -> int:
        return sum(1 for r in self.replicas if r.state == ReplicaState.LOADING)

    async def _start_spare(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        due = time.monotonic()
        while not self.closed:  # a quiet moment: nothing generating, nothing loading (policy.spare_may_start)
            busy = sum(1 for r in self.replicas if r.inflight > 0)
            if policy.spare_may_start(busy, self._loading(), time.monotonic() - due):
                break
            await asyncio.sleep(SPARE_POLL)
        if self.closed:
            return
        assert self._make_spare is not None
        process = self._make_spare()
        process.on_exit = self._spare_exited
        try:
            await process.spawn()
        except asyncio.CancelledError:  # shutdown while it was being spawned
            await process.stop(grace=self.config.server.stop_timeout)
            raise
        except Exception as e:  # noqa: BLE001 - no spare is a slower start, not an outage
            log.warning("cannot start a spare runner", error=str(e))
            self._spare_failures += 1
            return
        if self.closed:
            await process.stop(grace=self.config.server.stop_timeout)
            return
        self.spares.append(process)
        self.events.record("spare", "", "ready", pid=process.pid)

    def _spare_exited(self, process: RunnerProcess, code: int) -> None:
        """A spare died while waiting (nobody stopped it): replace it after the crash backoff."""
        if process in self.spares:
            self.spares.remove(process)
        if process.stop_requested or self.closed:
            return
        self._spare_failures += 1
        delay = policy.restart_delay(self._spare_failures)
        self.events.record("spare", "", "exited", pid=process.pid, code=code, error=process.error_summary())
        log.warning("spare runner exited", pid=process.pid, how=describe_returncode(code), retry_in=delay)
        self._spare_task = None
        self.ensure_spare(delay)

    def _take_spare(self, spec: RunnerSpec, index: int) -> RunnerProcess | None:
        """A waiting spare, assigned to this spec; None when there is none."""
        from .runnerlogs import runner_logs_of  # the model's output buffer, kept past the runner's exit

        while self.spares:
            process = self.spares.pop(0)
            if process.state != "spare":
                continue
            process.assign(
                spec, replica=index, log=get_logger("hoshikage.runner", model=spec.model_name, replica=index),
                output=runner_logs_of(self.owner).for_model(spec.model_name).append,
            )
            self._spare_failures = 0
            self.counters["spares_used"] = self.counters.get("spares_used", 0) + 1
            return process
        return None

    def extra_bytes(self) -> int:
        """RAM held for runners but by none of them: waiting spares and unmapped staged copies."""
        return self.spare_bytes() + self.stager.staged_bytes()

    def spare_bytes(self) -> int:
        """RAM the waiting spares use (resident set, measured; a spare has no GPU memory)."""
        total = 0
        for process in self.spares:
            if process.pid is not None:
                with contextlib.suppress(psutil.Error):
                    total += psutil.Process(process.pid).memory_info().rss
        return total

    # ------------------------------------------------------------ loading

    async def _load(self, r: Replica) -> None:
        try:
            await self._start(r)
        finally:
            self.ensure_spare()  # the load is over: the CPU is free for a new spare's imports

    async def _stage(self, r: Replica) -> None:
        """RAM staging (staging.py): point the runner at a copy in stage_dir when the model asks for it."""
        server, model = self.config.server, r.slot.model
        if (model.stage or server.stage) != "ram":
            return
        self.stager.directory, self.stager.keep = server.stage_dir, server.stage_keep
        self.stager.reserve = self.config.memory.system_reserve
        runner_own = max(0, r.plan.cpu_bytes - r.plan.weights_cpu)
        path = await self.stager.stage(model.name, Path(r.process.spec.model_path), also_needed=runner_own)
        if str(path) != r.process.spec.model_path:
            r.process.load_path = str(path)

    async def _start(self, r: Replica) -> None:
        try:
            await self._stage(r)
            await r.process.start(load_timeout=self.config.server.load_timeout)
        except asyncio.CancelledError:
            self.transition(r, ReplicaState.GONE, "load_cancelled", "shutdown")
            raise
        except RunnerLoadError as e:
            self.counters["load_failures"] += 1
            self.transition(r, ReplicaState.GONE, "load_failed", "runner", code=e.returncode, error=str(e))
            log.error("load failed", model=r.slot.name, replica=r.index, error=str(e))
            self.owner.load_failed(r, e, by_runner=True)
            return
        except Exception as e:  # a bug or an OS error: never leave waiters hanging
            log.exception("load crashed", model=r.slot.name)
            self.transition(r, ReplicaState.GONE, "load_failed", "supervisor", error=f"{type(e).__name__}: {e}")
            with contextlib.suppress(Exception):
                await r.process.stop(grace=self.config.server.stop_timeout)
            self.owner.load_failed(r, e, by_runner=False)
            return
        if r.state != ReplicaState.LOADING:  # stopped while loading (shutdown)
            return
        r.last_healthy = r.loaded_at = time.monotonic()
        self.transition(r, ReplicaState.READY, "ready", "loaded", load_seconds=round(r.process.load_duration or 0.0, 3))
        self.counters["loads"] += 1
        with contextlib.suppress(Exception):
            self.owner.planner.measure(r)
        log.info(
            "loaded", model=r.slot.name, replica=r.index, pid=r.process.pid,
            load_seconds=round(r.process.load_duration or 0.0, 3),
            estimate_cpu=r.plan.cpu_bytes, measured_cpu=r.measured.rss if r.measured else None,
            estimate_gpu=r.plan.gpu_bytes, measured_gpu=r.measured.gpu if r.measured else None,
        )
        self.owner.loaded(r)

    # ------------------------------------------------------------ stop

    def stop(self, r: Replica, reason: str) -> None:
        """Stop a ready runner that holds no lease; once it is gone (and, for a
        GPU runner, its memory is back), the owner hears `stopped`."""
        self.transition(r, ReplicaState.STOPPING, "stopping", reason)
        baseline = self.owner.planner.gpu_free() if r.footprint_gpu() else {}
        task = asyncio.ensure_future(self._stop_and_recover(r, reason, baseline))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop_and_recover(self, r: Replica, reason: str, baseline: dict[int, int]) -> None:
        log.info("stopping", model=r.slot.name, replica=r.index, reason=reason)
        gpu = bool(r.footprint_gpu())
        if gpu:
            self.recovering += 1
        try:
            with contextlib.suppress(Exception):
                await r.process.stop(grace=self.config.server.stop_timeout)
            if r.state != ReplicaState.GONE:
                self.transition(r, ReplicaState.GONE, "stopped", reason, code=r.process.returncode)
            self.owner.stopped(r)
            if gpu:
                ok = await self.owner.planner.wait_for_recovery(r, baseline)
                if not ok:
                    log.warning(
                        "memory did not come back in time", model=r.slot.name,
                        timeout=self.config.memory.recovery_timeout, expected=r.footprint_gpu(),
                    )
        finally:
            if gpu:
                self.recovering -= 1
            self.owner.changed()

    async def stop_now(self, r: Replica) -> None:
        """Shutdown: stop a runner whatever it is doing."""
        if r.task and not r.task.done():
            r.task.cancel()
        if r.state in (ReplicaState.LOADING, ReplicaState.READY):
            self.transition(r, ReplicaState.STOPPING, "stopping", "shutdown")
        with contextlib.suppress(Exception):
            await r.process.stop(grace=self.config.server.stop_timeout)
        if r.state != ReplicaState.GONE:
            self.transition(r, ReplicaState.GONE, "stopped", "shutdown", code=r.process.returncode)

    async def close(self, replicas: list[Replica]) -> None:
        """Shutdown: no more watching; stop these runners and wait for every stop."""
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._spare_task is not None:
            self._spare_task.cancel()
            with contextlib.suppress(BaseException):
                await self._spare_task
        stops = [self.stop_now(r) for r in replicas]
        stops += [p.stop(grace=self.config.server.stop_timeout) for p in self.spares]
        self.spares.clear()
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        self.budget.close()
        await self.stager.close()

    # ------------------------------------------------------------ exits nobody asked for

    def _on_exit(self, r: Replica, code: int) -> None:
        """A runner process ended.  Expected when stopping (and a load failure
        is `_load`'s); otherwise it crashed: the owner decides what follows."""
        if r.state in (ReplicaState.STOPPING, ReplicaState.GONE, ReplicaState.LOADING) or self.closed:
            return
        self.counters["crashes"] += 1
        self.transition(r, ReplicaState.GONE, "crashed", r.killed_for or describe_returncode(code), code=code,
                        inflight=r.inflight, last_lines=r.process.error_summary())
        self.owner.crashed(r, code)

    # ------------------------------------------------------------ watchdog

    async def _watch_health(self) -> None:
        """Probe every ready runner's lock-free /health every health_interval; one
        that has not answered for health_timeout (stopped, wedged, deadlocked)
        is killed, and the crash path replaces it.  Runs while runners exist."""
        while not self.closed and self.replicas:
            ready = [r for r in self.replicas if r.state == ReplicaState.READY]
            server = self.config.server
            probe_timeout = max(0.1, min(server.health_interval, server.health_timeout) * 0.8)
            answers = await asyncio.gather(*(r.process.health(timeout=probe_timeout) for r in ready),
                                           return_exceptions=True)
            now = time.monotonic()
            for r, ok in zip(ready, answers):
                if ok is True:
                    r.last_healthy = now
                elif r.state == ReplicaState.READY and now - r.last_healthy >= server.health_timeout:
                    self.kill_wedged(r, f"watchdog: no health answer for {now - r.last_healthy:.1f} s")
            if server.probe_interval > 0:
                due = [r for r in ready if r.available and now - max(r.last_probe, r.loaded_at or 0) >= server.probe_interval]
                if due:
                    await asyncio.gather(*(self._probe(r) for r in due), return_exceptions=True)
            await asyncio.sleep(server.health_interval)
        self._watchdog = None

    async def _probe(self, r: Replica) -> None:
        """A real 1-token generation on an idle runner, held as a lease so no
        request meets it meanwhile; no answer within health_timeout and the
        runner is replaced."""
        lease = self.owner.hold(r)
        r.last_probe = time.monotonic()
        timeout = self.config.server.health_timeout
        try:
            ok = await r.process.probe(timeout)
        finally:
            self.owner.unhold(lease)
        if not ok and r.state == ReplicaState.READY:
            self.kill_wedged(r, f"probe: no 1-token generation within {timeout:g} s")

    def kill_wedged(self, r: Replica, why: str) -> None:
        """Kill a runner that is alive but no longer works (it answers no health
        probe, or a stream of its stalled); its exit is a crash, so it is
        replaced and waiting requests go to the replacement."""
        if r.state != ReplicaState.READY or r.killed_for:
            return
        r.killed_for = why
        self.events.record("killing", r.slot.name, why, replica=r.index, pid=r.process.pid, inflight=r.inflight)
        r.process.kill()
