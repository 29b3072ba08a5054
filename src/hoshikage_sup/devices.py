"""Where memory figures come from: the machine's GPUs, its RAM, and each runner.

The scheduler talks to a `DeviceSource` and never to psutil or NVML directly,
so the same placement and eviction code runs against real hardware
(`NvmlSource`, `CpuSource`) and against `SimulatedSource`, a small model of
GPUs whose memory is allocated and comes back after a delay, which is what a
GPU does after a process exits while the driver tears its context down.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class SystemMemory:
    total: int
    available: int


@dataclass(frozen=True)
class ProcessMemory:
    """One process's footprint.

    `rss_file` is the part of `rss` backed by files (mmap'd model weights
    that other runners of the same file share through the page cache);
    `rss - rss_file` is what this process alone costs.  `gpu` maps a GPU
    index to bytes, empty where the driver does not report per-process use.
    """

    rss: int
    rss_file: int = 0
    gpu: dict[int, int] = field(default_factory=dict)


@runtime_checkable
class DeviceSource(Protocol):
    def gpus(self) -> list[GpuInfo]: ...

    def system(self) -> SystemMemory: ...

    def process_memory(self, pid: int) -> ProcessMemory:
        """Raises ProcessLookupError when `pid` does not exist."""
        ...

    def close(self) -> None: ...


def _host_process_memory(pid: int) -> tuple[int, int]:
    """(rss, file-backed rss) of a live process, through psutil."""
    try:
        info = psutil.Process(pid).memory_info()
    except psutil.NoSuchProcess:
        raise ProcessLookupError(pid) from None
    # On Linux `shared` is RssFile + RssShmem from /proc/<pid>/statm.
    return int(info.rss), int(getattr(info, "shared", 0))


def _host_system() -> SystemMemory:
    vm = psutil.virtual_memory()
    return SystemMemory(total=int(vm.total), available=int(vm.available))


class CpuSource:
    """A machine without GPUs (or whose GPUs we cannot see): psutil only."""

    def gpus(self) -> list[GpuInfo]:
        return []

    def system(self) -> SystemMemory:
        return _host_system()

    def process_memory(self, pid: int) -> ProcessMemory:
        rss, rss_file = _host_process_memory(pid)
        return ProcessMemory(rss=rss, rss_file=rss_file)

    def close(self) -> None:
        pass


class NvmlSource:
    """NVIDIA GPUs through NVML (the nvidia-ml-py package, imported as pynvml).

    NVML is initialised on first use, not at construction, so building one on
    a machine without a driver is harmless; `available()` says whether it
    works.  GPU indices are NVML's, which follow PCI bus order; they match
    CUDA's numbering when CUDA_DEVICE_ORDER=PCI_BUS_ID and no
    CUDA_VISIBLE_DEVICES remapping is in effect.
    """

    def __init__(self) -> None:
        self._nvml: Any = None
        self._error: str | None = None
        self._lock = threading.Lock()
        self._per_process_supported = True

    def _init(self) -> Any:
        with self._lock:
            if self._nvml is not None or self._error is not None:
                return self._nvml
            try:
                import pynvml  # type: ignore[import-not-found]
            except ImportError as e:
                self._error = f"nvidia-ml-py is not installed ({e})"
                return None
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as e:
                self._error = f"NVML did not initialise: {e}"
                return None
            self._nvml = pynvml
            return pynvml

    def available(self) -> bool:
        return self._init() is not None

    @property
    def error(self) -> str | None:
        """Why NVML is unusable, once that has been found out."""
        return self._error

    def gpus(self) -> list[GpuInfo]:
        nv = self._init()
        if nv is None:
            return []
        out: list[GpuInfo] = []
        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError as e:
            log.warning("nvml: cannot count devices: %s", e)
            return []
        for i in range(count):
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                name = _text(nv.nvmlDeviceGetName(h))
                uuid = _text(nv.nvmlDeviceGetUUID(h))
            except nv.NVMLError as e:
                # A GPU that fell off the bus or is in a bad state: skip it
                # rather than failing every placement decision.
                log.warning("nvml: skipping GPU %d: %s", i, e)
                continue
            out.append(GpuInfo(i, name, uuid, int(mem.total), int(mem.free), int(mem.used)))
        return out

    def system(self) -> SystemMemory:
        return _host_system()

    def process_memory(self, pid: int) -> ProcessMemory:
        rss, rss_file = _host_process_memory(pid)
        return ProcessMemory(rss=rss, rss_file=rss_file, gpu=self._gpu_by_pid(pid))

    def _gpu_by_pid(self, pid: int) -> dict[int, int]:
        nv = self._init()
        if nv is None or not self._per_process_supported:
            return {}
        out: dict[int, int] = {}
        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError:
            return {}
        for i in range(count):
            try:
                procs = nv.nvmlDeviceGetComputeRunningProcesses(nv.nvmlDeviceGetHandleByIndex(i))
            except nv.NVMLError_NotSupported:  # type: ignore[attr-defined]
                self._per_process_supported = False
                log.info("nvml: per-process GPU memory is not supported here")
                return {}
            except nv.NVMLError as e:
                log.debug("nvml: compute processes of GPU %d: %s", i, e)
                continue
            for p in procs:
                used = getattr(p, "usedGpuMemory", None)
                # None: not available (e.g. inside some containers).
                if p.pid == pid and used is not None:
                    out[i] = out.get(i, 0) + int(used)
        return out

    def close(self) -> None:
        with self._lock:
            if self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except self._nvml.NVMLError:
                    pass
            self._nvml = None
            self._error = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def detect_source() -> DeviceSource:
    """NVML when it initialises and sees at least one GPU, psutil alone otherwise."""
    nvml = NvmlSource()
    gpus = nvml.gpus()
    if gpus:
        log.info(
            "devices: using NVML, %d GPU(s): %s",
            len(gpus),
            ", ".join(f"{g.index}:{g.name} {g.total // 2**20} MiB" for g in gpus),
        )
        return nvml
    reason = nvml.error or "NVML reports no GPUs"
    nvml.close()
    log.info("devices: CPU only (%s)", reason)
    return CpuSource()


# ------------------------------------------------------------------ simulation


class ManualClock:
    """A clock that moves only when told, so timing logic is tested without waiting.

    `sleep` advances the clock and yields to the event loop once, so code
    written as `await sleep(x)` in a polling loop runs instantly in tests
    while seeing time pass exactly as it would.
    """

    def __init__(self, start: float = 0.0):
        self._now = start

    def __call__(self) -> float:
        return self._now

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self.advance(max(seconds, 0.0))
        await asyncio.sleep(0)


@dataclass
class _SimGpu:
    index: int
    name: str
    total: int
    used_by_others: int  # memory not attributable to any simulated process
    by_pid: dict[int | None, int] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return self.used_by_others + sum(self.by_pid.values())


@dataclass
class _PendingRelease:
    due: float
    gpu: int
    nbytes: int
    pid: int | None


class SimulatedOOM(MemoryError):
    """An allocation larger than the simulated GPU's free memory."""


