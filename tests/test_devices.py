"""Device sources: psutil on this machine, NVML through a scripted pynvml, and the simulated GPU model."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from dataclasses import dataclass
from typing import Any

import pytest

from hoshikage_sup.devices import (
    CpuSource,
    DeviceSource,
    GpuInfo,
    ManualClock,
    NvmlSource,
    SimulatedOOM,
    SimulatedSource,
    detect_source,
)

GiB = 1 << 30
MiB = 1 << 20


# ------------------------------------------------------------------ CpuSource


def test_cpu_source_reads_this_machine() -> None:
    src = CpuSource()
    assert isinstance(src, DeviceSource)
    assert src.gpus() == []
    sm = src.system()
    assert 0 < sm.available <= sm.total
    me = src.process_memory(os.getpid())
    assert me.rss > 0
    assert 0 <= me.rss_file <= me.rss
    assert me.gpu == {}
    src.close()


def test_cpu_source_unknown_pid() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(ProcessLookupError):
        CpuSource().process_memory(child.pid)


# ------------------------------------------------------------------ NvmlSource with a scripted pynvml


class _NVMLError(Exception):
    pass


class _NotSupported(_NVMLError):
    pass


@dataclass
class _Mem:
    total: int
    free: int
    used: int


@dataclass
class _Proc:
    pid: int
    usedGpuMemory: int | None


def fake_pynvml(
    gpus: list[tuple[str, int, int]],
    procs: dict[int, list[_Proc]] | None = None,
    *,
    init_error: bool = False,
    procs_unsupported: bool = False,
) -> types.ModuleType:
    """A pynvml module with the calls NvmlSource makes, answering from `gpus` (name, total, free)."""
    m = types.ModuleType("pynvml")
    m.NVMLError = _NVMLError  # type: ignore[attr-defined]
    m.NVMLError_NotSupported = _NotSupported  # type: ignore[attr-defined]
    m.calls = []  # type: ignore[attr-defined]

    def init() -> None:
        m.calls.append("init")  # type: ignore[attr-defined]
        if init_error:
            raise _NVMLError("NVML Shared Library Not Found")

    def procs_of(h: int) -> list[_Proc]:
        if procs_unsupported:
            raise _NotSupported("Not Supported")
        return (procs or {}).get(h, [])

    m.nvmlInit = init  # type: ignore[attr-defined]
    m.nvmlShutdown = lambda: m.calls.append("shutdown")  # type: ignore[attr-defined]
    m.nvmlDeviceGetCount = lambda: len(gpus)  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    m.nvmlDeviceGetName = lambda h: gpus[h][0].encode()  # old versions return bytes  # type: ignore[attr-defined]
    m.nvmlDeviceGetUUID = lambda h: f"GPU-{h:04d}"  # type: ignore[attr-defined]
    m.nvmlDeviceGetMemoryInfo = lambda h: _Mem(gpus[h][1], gpus[h][2], gpus[h][1] - gpus[h][2])  # type: ignore[attr-defined]
    m.nvmlDeviceGetComputeRunningProcesses = procs_of  # type: ignore[attr-defined]
    return m


def test_nvml_source_reports_gpus_and_process_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    me = os.getpid()
    nv = fake_pynvml(
        [("NVIDIA H100", 80 * GiB, 70 * GiB), ("NVIDIA A10", 24 * GiB, 20 * GiB)],
        {0: [_Proc(me, 3 * GiB), _Proc(1, 5 * GiB)], 1: [_Proc(me, None), _Proc(me, 1 * GiB)]},
    )
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    src = NvmlSource()
    assert nv.calls == []  # lazy: nothing happens until first use
    gpus = src.gpus()
    assert gpus == [
        GpuInfo(0, "NVIDIA H100", "GPU-0000", 80 * GiB, 70 * GiB, 10 * GiB),
        GpuInfo(1, "NVIDIA A10", "GPU-0001", 24 * GiB, 20 * GiB, 4 * GiB),
    ]
    pm = src.process_memory(me)
    assert pm.rss > 0
    assert pm.gpu == {0: 3 * GiB, 1: 1 * GiB}  # None ("not available") entries are ignored
    src.close()
    assert nv.calls == ["init", "shutdown"]


def test_nvml_per_process_unsupported_gives_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([("g", GiB, GiB)], procs_unsupported=True))
    src = NvmlSource()
    assert src.process_memory(os.getpid()).gpu == {}
    assert src.process_memory(os.getpid()).gpu == {}  # remembered, no second attempt needed
    assert src.gpus()[0].free == GiB


def test_nvml_init_failure_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([("g", GiB, GiB)], init_error=True))
    src = NvmlSource()
    assert not src.available()
    assert src.gpus() == []
    assert "Library Not Found" in (src.error or "")
    assert src.process_memory(os.getpid()).gpu == {}


def test_detect_source_prefers_nvml_with_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([("g", GiB, GiB)]))
    assert isinstance(detect_source(), NvmlSource)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([]))
    assert isinstance(detect_source(), CpuSource)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([("g", GiB, GiB)], init_error=True))
    assert isinstance(detect_source(), CpuSource)


def test_detect_source_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    src = detect_source()
    assert isinstance(src, CpuSource)


def test_detect_source_on_this_machine() -> None:
    """Whatever this machine has, detection returns a working source."""
    src = detect_source()
    assert isinstance(src, (CpuSource, NvmlSource))
    for g in src.gpus():
        assert 0 <= g.free <= g.total
    src.close()


# ------------------------------------------------------------------ SimulatedSource


def sim(*gpus: tuple[int, int], **kw: Any) -> tuple[SimulatedSource, ManualClock]:
    clock = ManualClock()
    return SimulatedSource(list(gpus), clock=clock, **kw), clock


def test_simulated_source_is_a_device_source() -> None:
    src, _ = sim((8 * GiB, 6 * GiB))
    assert isinstance(src, DeviceSource)
    (g,) = src.gpus()
    assert (g.total, g.free, g.used) == (8 * GiB, 6 * GiB, 2 * GiB)


def test_allocate_and_oom() -> None:
    src, _ = sim((8 * GiB, 8 * GiB), (4 * GiB, 1 * GiB))
    src.allocate(0, 3 * GiB, pid=10)
    src.allocate(1, 1 * GiB, pid=10)
    assert [g.free for g in src.gpus()] == [5 * GiB, 0]
    with pytest.raises(SimulatedOOM):
        src.allocate(1, 1, pid=11)
    assert src.process_memory(10).gpu == {0: 3 * GiB, 1: 1 * GiB}
    with pytest.raises(ProcessLookupError):
        src.process_memory(11)


def test_delayed_release_in_steps() -> None:
    src, clock = sim((8 * GiB, 8 * GiB))
    src.allocate(0, 4 * GiB, pid=7)
    src.release(0, pid=7, after=2.0, steps=4)
    assert src.gpus()[0].free == 4 * GiB
    assert src.pending() == 4 * GiB
    clock.advance(0.5)
    assert src.gpus()[0].free == 5 * GiB
    clock.advance(1.0)
    assert src.gpus()[0].free == 7 * GiB
    clock.advance(0.5)
    assert src.gpus()[0].free == 8 * GiB
    assert src.pending() == 0
    with pytest.raises(ProcessLookupError):
        src.process_memory(7)


def test_partial_release_keeps_the_rest() -> None:
    src, clock = sim((8 * GiB, 8 * GiB))
    src.allocate(0, 4 * GiB, pid=7)
    src.release(0, 3 * GiB, pid=7, after=1.0)
    clock.advance(5)
    assert src.gpus()[0].free == 7 * GiB
    assert src.process_memory(7).gpu == {0: GiB}
    with pytest.raises(ValueError):
        src.release(0, 2 * GiB, pid=7)  # only 1 GiB is left to give back


def test_exit_process_releases_everywhere() -> None:
    src, clock = sim((8 * GiB, 8 * GiB), (8 * GiB, 8 * GiB))
    src.allocate(0, 2 * GiB, pid=3)
    src.allocate(1, 1 * GiB, pid=3)
    src.set_rss(3, 500 * MiB, 300 * MiB)
    assert src.process_memory(3).rss == 500 * MiB
    src.exit_process(3, after=1.0)
    assert [g.free for g in src.gpus()] == [6 * GiB, 7 * GiB]
    clock.advance(1.0)
    assert [g.free for g in src.gpus()] == [8 * GiB, 8 * GiB]


def test_simulated_system_memory() -> None:
    src, _ = sim(system_total=16 * GiB, system_available=10 * GiB)
    assert src.gpus() == []
    assert (src.system().total, src.system().available) == (16 * GiB, 10 * GiB)
    src.set_system(available=2 * GiB)
    assert src.system().available == 2 * GiB


def test_simulated_source_validates() -> None:
    with pytest.raises(ValueError):
        SimulatedSource([(GiB, 2 * GiB)])
    src, _ = sim((GiB, GiB))
    with pytest.raises(IndexError):
        src.allocate(3, 1)


async def test_manual_clock_sleep_advances_time() -> None:
    clock = ManualClock(100.0)
    await clock.sleep(0.25)
    assert clock() == 100.25
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_simulated_source_on_real_time() -> None:
    """With the default clock, a release with no delay is visible at once."""
    src = SimulatedSource([(GiB, GiB)])
    src.allocate(0, GiB // 2, pid=1)
    src.release(0, pid=1)
    assert src.gpus()[0].free == GiB

