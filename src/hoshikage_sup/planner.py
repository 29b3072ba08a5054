"""Memory awareness for the scheduler: placement, fitting, measuring, recovery.

The scheduler asks; this module reads the GGUF (`gguf.py`), estimates
(`memory.py`) and looks at the devices (`devices.py`).  It holds no runner
state of its own: every answer is computed from the replicas it is given and
what the devices report now.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable

from .config import Config, ModelConfig
from .devices import DeviceSource, GpuInfo
from .durations import format_size
from .gguf import ModelInfo, load_model_info, read_gguf
from .logs import get_logger
from .memory import RunnerFootprint, estimate, place, usage, wait_for_recovery

if TYPE_CHECKING:
    from .scheduler import Fit, LoadPlan, Replica, RunnerOptions

log = get_logger("hoshikage.memory")

QUANTIZED = ("q8_0", "q4_0")
POOLING_MEAN = 1  # llama.cpp's LLAMA_POOLING_TYPE_MEAN


def _flash_attn(options: Any) -> bool:
    """flash_attn "auto" is on, as llama.cpp's own "auto" is wherever the
    backend has it (the CPU and CUDA both do).  On a GPU it saves memory and
    is what quantized caches need; on the CPU it generates faster (the demo
    model on 2 cores: 49.9 vs 46.7 tokens/s, 1.08x, paired runs in one
    process)."""
    return True if options.flash_attn == "auto" else bool(options.flash_attn)


class MemoryPlanner:
    def __init__(self, config: Config, devices: DeviceSource):
        self.config = config
        self.devices = devices
        self._warned: set[str] = set()
        # RAM held for runners but by none of them (warm spares, staged copies
        # no runner maps); the runner pool sets it.  System RAM already shows it as used.
        self.extra_bytes: Callable[[], int] = lambda: 0

    # ------------------------------------------------------------ facts

    def info(self, model: ModelConfig) -> ModelInfo:
        return load_model_info(model.path)

    def gpus(self) -> list[GpuInfo]:
        with contextlib.suppress(Exception):
            return list(self.devices.gpus())
        return []

    def gpu_free(self) -> dict[int, int]:
        return {g.index: g.free for g in self.gpus()}

    # ------------------------------------------------------------ planning

    def _cache_types(self, model: ModelConfig, options: "RunnerOptions", flash: bool) -> tuple[str, str]:
        k, v = options.cache_type_k, options.cache_type_v
        if (k in QUANTIZED or v in QUANTIZED) and not flash:
            if model.name not in self._warned:
                self._warned.add(model.name)
                log.warning(
                    "quantized KV cache needs flash attention; using f16", model=model.name,
                    cache_type_k=k, cache_type_v=v,
                )
            return "f16", "f16"
        return k, v

    def plan(self, model: ModelConfig, options: "RunnerOptions", released: list["Replica"]) -> "LoadPlan":
        from .scheduler import LoadPlan

        info = self.info(model)
        n_ctx = options.n_ctx or info.context_length
        if model.rpc_servers:
            return self._plan_rpc(model, options, info, n_ctx)
        gpus = self._gpus_after(released)
        flash = _flash_attn(options)
        ctk, ctv = self._cache_types(model, options, flash)
        placement = place(
            info,
            n_ctx=n_ctx,
            n_batch=options.n_batch,
            cache_type_k=ctk,
            cache_type_v=ctv,
            requested_layers=options.n_gpu_layers,
            gpus=gpus,
            gpu_overhead=self.config.memory.gpu_overhead,
            flash_attn=flash,
            # runners start with logits_all off (RunnerSpec): estimate the same
            logits_all=False,
            embedding=model.embedding,
        )
        est = placement.estimate
        return LoadPlan(
            n_gpu_layers=placement.n_gpu_layers,
            tensor_split=tuple(placement.tensor_split) if placement.tensor_split else None,
            flash_attn=flash,
            cache_type_k=ctk,
            cache_type_v=ctv,
            n_ctx=n_ctx,
            cpu_bytes=est.cpu_bytes,
            gpu_bytes={i: b for i, b in placement.gpu_bytes.items() if b > 0},
            weights_key=str(model.path),
            weights_cpu=est.weights_cpu,
            pooling_type=self._pooling(model, info),
            detail={"estimate": est, "layers": info.block_count},
        )

    def _plan_rpc(self, model: ModelConfig, options: "RunnerOptions", info: ModelInfo, n_ctx: int) -> "LoadPlan":
        """A model whose offloaded layers go to llama.cpp RPC servers.

        llama.cpp lists RPC devices before local GPUs; the runner is given a
        `tensor_split` with one equal share per RPC server (and none for any
        local GPU), so the offloaded layers (all of them for "auto") land on
        the RPC hosts, evenly, and this box keeps the input layer, any layers
        not offloaded, its CPU compute buffer, the logits and the process
        itself.  Only that counts here (`cpu_bytes`; no local `gpu_bytes`);
        each host's share (weights, KV cache, compute buffer) is in
        `detail["rpc_bytes"]`, host by host, for the logs and status.  Those
        hosts' free memory is not known here: a host that cannot hold its
        share fails the load with llama.cpp's own error.
        """
        from .scheduler import LoadPlan

        hosts = list(model.rpc_servers)
        flash = _flash_attn(options)
        ctk, ctv = self._cache_types(model, options, flash)
        layers = -1 if options.n_gpu_layers == "auto" else int(options.n_gpu_layers)
        share = [1.0 / len(hosts)] * len(hosts)
        est = estimate(
            info, n_ctx=n_ctx, n_batch=options.n_batch, cache_type_k=ctk, cache_type_v=ctv,
            n_gpu_layers=layers, tensor_split=share if len(hosts) > 1 else None, flash_attn=flash,
            logits_all=False, embedding=model.embedding,
        )
        remote = {host: int(b) for host, b in zip(hosts, est.gpu_bytes)}
        return LoadPlan(
            n_gpu_layers=layers,
            tensor_split=tuple(share),
            flash_attn=flash,
            cache_type_k=ctk,
            cache_type_v=ctv,
            n_ctx=n_ctx,
            cpu_bytes=est.cpu_bytes,
            gpu_bytes={},
            weights_key=str(model.path),
            weights_cpu=est.weights_cpu,
            pooling_type=self._pooling(model, info),
            detail={"estimate": est, "layers": info.block_count, "rpc_bytes": remote},
        )

    def _pooling(self, model: ModelConfig, info: ModelInfo) -> int | None:
        """Mean pooling for an embedding runner whose GGUF declares none (a
        generative model): otherwise llama.cpp answers one vector per token."""
        if not model.embedding:
            return None
        declared = read_gguf(model.path).metadata.get(f"{info.architecture}.pooling_type")
        return None if declared else POOLING_MEAN

    def _gpus_after(self, released: list["Replica"]) -> list[GpuInfo]:
        """GPUs as they will be once the released replicas have stopped."""
        back: dict[int, int] = {}
        for r in released:
            for i, b in r.footprint_gpu().items():
                back[i] = back.get(i, 0) + b
        out = []
        for g in self.gpus():
            extra = min(back.get(g.index, 0), g.total - g.free)
            out.append(GpuInfo(g.index, g.name, g.uuid, g.total, g.free + extra, g.used - extra))
        return out

    # ------------------------------------------------------------ fitting

    def footprint(self, r: "Replica") -> RunnerFootprint:
        """The estimate while loading, the measured figure once up (refreshed
        at most once a second, since RSS grows as mmap'd pages are touched)."""
        if r.state == "ready" and time.monotonic() - r.measured_at > 1.0:
            with contextlib.suppress(Exception):
                self.measure(r)
        if r.measured is not None:
            fp = RunnerFootprint.measured(r.plan.weights_key, r.measured)
            return fp if fp.gpu_bytes else replace(fp, gpu_bytes=dict(r.plan.gpu_bytes))
        return self._candidate(r.plan)

    def _candidate(self, plan: "LoadPlan") -> RunnerFootprint:
        return RunnerFootprint(
            key=plan.weights_key,
            weights_cpu=plan.weights_cpu,
            cpu_bytes=plan.cpu_bytes,
            gpu_bytes=dict(plan.gpu_bytes),
        )

    def fits(self, plan: "LoadPlan", keep: list["Replica"], released: list["Replica"]) -> "Fit":
        from .scheduler import Fit

        mem = self.config.memory
        kept = [self.footprint(r) for r in keep]
        before = usage(kept)
        after = usage(kept + [self._candidate(plan)])
        added_cpu = after.cpu_bytes - before.cpu_bytes
        extra = self.extra_bytes() if mem.limit else 0
        if mem.limit and after.cpu_bytes + extra > mem.limit:
            left = max(0, mem.limit - before.cpu_bytes - extra)
            return Fit(
                False, needed=added_cpu, available=left,
                reason=f"needs {format_size(added_cpu)} more, the memory limit leaves {format_size(left)}",
            )
        # What stopping the released replicas gives back (weights they share
        # with a kept replica stay in memory).
        freed_cpu = usage(kept + [self.footprint(r) for r in released]).cpu_bytes - before.cpu_bytes
        system = self.devices.system()
        room = system.available + freed_cpu - mem.system_reserve
        if added_cpu > room:
            return Fit(
                False, needed=added_cpu, available=max(0, room),
                reason=f"needs {format_size(added_cpu)} of RAM, {format_size(max(0, room))} available after the system reserve",
            )
        gpus = {g.index: g for g in self._gpus_after(released)}
        for index, need in plan.gpu_bytes.items():
            g = gpus.get(index)
            room_gpu = (g.free if g else 0) - mem.gpu_overhead
            if need > room_gpu:
                return Fit(
                    False, needed=need, available=max(0, room_gpu),
                    reason=f"needs {format_size(need)} on GPU {index}, {format_size(max(0, room_gpu))} free",
                )
        return Fit(True, needed=added_cpu + sum(plan.gpu_bytes.values()))

    def fits_alone(self, plan: "LoadPlan") -> "Fit":
        """Could the plan fit if every other runner were gone?  Judged against
        totals, so a model that can never run fails fast with the numbers."""
        from .scheduler import Fit

        mem = self.config.memory
        if mem.limit and plan.cpu_bytes > mem.limit:
            return Fit(
                False, needed=plan.cpu_bytes, available=mem.limit,
                reason=f"needs {format_size(plan.cpu_bytes)}, more than the memory limit of {format_size(mem.limit)}",
            )
        system = self.devices.system()
        room = system.total - mem.system_reserve
        if plan.cpu_bytes > room:
            return Fit(
                False, needed=plan.cpu_bytes, available=max(0, room),
                reason=f"needs {format_size(plan.cpu_bytes)} of RAM, the system has {format_size(system.total)} with {format_size(mem.system_reserve)} reserved",
            )
        totals = {g.index: g.total for g in self.gpus()}
        for index, need in plan.gpu_bytes.items():
            room_gpu = totals.get(index, 0) - mem.gpu_overhead
            if need > room_gpu:
                return Fit(
                    False, needed=need, available=max(0, room_gpu),
                    reason=f"needs {format_size(need)} on GPU {index}, which has {format_size(totals.get(index, 0))} in all",
                )
        return Fit(True, needed=plan.total)

    # ------------------------------------------------------------ measuring and recovery

    def measure(self, r: "Replica") -> None:
        """Replace the estimate by what the process really uses."""
        pid = r.process.pid
        if pid is None:
            return
        r.measured = self.devices.process_memory(pid)
        r.measured_at = time.monotonic()

    async def wait_for_recovery(self, r: "Replica", baseline: dict[int, int]) -> bool:
        mem = self.config.memory
        return await wait_for_recovery(
            self.devices,
            gpu_bytes=r.footprint_gpu(),
            fraction=0.75,
            poll=mem.recovery_poll,
            timeout=mem.recovery_timeout,
            baseline=baseline,
        )
