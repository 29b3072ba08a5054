"""Memory estimates for a runner, where to put its layers, and what a set of runners costs.

Everything here is arithmetic on a `ModelInfo` (from gguf.py) and mirrors
what the llama.cpp vendored by llama-cpp-python 0.3.x does:

* Weights.  Repeating layer N holds the tensors `blk.N.*`.  The input layer
  (token_embd) always stays on the CPU.  The output layer (output_norm +
  output) counts as layer n_layers and is the *first* one offloaded:
  llama.cpp computes `i_gpu_start = n_layers + 1 - n_gpu_layers`, so
  n_gpu_layers=k puts the output plus the last k-1 repeating layers on GPU
  and "all layers" is n_layers + 1.  A model without output.weight (tied
  embeddings) gets the output from token_embd, which is then copied to the
  GPU while the CPU keeps the input copy.  On the CPU weights are mmap'd:
  the pages are file-backed and shared by every runner of the same file.
* KV cache.  cells × Σ_layers (row(type_k, n_head_kv·key_length) +
  row(type_v, n_head_kv·value_length)), cells = n_ctx × parallel_slots
  padded to 256.  f16 rows are 2 bytes/element, q8_0 34 bytes per 32,
  q4_0 18 bytes per 32.  Sliding-window layers get the full n_ctx too:
  llama_cpp.server does not set swa_full and llama.cpp's default context
  parameters use the full-size SWA cache (the log says "using full-size SWA
  cache").  Each layer's cache lives with the layer (offload_kqv).
* Compute buffer: see `compute_bytes`.
* Logits.  llama.cpp keeps n_vocab floats per output row on the host;
  llama_cpp.server defaults to logits_all=True, which also makes
  llama-cpp-python keep an (n_ctx × n_vocab) float32 `scores` array that
  fills up as the context does: 2 GiB at n_ctx 2048 for a 262k vocabulary.
* Fixed overheads: `CPU_RUNTIME_OVERHEAD` per process (+ vocabulary tables),
  `GPU_CONTEXT_OVERHEAD` per GPU a runner uses.

Calibrated against llama_cpp.server (llama-cpp-python 0.3.36) running the
Gemma 3 270M Q4_K_M demo model on CPU; RSS after a prompt filling 90% of
the context (`python scripts/bench.py memory`), estimate for a full one:

    n_ctx  logits_all  estimate    RSS after load  RSS after prompt
    2048   False         443.9 MiB   406.6 MiB        448.9 MiB  (-1%)
    8192   False         659.9 MiB   514.7 MiB        651.9 MiB  (+1%)
    2048   True         3473.7 MiB   406.7 MiB       3282.8 MiB  (+6%)
    8192   True         9725.7 MiB   514.9 MiB       8948.5 MiB  (+9%)

Not modelled: llama.cpp's CPU repacking of some quantized tensors into
anonymous memory (12.7 MiB for the demo model, inside the overhead),
MoE expert routing buffers, MLA caches (DeepSeek's kv_lora_rank),
recurrent-state models, and multimodal projectors.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable, Literal, Mapping, Sequence

from .devices import DeviceSource, GpuInfo, ProcessMemory
from .gguf import ModelInfo

log = logging.getLogger(__name__)

MiB = 1 << 20
F32 = 4

# (elements per block, bytes per block) of the KV cache types llama.cpp accepts.
KV_CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "iq4_nl": (32, 18),
}

# llama.cpp pads the context (KV cells) to a multiple of this.
N_CTX_PAD = 256
# Output rows an embedding context reserves at most when it is created.
EMBEDDING_OUTPUT_ROWS = 256

# Resident memory of a llama_cpp.server process that does not depend on the
# model: CPython + numpy + FastAPI/uvicorn + the llama.cpp/ggml libraries
# and their thread pools.  Calibrated on the demo model: RSS after load was
# 406.6 MiB = 235.2 MiB weights (mmap) + 36 MiB KV + 12.7 MiB repacked
# Q4_K copies + ~32 MiB vocabulary tables + ~91 MiB for the rest.
CPU_RUNTIME_OVERHEAD = 96 * MiB
# llama.cpp's vocabulary (id→token strings, token→id map, piece cache)
# grows with the vocabulary: ~32 MiB for Gemma's 262k tokens.
VOCAB_BYTES_PER_TOKEN = 128
# A CUDA context with cuBLAS loaded takes roughly 300-500 MiB per GPU before
# any buffer is allocated; the middle of that range.
GPU_CONTEXT_OVERHEAD = 384 * MiB


def kv_row_bytes(cache_type: str, n_elements: int) -> int:
    """Bytes for `n_elements` values of one KV cache row in `cache_type`."""
    try:
        block, size = KV_CACHE_TYPES[cache_type.lower()]
    except KeyError:
        raise ValueError(f"unknown KV cache type {cache_type!r}; known: {', '.join(KV_CACHE_TYPES)}") from None
    if n_elements % block:
        raise ValueError(
            f"KV cache type {cache_type} needs rows that are a multiple of {block} elements, got {n_elements}"
        )
    return n_elements // block * size


def kv_cells(n_ctx: int, parallel_slots: int = 1) -> int:
    """KV cells llama.cpp allocates: each slot gets n_ctx, padded to 256."""
    total = max(n_ctx, 1) * max(parallel_slots, 1)
    return (total + N_CTX_PAD - 1) // N_CTX_PAD * N_CTX_PAD


def kv_layer_bytes(info: ModelInfo, layer: int, cells: int, cache_type_k: str, cache_type_v: str) -> int:
    heads = info.kv_heads_per_layer[layer] if layer < len(info.kv_heads_per_layer) else info.head_count_kv
    if heads <= 0:
        return 0
    return cells * (
        kv_row_bytes(cache_type_k, heads * info.key_length) + kv_row_bytes(cache_type_v, heads * info.value_length)
    )


def compute_bytes(
    info: ModelInfo,
    *,
    n_ubatch: int,
    n_kv: int,
    n_outputs: int,
    flash_attn: bool = False,
    with_output: bool = True,
) -> int:
    """Peak size of llama.cpp's compute (activation) buffer on one device.

    ggml's graph allocator reuses memory, so the buffer is roughly the
    largest live set at any stage of the graph, not the sum of all tensors:

    * attention: the KQ scores and their softmax, f32 n_kv × n_ubatch ×
      n_head each, plus the f32 mask (n_kv × n_ubatch) and the q / output
      activations.  Flash attention never materialises KQ.
    * feed-forward: gate, up and their product, n_ubatch × n_ff f32 each.
    * output: n_outputs × n_vocab f32 logits.  When reserving, llama.cpp
      plans for n_outputs = n_ubatch (514.5 MiB for Gemma 3's 262k vocab at
      n_ubatch 512, which is exactly what its log prints).

    All stages also hold ~3 n_ubatch × n_embd f32 hidden states.  Pass
    `with_output=False` for a device that holds layers but not the output.
    """
    e = info.embedding_length
    hidden = 3 * n_ubatch * e * F32
    q_and_out = 2 * n_ubatch * info.head_count * max(info.key_length, info.value_length) * F32
    if flash_attn:
        attn = n_kv * n_ubatch * 2 + q_and_out  # f16 mask
    else:
        attn = 2 * n_kv * n_ubatch * info.head_count * F32 + n_kv * n_ubatch * F32 + q_and_out
    ffn = 3 * n_ubatch * info.feed_forward_length * F32
    peak = hidden + max(attn, ffn)
    if with_output:
        vocab = info.vocab_size or 0
        peak = max(peak, n_outputs * vocab * F32 + 2 * n_ubatch * e * F32)
    return peak


@dataclass(frozen=True)
class Estimate:
    """Bytes a runner needs, by kind and by device.

    CPU figures are what ends up resident (RSS), GPU figures what gets
    allocated (VRAM is committed at allocation).  `weights_cpu` is
    file-backed and shared between runners of the same file; the rest of
    `cpu_bytes` is private to the process.
    """

    n_ctx: int  # KV cells (n_ctx × slots, padded)
    n_gpu_layers: int  # layers actually offloaded, 0 .. n_layers + 1 (the +1 is the output layer)
    weights_total: int
    weights_gpu: int
    weights_cpu: int
    kv_cache: int
    kv_gpu: int
    kv_cpu: int
    compute_cpu: int
    compute_gpu: int
    logits_cpu: int
    overhead_cpu: int
    overhead_gpu: int  # summed over the GPUs used
    cpu_bytes: int
    gpu_bytes: list[int]  # one entry per tensor_split part; [] when nothing is offloaded

    @property
    def total(self) -> int:
        return self.cpu_bytes + sum(self.gpu_bytes)

    @property
    def cpu_private(self) -> int:
        """RAM that is this runner's alone (everything but the mmap'd weights)."""
        return self.cpu_bytes - self.weights_cpu


def _effective_layers(n_gpu_layers: int, n_layers: int) -> int:
    """-1 (or anything above n_layers + 1) means all layers including the output."""
    if n_gpu_layers < 0 or n_gpu_layers > n_layers + 1:
        return n_layers + 1
    return n_gpu_layers


def layer_devices(n_layers: int, n_gpu_layers: int, tensor_split: Sequence[float] | None) -> list[int | None]:
    """Device of each layer 0..n_layers (the last entry is the output layer).

    None means CPU; an integer is a position in `tensor_split`.  Same rule
    as llama.cpp's load_tensors: layer il goes to the first part whose
    cumulative split share exceeds (il - i_gpu_start) / n_offloaded.
    """
    n = _effective_layers(n_gpu_layers, n_layers)
    parts = list(tensor_split) if tensor_split else [1.0]
    total = sum(parts)
    if n == 0 or total <= 0:
        return [None] * (n_layers + 1)
    cumulative, acc = [], 0.0
    for s in parts:
        acc += s
        cumulative.append(acc / total)
    start = n_layers + 1 - n
    out: list[int | None] = []
    for il in range(n_layers + 1):
        if il < start:
            out.append(None)
        else:
            pos = bisect.bisect_right(cumulative, (il - start) / n)
            out.append(min(pos, len(parts) - 1))
    return out


def estimate(
    info: ModelInfo,
    *,
    n_ctx: int,
    n_batch: int = 512,
    n_ubatch: int = 512,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
    n_gpu_layers: int,
    parallel_slots: int = 1,
    tensor_split: Sequence[float] | None = None,
    flash_attn: bool = False,
    logits_all: bool = True,
    embedding: bool = False,
) -> Estimate:
    """Estimate a runner's memory.

    `n_ctx` <= 0 means the trained context.  `tensor_split` (shares per GPU)
    only matters with several GPUs; without it the offloaded layers are on
    one GPU.  `logits_all` must match what the runner passes to
    llama_cpp.server; the default is llama_cpp.server's own (True), which
    costs n_ctx × n_vocab × 4 bytes of RAM (see the module docstring).
    """
    n_layers = info.block_count
    if n_ctx <= 0:
        n_ctx = info.context_length or 2048
    # llama.cpp clamps n_batch to n_ctx and n_ubatch to n_batch.
    n_batch = max(1, min(n_batch, n_ctx))
    n_ubatch = max(1, min(n_ubatch, n_batch))
    cells = kv_cells(n_ctx, parallel_slots)
    n_parts = len(tensor_split) if tensor_split else 1
    devices = layer_devices(n_layers, n_gpu_layers, tensor_split)
    n_offloaded = sum(d is not None for d in devices)

    gpu_weights = [0] * n_parts
    gpu_kv = [0] * n_parts
    kv_cpu = 0
    for il in range(n_layers):
        dev = devices[il]
        w = info.layer_bytes[il] if il < len(info.layer_bytes) else 0
        kv = kv_layer_bytes(info, il, cells, cache_type_k, cache_type_v)
        if dev is None:
            kv_cpu += kv
        else:
            gpu_weights[dev] += w
            gpu_kv[dev] += kv

    out_dev = devices[n_layers]
    weights_cpu = info.weight_bytes - sum(gpu_weights)
    if out_dev is not None:
        gpu_weights[out_dev] += info.output_bytes
        # A tied output is a GPU copy of token_embd; the CPU keeps the original.
        weights_cpu -= info.output_bytes - (info.token_embd_bytes if info.output_tied else 0)

    vocab = info.vocab_size or 0
    # Host-side logits: llama.cpp's output buffer (one row per output of a
    # batch) and, with logits_all, llama-cpp-python's n_ctx × n_vocab scores.
    # An embedding context reserves min(n_batch, 256) rows of logits plus
    # embeddings up front (llama.cpp logs 128.31 MiB at n_batch 128 and
    # 256.62 MiB from 512 up for Gemma 3's 262k vocabulary), all resident.
    if embedding:
        logits_cpu = (vocab + info.embedding_length) * F32 * min(n_batch, EMBEDDING_OUTPUT_ROWS)
    else:
        logits_cpu = vocab * F32 * (n_batch if logits_all else 1)
    if logits_all:
        logits_cpu += cells * vocab * F32
    outputs_in_use = n_ubatch if logits_all else 1

    used = [p for p in range(n_parts) if any(d == p for d in devices)]
    gpu_compute = [0] * n_parts
    for p in used:
        # VRAM is committed at reservation time: count the full reserve,
        # which plans for n_ubatch outputs on the device with the output.
        gpu_compute[p] = compute_bytes(
            info, n_ubatch=n_ubatch, n_kv=cells, n_outputs=n_ubatch, flash_attn=flash_attn, with_output=p == out_dev
        )
    if out_dev is None or n_offloaded <= n_layers:
        # Some layers (or the output) run on the CPU.  Only the pages that
        # real graphs touch become resident, hence the outputs actually used.
        compute_cpu = compute_bytes(
            info,
            n_ubatch=n_ubatch,
            n_kv=cells,
            n_outputs=outputs_in_use,
            flash_attn=flash_attn,
            with_output=out_dev is None,
        )
    else:
        # Everything on GPU: the host only stages inputs (embeddings get_rows).
        compute_cpu = 2 * n_ubatch * info.embedding_length * F32

    overhead_cpu = CPU_RUNTIME_OVERHEAD + vocab * VOCAB_BYTES_PER_TOKEN
    gpu_bytes = [
        gpu_weights[p] + gpu_kv[p] + gpu_compute[p] + (GPU_CONTEXT_OVERHEAD if p in used else 0)
        for p in range(n_parts)
    ]
    kv_gpu = sum(gpu_kv)
    cpu_bytes = weights_cpu + kv_cpu + compute_cpu + logits_cpu + overhead_cpu
    return Estimate(
        n_ctx=cells,
        n_gpu_layers=n_offloaded,
        weights_total=info.weight_bytes,
        weights_gpu=sum(gpu_weights),
        weights_cpu=weights_cpu,
        kv_cache=kv_cpu + kv_gpu,
        kv_gpu=kv_gpu,
        kv_cpu=kv_cpu,
        compute_cpu=compute_cpu,
        compute_gpu=sum(gpu_compute),
        logits_cpu=logits_cpu,
        overhead_cpu=overhead_cpu,
        overhead_gpu=GPU_CONTEXT_OVERHEAD * len(used),
        cpu_bytes=cpu_bytes,
        gpu_bytes=gpu_bytes if n_offloaded else [],
    )


# ------------------------------------------------------------------ placement


@dataclass(frozen=True)
class Placement:
    """Where a runner's layers go and what that costs per device.

    `n_gpu_layers` is what to pass to the runner (-1 stays -1);
    `estimate.n_gpu_layers` is what will actually be offloaded.
    `tensor_split` has one share per GPU in the order of the `gpus` given
    to place() (0 for GPUs not used), or None with fewer than two GPUs.
    `fits` is False only for an explicit layer count that does not fit.
    """

    n_gpu_layers: int
    tensor_split: list[float] | None
    estimate: Estimate
    gpu_bytes: dict[int, int]  # GPU index → bytes
    fits: bool = True

    def footprint(self, key: str) -> RunnerFootprint:
        return RunnerFootprint(key, self.estimate.weights_cpu, self.estimate.cpu_bytes, dict(self.gpu_bytes))


def place(
    info: ModelInfo,
    *,
    n_ctx: int,
    n_batch: int = 512,
    n_ubatch: int = 512,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
    requested_layers: int | Literal["auto"] = "auto",
    gpus: Sequence[GpuInfo],
    gpu_overhead: int = 0,
    parallel_slots: int = 1,
    flash_attn: bool = False,
    logits_all: bool = True,
    embedding: bool = False,
) -> Placement:
    """Decide n_gpu_layers and the tensor split.

    "auto" offloads as many layers as fit in the GPUs' free memory minus
    `gpu_overhead` each, splitting them across GPUs in proportion to that
    available memory; GPUs are tried largest first and one is added only if
    it lets more layers fit.  An explicit count is honoured as given (-1 =
    all), split in proportion to free memory like llama.cpp's default, and
    `fits` reports whether it fits.
    """
    kw = dict(
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        cache_type_k=cache_type_k,
        cache_type_v=cache_type_v,
        parallel_slots=parallel_slots,
        flash_attn=flash_attn,
        logits_all=logits_all,
        embedding=embedding,
    )
    n_layers = info.block_count
    avail = {g.index: max(g.free - gpu_overhead, 0) for g in gpus}

    if requested_layers != "auto":
        requested = int(requested_layers)
        if not gpus:
            return Placement(requested, None, estimate(info, n_gpu_layers=0, **kw), {}, fits=True)
        shares = [float(avail[g.index]) for g in gpus]
        if sum(shares) <= 0:
            shares = [1.0] * len(gpus)
        split = shares if len(gpus) > 1 else None
        est = estimate(info, n_gpu_layers=requested, tensor_split=split, **kw)
        by_index = _by_index(est, gpus)
        fits = all(b <= avail[i] for i, b in by_index.items())
        return Placement(requested, _normalise(split), est, by_index, fits=fits)

    best = Placement(0, None, estimate(info, n_gpu_layers=0, **kw), {})
    ranked = sorted(gpus, key=lambda g: avail[g.index], reverse=True)
    for k in range(1, len(ranked) + 1):
        if best.estimate.n_gpu_layers == n_layers + 1:
            break  # everything is offloaded already; more GPUs would only add overhead
        chosen = {g.index for g in ranked[:k]}
        shares = [float(avail[g.index]) if g.index in chosen else 0.0 for g in gpus]
        if sum(shares) <= 0:
            break
        split = shares if len(gpus) > 1 else None
        for n in range(n_layers + 1, best.estimate.n_gpu_layers, -1):
            est = estimate(info, n_gpu_layers=n, tensor_split=split, **kw)
            by_index = _by_index(est, gpus)
            if all(b <= avail[i] for i, b in by_index.items()):
                best = Placement(n, _normalise(split), est, by_index)
                break
    return best


def _by_index(est: Estimate, gpus: Sequence[GpuInfo]) -> dict[int, int]:
    return {gpus[p].index: b for p, b in enumerate(est.gpu_bytes) if b}


def _normalise(split: Sequence[float] | None) -> list[float] | None:
    if not split:
        return None
    total = sum(split)
    return [s / total for s in split]


# ------------------------------------------------------------------ accounting


@dataclass(frozen=True)
class RunnerFootprint:
    """One runner as the accountant sees it.

    `cpu_bytes` is all the RAM the runner needs, `weights_cpu` the part of
    it that is mmap'd weights.  `key` identifies the weights file (its
    resolved path): runners with the same key share those pages through the
    page cache, so they are counted once for all of them.
    """

    key: str
    weights_cpu: int
    cpu_bytes: int
    gpu_bytes: Mapping[int, int] = field(default_factory=dict)

    @property
    def private_cpu(self) -> int:
        return max(self.cpu_bytes - self.weights_cpu, 0)

    @classmethod
    def from_estimate(cls, key: str, est: Estimate, gpu_indices: Sequence[int] = ()) -> RunnerFootprint:
        """`gpu_indices[p]` is the GPU index of tensor_split part p (default 0, 1, ...)."""
        idx = list(gpu_indices) or list(range(len(est.gpu_bytes)))
        gpu = {idx[p]: b for p, b in enumerate(est.gpu_bytes) if b}
        return cls(key, est.weights_cpu, est.cpu_bytes, gpu)

    @classmethod
    def measured(cls, key: str, mem: ProcessMemory) -> RunnerFootprint:
        """From a live runner: the file-backed RSS is the shared part."""
        return cls(key, min(mem.rss_file, mem.rss), mem.rss, dict(mem.gpu))


@dataclass(frozen=True)
class Usage:
    cpu_bytes: int
    gpu_bytes: dict[int, int]


def usage(runners: Iterable[RunnerFootprint]) -> Usage:
    """Total memory of a set of runners, counting each file's shared pages once.

    Runners of one file may map different amounts of it (different
    offload); the largest mapping stands for all of them.
    """
    shared: dict[str, int] = {}
    private = 0
    gpu: dict[int, int] = {}
    for r in runners:
        shared[r.key] = max(shared.get(r.key, 0), min(r.weights_cpu, r.cpu_bytes))
        private += r.private_cpu
        for i, b in r.gpu_bytes.items():
            gpu[i] = gpu.get(i, 0) + b
    return Usage(cpu_bytes=private + sum(shared.values()), gpu_bytes=gpu)


# ------------------------------------------------------------------ recovery


async def wait_for_recovery(
    source: DeviceSource,
    *,
    gpu_bytes: Mapping[int, int],
    baseline: Mapping[int, int],
    fraction: float = 0.75,
    poll: float = 0.25,
    timeout: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> bool:
    """Wait until a stopped runner's GPU memory is mostly back.

    A GPU gives memory back some time after the process exits; placing the
    next model before that would see too little free memory and offload
    fewer layers (or fail).  `baseline` is each GPU's free bytes measured
    just before the stop and `gpu_bytes` what the runner held there; a GPU
    has recovered when free - baseline >= fraction × held.  Returns True
    once all have (at once for a CPU-only runner), False after `timeout`.
    """
    wanted = {i: int(b * fraction) for i, b in gpu_bytes.items() if b > 0}
    if not wanted:
        return True
    missing = [i for i in wanted if i not in baseline]
    if missing:
        raise ValueError(f"no baseline free memory for GPU(s) {missing}")
    start = clock()
    while True:
        free = {g.index: g.free for g in source.gpus()}
        pending = {i: need for i, need in wanted.items() if free.get(i, baseline[i]) - baseline[i] < need}
        if not pending:
            return True
        remaining = timeout - (clock() - start)
        if remaining <= 0:
            log.debug("memory recovery timed out after %.2fs; still waiting on GPU(s) %s", timeout, sorted(pending))
            return False
        await sleep(min(poll, remaining))