class SimulatedSource:
    """A model of GPUs and RAM for tests and development.

    Memory is allocated per GPU and process; a release can be delayed and
    split into steps, as a real driver returns memory some time after a
    process exits.  Pending releases are applied whenever a reading is taken,
    according to `clock` (a `ManualClock` in tests, `time.monotonic` for a
    demo against real time).
    """

    def __init__(
        self,
        gpus: list[tuple[int, int]] | None = None,
        *,
        names: list[str] | None = None,
        system_total: int = 64 * 2**30,
        system_available: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """`gpus` is a list of (total, free) bytes; the difference is used by "others"."""
        self.clock = clock
        self._gpus: list[_SimGpu] = []
        for i, (total, free) in enumerate(gpus or []):
            if not 0 <= free <= total:
                raise ValueError(f"GPU {i}: free ({free}) must be between 0 and total ({total})")
            name = names[i] if names and i < len(names) else "Simulated GPU"
            self._gpus.append(_SimGpu(i, name, total, total - free))
        self._pending: list[_PendingRelease] = []
        self._system_total = system_total
        self._system_available = system_total if system_available is None else system_available
        self._rss: dict[int, tuple[int, int]] = {}
        self.closed = False
        self.readings = 0  # how many times gpus() was read; tests use it to check polling

    # -- the DeviceSource side

    def gpus(self) -> list[GpuInfo]:
        self._settle()
        self.readings += 1
        return [
            GpuInfo(g.index, g.name, f"GPU-sim-{g.index}", g.total, g.total - g.used, g.used)
            for g in self._gpus
        ]

    def system(self) -> SystemMemory:
        return SystemMemory(self._system_total, self._system_available)

    def process_memory(self, pid: int) -> ProcessMemory:
        self._settle()
        gpu = {g.index: g.by_pid[pid] for g in self._gpus if g.by_pid.get(pid)}
        if pid not in self._rss and not gpu:
            raise ProcessLookupError(pid)
        rss, rss_file = self._rss.get(pid, (0, 0))
        return ProcessMemory(rss=rss, rss_file=rss_file, gpu=gpu)

    def close(self) -> None:
        self.closed = True

    # -- driving the model

    def allocate(self, gpu: int, nbytes: int, pid: int | None = None) -> None:
        """Take `nbytes` on `gpu` for `pid` (None: some process we do not track)."""
        self._settle()
        g = self._gpu(gpu)
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        free = g.total - g.used
        if nbytes > free:
            raise SimulatedOOM(f"GPU {gpu}: cannot allocate {nbytes} bytes, {free} free")
        g.by_pid[pid] = g.by_pid.get(pid, 0) + nbytes

    def release(
        self,
        gpu: int,
        nbytes: int | None = None,
        pid: int | None = None,
        *,
        after: float = 0.0,
        steps: int = 1,
    ) -> None:
        """Give back `nbytes` (default: all that `pid` holds) over `after` seconds.

        With `steps` > 1 the memory comes back in equal parts at evenly spaced
        times, the last part at `after`.  Releasing less than was allocated
        models a driver that keeps some of a dead process's memory.
        """
        self._settle()
        g = self._gpu(gpu)
        promised = sum(p.nbytes for p in self._pending if p.gpu == gpu and p.pid == pid)
        held = g.by_pid.get(pid, 0) - promised
        amount = held if nbytes is None else nbytes
        if not 0 <= amount <= held:
            raise ValueError(f"GPU {gpu}: pid {pid} holds {held} bytes, cannot release {amount}")
        if steps < 1:
            raise ValueError("steps must be >= 1")
        now = self.clock()
        part, rest = divmod(amount, steps)
        for k in range(1, steps + 1):
            chunk = part + (rest if k == steps else 0)
            due = now + after * k / steps
            self._pending.append(_PendingRelease(due, gpu, chunk, pid))
        self._pending.sort(key=lambda p: p.due)  # stable: equal times keep their order
        self._settle()

    def exit_process(self, pid: int, *, after: float = 0.0, steps: int = 1) -> None:
        """A process ends: all its GPU memory returns over `after` seconds, its RSS at once."""
        for g in self._gpus:
            if g.by_pid.get(pid):
                self.release(g.index, None, pid, after=after, steps=steps)
        self._rss.pop(pid, None)

    def set_rss(self, pid: int, rss: int, rss_file: int = 0) -> None:
        self._rss[pid] = (rss, rss_file)

    def set_system(self, *, total: int | None = None, available: int | None = None) -> None:
        if total is not None:
            self._system_total = total
        if available is not None:
            self._system_available = available

    def pending(self) -> int:
        """Bytes scheduled to come back but not yet returned."""
        return sum(p.nbytes for p in self._pending)

    def _gpu(self, index: int) -> _SimGpu:
        if not 0 <= index < len(self._gpus):
            raise IndexError(f"no simulated GPU {index} (have {len(self._gpus)})")
        return self._gpus[index]

    def _settle(self) -> None:
        """Apply every release whose time has come."""
        now = self.clock()
        while self._pending and self._pending[0].due <= now:
            p = self._pending.pop(0)
            g = self._gpus[p.gpu]
            left = g.by_pid.get(p.pid, 0) - p.nbytes
            if left > 0:
                g.by_pid[p.pid] = left
            else:
                g.by_pid.pop(p.pid, None)
