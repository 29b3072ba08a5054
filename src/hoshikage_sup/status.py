"""What the scheduler is doing, as frozen values: the one surface the API
layers (Ollama's /api/ps, /metrics, the admin API, systemd's STATUS line and
the CLI through the admin API) read.  None of them reaches into the
scheduler's slots or a runner's process; `Scheduler.status()` builds these
from its state in one synchronous step, so a reader never sees half of a
change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .config import ModelConfig


@dataclass(frozen=True)
class ReplicaStatus:
    index: int
    state: str  # loading, ready, stopping, gone (ReplicaState)
    pid: int | None
    generation: int  # a restart's new runners have a higher one than those they replace
    retiring: bool  # of an older generation, finishing its requests
    inflight: int
    served: int
    n_ctx: int  # the context it was started with
    n_gpu_layers: int
    load_duration: float | None
    estimate_cpu_bytes: int
    estimate_gpu_bytes: Mapping[int, int]
    measured_cpu_bytes: int | None  # RSS, once up
    measured_gpu_bytes: Mapping[int, int] | None
    footprint_cpu_bytes: int  # measured where known, else the estimate
    footprint_gpu_bytes: Mapping[int, int]

    @property
    def estimate_bytes(self) -> int:
        return self.estimate_cpu_bytes + sum(self.estimate_gpu_bytes.values())

    @property
    def measured_bytes(self) -> int | None:
        if self.measured_cpu_bytes is None:
            return None
        return self.measured_cpu_bytes + sum((self.measured_gpu_bytes or {}).values())


@dataclass(frozen=True)
class ModelStatus:
    """A loaded model (one with runners loading, serving or stopping)."""

    name: str
    model: ModelConfig
    state: str  # loading, idle, busy, draining, stopping
    draining: str | None  # why it is on its way out (evict, reload, unload, expire, removed)
    options: Any  # scheduler.RunnerOptions the runners were started with
    session: float  # keep_alive seconds; math.inf = forever
    expires_at: float | None  # wall clock, once idle
    refcount: int  # requests in flight
    queued: int  # requests waiting for it
    generation: int
    replicas: tuple[ReplicaStatus, ...]

    @property
    def pinned(self) -> bool:
        return self.model.pinned

    @property
    def cpu_bytes(self) -> int:
        return sum(r.footprint_cpu_bytes for r in self.replicas)

    @property
    def gpu_bytes(self) -> int:
        return sum(sum(r.footprint_gpu_bytes.values()) for r in self.replicas)

    @property
    def estimate_bytes(self) -> int:
        return sum(r.estimate_bytes for r in self.replicas)

    @property
    def measured_bytes(self) -> int | None:
        """Measured memory of every replica, or None while any is not measured yet."""
        measured = [r.measured_bytes for r in self.replicas]
        if not measured or any(m is None for m in measured):
            return None
        return sum(m for m in measured if m is not None)

    @property
    def context_length(self) -> int:
        """The runners' real context (n_ctx 0 in the config means the trained one)."""
        return self.replicas[0].n_ctx if self.replicas else self.options.n_ctx

    @property
    def pids(self) -> list[int]:
        return [r.pid for r in self.replicas if r.pid]


@dataclass(frozen=True)
class SchedulerStatus:
    models: tuple[ModelStatus, ...]  # loaded models, by name
    queued: int
    max_loaded: int
    counters: Mapping[str, int] = field(default_factory=dict)
    waiting: Mapping[str, int] = field(default_factory=dict)  # queued requests by model, loaded or not

    @property
    def in_flight(self) -> int:
        return sum(m.refcount for m in self.models)

    def model(self, name: str) -> ModelStatus | None:
        return next((m for m in self.models if m.name == name), None)
