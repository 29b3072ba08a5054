"""Memory estimates, layer placement, accounting of runner sets, and waiting for GPU memory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hoshikage_sup.devices import GpuInfo, ManualClock, ProcessMemory, SimulatedSource
from hoshikage_sup.gguf import ModelInfo, load_model_info
from hoshikage_sup.memory import (
    CPU_RUNTIME_OVERHEAD,
    GPU_CONTEXT_OVERHEAD,
    VOCAB_BYTES_PER_TOKEN,
    RunnerFootprint,
    compute_bytes,
    estimate,
    kv_cells,
    kv_row_bytes,
    layer_devices,
    place,
    usage,
    wait_for_recovery,
)

MiB = 1 << 20
GiB = 1 << 30


def make_info(
    *,
    n_layers: int = 32,
    layer: int = 200 * MiB,
    embd: int = 4096,
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    ff: int = 14336,
    vocab: int = 128256,
    token_embd: int = 500 * MiB,
    output: int = 500 * MiB,
    tied: bool = False,
) -> ModelInfo:
    """A Llama-3-8B-shaped model with round weight sizes."""
    out_bytes = (token_embd if tied else output) + embd * 4
    non_layer = token_embd + embd * 4 + (0 if tied else output)
    return ModelInfo(
        path=Path("/models/synthetic.gguf"),
        file_size=n_layers * layer + non_layer + 10 * MiB,
        architecture="llama",
        name="synthetic",
        file_type=15,
        quantization="Q4_K_M",
        parameter_count=8_000_000_000,
        parameter_size="8.0B",
        context_length=8192,
        block_count=n_layers,
        embedding_length=embd,
        head_count=heads,
        head_count_kv=kv_heads,
        kv_heads_per_layer=(kv_heads,) * n_layers,
        key_length=head_dim,
        value_length=head_dim,
        feed_forward_length=ff,
        sliding_window=None,
        vocab_size=vocab,
        layer_bytes=(layer,) * n_layers,
        non_layer_bytes=non_layer,
        output_bytes=out_bytes,
        output_tied=tied,
        token_embd_bytes=token_embd,
        weight_bytes=n_layers * layer + non_layer,
        has_vision=False,
        has_chat_template=True,
    )


def gpu(index: int, free: int, total: int = 80 * GiB) -> GpuInfo:
    return GpuInfo(index, f"GPU{index}", f"GPU-{index}", total, free, total - free)


# ------------------------------------------------------------------ KV cache


def test_kv_cache_llama3_8b_f16_is_512_mib() -> None:
    """32 layers x 8 KV heads x 128 dims x (K+V) x 2 bytes x 4096 cells."""
    e = estimate(make_info(), n_ctx=4096, n_gpu_layers=0)
    assert e.kv_cache == 4096 * 32 * 8 * (128 + 128) * 2 == 512 * MiB
    assert e.kv_cpu == e.kv_cache and e.kv_gpu == 0


@pytest.mark.parametrize(
    ("k", "v", "expected"),
    [
        ("q8_0", "q8_0", 4096 * 32 * 2 * (1024 // 32 * 34)),  # 272 MiB
        ("q4_0", "q4_0", 4096 * 32 * 2 * (1024 // 32 * 18)),  # 144 MiB
        ("q8_0", "f16", 4096 * 32 * (1024 // 32 * 34 + 1024 * 2)),
        ("f32", "f32", 4096 * 32 * 2 * 1024 * 4),
    ],
)
def test_quantized_kv_cache_sizes(k: str, v: str, expected: int) -> None:
    assert estimate(make_info(), n_ctx=4096, n_gpu_layers=0, cache_type_k=k, cache_type_v=v).kv_cache == expected


def test_kv_rows_and_cells() -> None:
    assert kv_row_bytes("f16", 1024) == 2048
    assert kv_row_bytes("Q8_0", 64) == 68
    with pytest.raises(ValueError, match="multiple of 32"):
        kv_row_bytes("q4_0", 40)
    with pytest.raises(ValueError, match="unknown KV cache type"):
        kv_row_bytes("q3_k", 256)
    assert kv_cells(1000) == 1024  # llama.cpp pads to 256
    assert kv_cells(2048, parallel_slots=3) == 6144
    assert estimate(make_info(), n_ctx=1000, n_gpu_layers=0).n_ctx == 1024


def test_layers_without_kv_heads_have_no_cache() -> None:
    info = dataclasses.replace(make_info(n_layers=4), kv_heads_per_layer=(8, 0, 8, 0))
    assert estimate(info, n_ctx=256, n_gpu_layers=0).kv_cache == 2 * 256 * 8 * 256 * 2


def test_n_ctx_zero_means_trained_context() -> None:
    assert estimate(make_info(), n_ctx=0, n_gpu_layers=0).n_ctx == 8192


# ------------------------------------------------------------------ the demo model, against llama.cpp's own figures


def test_demo_model_matches_llama_cpp_buffers(demo_model: Path) -> None:
    """llama.cpp's log for this model at n_ctx 2048: KV 6 + 30 MiB, CPU compute buffer 514.50 MiB."""
    info = load_model_info(demo_model)
    e = estimate(info, n_ctx=2048, n_gpu_layers=0, logits_all=False)
    assert e.kv_cache == 36 * MiB
    assert e.weights_cpu == e.weights_total == info.weight_bytes
    reserve = compute_bytes(info, n_ubatch=512, n_kv=2048, n_outputs=512)
    assert reserve == int(514.5 * MiB)


@pytest.mark.parametrize(("n_ctx", "logits_all", "measured_mib"), [
    (2048, False, 448.9),
    (8192, False, 651.9),
    (2048, True, 3282.8),  # llama_cpp.server's default: an n_ctx x n_vocab float32 scores array
    (8192, True, 8948.5),
])
def test_demo_model_estimate_is_near_measured_rss(demo_model: Path, n_ctx: int, logits_all: bool, measured_mib: float) -> None:
    """RSS of llama_cpp.server (llama-cpp-python 0.3.36, CPU) after a prompt filling 90% of n_ctx.

    A calibration record: if the runtime changes, re-measure (scripts/bench.py memory) and update.
    """
    e = estimate(load_model_info(demo_model), n_ctx=n_ctx, n_gpu_layers=0, logits_all=logits_all)
    assert e.total == e.cpu_bytes
    assert abs(e.cpu_bytes / MiB - measured_mib) / measured_mib < 0.25


def test_logits_all_costs_n_ctx_rows_of_vocabulary(demo_model: Path) -> None:
    info = load_model_info(demo_model)
    off = estimate(info, n_ctx=2048, n_gpu_layers=0, logits_all=False)
    on = estimate(info, n_ctx=2048, n_gpu_layers=0, logits_all=True)
    assert on.logits_cpu - off.logits_cpu == (2048 + 512 - 1) * 262144 * 4
    assert on.compute_cpu == int(514.5 * MiB)  # the whole reserve gets touched


@pytest.mark.parametrize(("n_batch", "llama_cpp_mib"), [(128, 128.31), (512, 256.62), (1024, 256.62)])
def test_embedding_output_buffer_matches_llama_cpp(demo_model: Path, n_batch: int, llama_cpp_mib: float) -> None:
    """An embedding context reserves min(n_batch, 256) output rows of logits + embeddings
    (llama.cpp's "CPU output buffer size" line for the demo model, llama-cpp-python 0.3.36)."""
    info = load_model_info(demo_model)
    e = estimate(info, n_ctx=2048, n_batch=n_batch, n_gpu_layers=0, logits_all=False, embedding=True)
    assert round(e.logits_cpu / MiB, 2) == llama_cpp_mib
    plain = estimate(info, n_ctx=2048, n_batch=n_batch, n_gpu_layers=0, logits_all=False)
    assert plain.logits_cpu == 262144 * 4  # one row of logits: llama.cpp's 1.00 MiB


def test_demo_embedding_runner_estimate_is_near_measured_rss(demo_model: Path) -> None:
    """The demo model as an embedding runner (n_ctx 512, mean pooling): 634.7 MiB RSS measured."""
    e = estimate(load_model_info(demo_model), n_ctx=512, n_gpu_layers=0, logits_all=False, embedding=True)
    assert abs(e.cpu_bytes / MiB - 634.7) / 634.7 < 0.1


# ------------------------------------------------------------------ weights and layers


def test_cpu_only() -> None:
    info = make_info()
    e = estimate(info, n_ctx=2048, n_gpu_layers=0, logits_all=False)
    assert (e.n_gpu_layers, e.weights_gpu, e.gpu_bytes, e.compute_gpu, e.overhead_gpu) == (0, 0, [], 0, 0)
    assert e.weights_cpu == info.weight_bytes
    assert e.overhead_cpu == CPU_RUNTIME_OVERHEAD + info.vocab_size * VOCAB_BYTES_PER_TOKEN  # type: ignore[operator]
    assert e.cpu_bytes == e.weights_cpu + e.kv_cpu + e.compute_cpu + e.logits_cpu + e.overhead_cpu
    assert e.cpu_private == e.cpu_bytes - e.weights_cpu


def test_first_offloaded_layer_is_the_output() -> None:
    info = make_info()
    e = estimate(info, n_ctx=2048, n_gpu_layers=1)
    assert e.n_gpu_layers == 1
    assert e.weights_gpu == info.output_bytes
    assert e.weights_cpu == info.weight_bytes - info.output_bytes
    assert e.kv_gpu == 0  # the output layer has no KV cache


def test_tied_output_is_copied_not_moved() -> None:
    info = make_info(tied=True)
    e = estimate(info, n_ctx=2048, n_gpu_layers=1)
    assert e.weights_gpu == info.token_embd_bytes + 4096 * 4
    assert e.weights_cpu == info.weight_bytes - 4096 * 4  # token_embd stays for the input


@pytest.mark.parametrize("requested", [-1, 33, 1000])
def test_all_layers(requested: int) -> None:
    info = make_info()
    e = estimate(info, n_ctx=2048, n_gpu_layers=requested)
    assert e.n_gpu_layers == 33
    assert e.weights_gpu == 32 * 200 * MiB + info.output_bytes
    assert e.weights_cpu == info.token_embd_bytes
    assert e.kv_gpu == e.kv_cache and e.kv_cpu == 0
    assert e.overhead_gpu == GPU_CONTEXT_OVERHEAD
    assert len(e.gpu_bytes) == 1 and e.gpu_bytes[0] == e.weights_gpu + e.kv_gpu + e.compute_gpu + e.overhead_gpu


def test_partial_offload_takes_the_last_layers() -> None:
    info = make_info()
    e = estimate(info, n_ctx=2048, n_gpu_layers=11)  # output + blk.22..31
    assert e.weights_gpu == 10 * 200 * MiB + info.output_bytes
    assert e.kv_gpu == e.kv_cache * 10 // 32
    devs = layer_devices(32, 11, None)
    assert devs[:22] == [None] * 22 and devs[22:] == [0] * 11


def test_layer_devices_follow_the_split() -> None:
    devs = layer_devices(32, 33, [3.0, 1.0])
    assert devs.count(0) == 25 and devs.count(1) == 8  # 33 * 0.75 -> 24.75: layers 0..24 on the first GPU
    assert devs[-1] == 1  # the output goes with the last layers
    assert layer_devices(32, 0, [1.0, 1.0]) == [None] * 33


def test_multi_gpu_estimate_splits_bytes() -> None:
    info = make_info()
    e = estimate(info, n_ctx=2048, n_gpu_layers=-1, tensor_split=[0.5, 0.5])
    assert len(e.gpu_bytes) == 2
    assert e.overhead_gpu == 2 * GPU_CONTEXT_OVERHEAD
    # The second GPU also holds the output, and the logits in its compute buffer.
    assert e.gpu_bytes[1] > e.gpu_bytes[0]
    assert sum(e.gpu_bytes) == e.weights_gpu + e.kv_gpu + e.compute_gpu + e.overhead_gpu


def test_flash_attention_shrinks_compute_on_long_context() -> None:
    info = make_info()
    plain = compute_bytes(info, n_ubatch=512, n_kv=32768, n_outputs=1)
    flash = compute_bytes(info, n_ubatch=512, n_kv=32768, n_outputs=1, flash_attn=True)
    assert plain > 2 * 512 * 32768 * 32 * 4  # KQ and softmax, f32
    assert flash < plain / 10


# ------------------------------------------------------------------ placement


def test_place_without_gpus() -> None:
    p = place(make_info(), n_ctx=2048, gpus=[])
    assert (p.n_gpu_layers, p.tensor_split, p.gpu_bytes, p.fits) == (0, None, {}, True)
    assert p.estimate.gpu_bytes == []


def test_place_all_layers_on_a_big_gpu() -> None:
    p = place(make_info(), n_ctx=2048, gpus=[gpu(0, 70 * GiB)])
    assert p.n_gpu_layers == 33
    assert p.tensor_split is None
    assert p.gpu_bytes == {0: p.estimate.gpu_bytes[0]}


@pytest.mark.parametrize("k", [1, 6, 20, 32])
def test_place_partial_offload_exact_boundary(k: int) -> None:
    """Exactly enough free memory for k layers gives k; one byte less gives k-1."""
    info = make_info()
    need = estimate(info, n_ctx=2048, n_gpu_layers=k).gpu_bytes[0]
    assert place(info, n_ctx=2048, gpus=[gpu(0, need)]).n_gpu_layers == k
    assert place(info, n_ctx=2048, gpus=[gpu(0, need - 1)]).n_gpu_layers == k - 1


def test_place_partial_offload_by_hand() -> None:
    """No vocabulary and tiny activations, so the arithmetic can be done on paper."""
    info = dataclasses.replace(make_info(ff=64, heads=1, kv_heads=1, head_dim=64, embd=64), vocab_size=0)
    base = GPU_CONTEXT_OVERHEAD + info.output_bytes
    compute = estimate(info, n_ctx=256, n_gpu_layers=1).compute_gpu
    per_layer = 200 * MiB + 256 * 1 * (64 + 64) * 2  # weights + KV of one layer at 256 cells
    free = base + compute + 7 * per_layer + 100  # room for the output and 7 repeating layers
    p = place(info, n_ctx=256, gpus=[gpu(0, free)])
    assert p.n_gpu_layers == 8
    assert p.gpu_bytes[0] == free - 100


def test_gpu_overhead_is_reserved_on_each_gpu() -> None:
    info = make_info()
    need_all = estimate(info, n_ctx=2048, n_gpu_layers=-1).gpu_bytes[0]
    assert place(info, n_ctx=2048, gpus=[gpu(0, need_all)]).n_gpu_layers == 33
    p = place(info, n_ctx=2048, gpus=[gpu(0, need_all)], gpu_overhead=512 * MiB)
    assert p.n_gpu_layers < 33
    assert p.gpu_bytes[0] <= need_all - 512 * MiB


def test_place_splits_across_gpus_in_proportion_to_free_memory() -> None:
    info = make_info(n_layers=80, layer=1 * GiB)  # ~80 GiB of layers: needs both GPUs
    p = place(info, n_ctx=2048, gpus=[gpu(0, 60 * GiB), gpu(1, 20 * GiB)])
    assert p.tensor_split == pytest.approx([0.75, 0.25])
    assert set(p.gpu_bytes) == {0, 1}
    assert p.gpu_bytes[0] <= 60 * GiB and p.gpu_bytes[1] <= 20 * GiB
    assert 0 < p.n_gpu_layers < 81  # 80 GiB of weights do not fit in 80 GiB with caches
    devs = layer_devices(80, p.n_gpu_layers, p.tensor_split)
    on0, on1 = devs.count(0), devs.count(1)
    assert on0 == pytest.approx(3 * on1, abs=2)
    # And it is the best count: one more layer would not fit.
    more = estimate(info, n_ctx=2048, n_gpu_layers=p.n_gpu_layers + 1, tensor_split=p.tensor_split)
    assert more.gpu_bytes[0] > 60 * GiB or more.gpu_bytes[1] > 20 * GiB


def test_place_uses_one_gpu_when_it_is_enough() -> None:
    p = place(make_info(), n_ctx=2048, gpus=[gpu(0, 10 * GiB), gpu(1, 70 * GiB)])
    assert p.n_gpu_layers == 33
    assert p.tensor_split == [0.0, 1.0]
    assert set(p.gpu_bytes) == {1}


def test_explicit_layers_are_honoured_even_if_they_do_not_fit() -> None:
    info = make_info()
    p = place(info, n_ctx=2048, requested_layers=30, gpus=[gpu(0, 2 * GiB)])
    assert p.n_gpu_layers == 30
    assert p.estimate.n_gpu_layers == 30
    assert not p.fits
    p = place(info, n_ctx=2048, requested_layers=-1, gpus=[gpu(0, 70 * GiB)])
    assert (p.n_gpu_layers, p.estimate.n_gpu_layers, p.fits) == (-1, 33, True)
    p = place(info, n_ctx=2048, requested_layers=0, gpus=[gpu(0, 70 * GiB)])
    assert (p.n_gpu_layers, p.gpu_bytes) == (0, {})


def test_explicit_layers_without_gpus_run_on_cpu() -> None:
    p = place(make_info(), n_ctx=2048, requested_layers=10, gpus=[])
    assert p.n_gpu_layers == 10  # passed through; a CPU build ignores it
    assert p.estimate.n_gpu_layers == 0 and p.gpu_bytes == {}


def test_explicit_layers_split_by_free_memory() -> None:
    p = place(make_info(), n_ctx=2048, requested_layers=-1, gpus=[gpu(0, 30 * GiB), gpu(1, 10 * GiB)])
    assert p.tensor_split == pytest.approx([0.75, 0.25])
    assert set(p.gpu_bytes) == {0, 1}


# ------------------------------------------------------------------ accounting


def test_usage_counts_shared_weights_once() -> None:
    a1 = RunnerFootprint("/m/a.gguf", weights_cpu=4 * GiB, cpu_bytes=5 * GiB)
    a2 = RunnerFootprint("/m/a.gguf", weights_cpu=4 * GiB, cpu_bytes=5 * GiB)
    b = RunnerFootprint("/m/b.gguf", weights_cpu=1 * GiB, cpu_bytes=2 * GiB, gpu_bytes={0: 3 * GiB})
    assert usage([]).cpu_bytes == 0
    assert usage([a1]).cpu_bytes == 5 * GiB
    assert usage([a1, a2]).cpu_bytes == 6 * GiB  # one copy of the weights, two private GiB
    u = usage([a1, a2, b])
    assert u.cpu_bytes == 8 * GiB
    assert u.gpu_bytes == {0: 3 * GiB}
    assert usage([b, b]).gpu_bytes == {0: 6 * GiB}  # GPU memory is never shared


def test_usage_takes_the_largest_mapping_of_a_file() -> None:
    full = RunnerFootprint("/m/a.gguf", weights_cpu=4 * GiB, cpu_bytes=5 * GiB)
    offloaded = RunnerFootprint("/m/a.gguf", weights_cpu=1 * GiB, cpu_bytes=2 * GiB, gpu_bytes={0: 4 * GiB})
    assert usage([full, offloaded]).cpu_bytes == 4 * GiB + 1 * GiB + 1 * GiB


def test_eviction_arithmetic() -> None:
    """What the scheduler does: usage(loaded - victims + [candidate])."""
    loaded = [RunnerFootprint(f"/m/{n}.gguf", GiB, 2 * GiB) for n in "abc"]
    candidate = RunnerFootprint("/m/a.gguf", GiB, 2 * GiB)
    assert usage(loaded + [candidate]).cpu_bytes == 7 * GiB
    assert usage([r for r in loaded if r.key != "/m/b.gguf"] + [candidate]).cpu_bytes == 5 * GiB


def test_footprints_from_estimates_and_measurements() -> None:
    info = make_info()
    p = place(info, n_ctx=2048, gpus=[gpu(3, 70 * GiB)])
    fp = p.footprint("/m/synthetic.gguf")
    assert fp.gpu_bytes == {3: p.estimate.gpu_bytes[0]}
    assert fp.cpu_bytes == p.estimate.cpu_bytes and fp.weights_cpu == p.estimate.weights_cpu
    fe = RunnerFootprint.from_estimate("k", p.estimate, [3])
    assert fe == fp.__class__("k", fp.weights_cpu, fp.cpu_bytes, fp.gpu_bytes)
    fm = RunnerFootprint.measured("k", ProcessMemory(rss=500 * MiB, rss_file=300 * MiB, gpu={0: GiB}))
    assert (fm.weights_cpu, fm.cpu_bytes, fm.private_cpu, fm.gpu_bytes) == (300 * MiB, 500 * MiB, 200 * MiB, {0: GiB})


# ------------------------------------------------------------------ waiting for GPU memory to come back


def stopped_runner(
    *, hold: int = 8 * GiB, back: int | None = None, after: float = 1.0, steps: int = 4
) -> tuple[SimulatedSource, ManualClock, dict[int, int]]:
    """A runner (pid 42) holding `hold` on GPU 0 stops; `back` bytes return over `after` s."""
    clock = ManualClock()
    src = SimulatedSource([(80 * GiB, 80 * GiB)], clock=clock)
    src.allocate(0, hold, pid=42)
    src.allocate(0, 2 * GiB)  # someone else's memory
    baseline = {g.index: g.free for g in src.gpus()}
    src.release(0, hold if back is None else back, pid=42, after=after, steps=steps)
    return src, clock, baseline


async def test_recovery_within_the_delay() -> None:
    src, clock, baseline = stopped_runner(after=1.0, steps=4)
    ok = await wait_for_recovery(src, gpu_bytes={0: 8 * GiB}, baseline=baseline, clock=clock, sleep=clock.sleep)
    assert ok
    assert clock() == pytest.approx(0.75)  # the third of four steps brings 75%


async def test_recovery_timeout_when_memory_never_returns() -> None:
    src, clock, baseline = stopped_runner(back=4 * GiB, after=0.5)  # only half ever comes back
    ok = await wait_for_recovery(
        src, gpu_bytes={0: 8 * GiB}, baseline=baseline, poll=0.25, timeout=5.0, clock=clock, sleep=clock.sleep
    )
    assert not ok
    assert clock() == pytest.approx(5.0)
    assert src.readings == 1 + 1 + 20  # the baseline, the first check, one per poll


async def test_recovery_needs_only_the_fraction() -> None:
    src, clock, baseline = stopped_runner(back=7 * GiB, after=0.0, steps=1)
    assert await wait_for_recovery(src, gpu_bytes={0: 8 * GiB}, baseline=baseline, clock=clock, sleep=clock.sleep)
    src, clock, baseline = stopped_runner(back=5 * GiB, after=0.0, steps=1)
    assert not await wait_for_recovery(
        src, gpu_bytes={0: 8 * GiB}, baseline=baseline, timeout=1.0, clock=clock, sleep=clock.sleep
    )
    assert await wait_for_recovery(
        src, gpu_bytes={0: 8 * GiB}, baseline=baseline, fraction=0.5, clock=clock, sleep=clock.sleep
    )


async def test_recovery_waits_for_every_gpu() -> None:
    clock = ManualClock()
    src = SimulatedSource([(24 * GiB, 24 * GiB), (24 * GiB, 24 * GiB)], clock=clock)
    src.allocate(0, 4 * GiB, pid=1)
    src.allocate(1, 4 * GiB, pid=1)
    baseline = {g.index: g.free for g in src.gpus()}
    src.release(0, pid=1, after=0.1)
    src.release(1, pid=1, after=100.0)
    ok = await wait_for_recovery(
        src, gpu_bytes={0: 4 * GiB, 1: 4 * GiB}, baseline=baseline, timeout=2.0, clock=clock, sleep=clock.sleep
    )
    assert not ok


async def test_cpu_only_runner_is_not_waited_for() -> None:
    clock = ManualClock()
    src = SimulatedSource([(24 * GiB, 24 * GiB)], clock=clock)
    assert await wait_for_recovery(src, gpu_bytes={}, baseline={}, clock=clock, sleep=clock.sleep)
    assert await wait_for_recovery(src, gpu_bytes={0: 0}, baseline={}, clock=clock, sleep=clock.sleep)
    assert src.readings == 0 and clock() == 0


async def test_recovery_requires_a_baseline() -> None:
    src, clock, _ = stopped_runner()
    with pytest.raises(ValueError, match="baseline"):
        await wait_for_recovery(src, gpu_bytes={0: GiB}, baseline={}, clock=clock, sleep=clock.sleep)


async def test_recovery_in_real_time() -> None:
    """The default clock and asyncio.sleep, with short real delays."""
    src = SimulatedSource([(8 * GiB, 8 * GiB)])
    src.allocate(0, 2 * GiB, pid=5)
    baseline = {0: src.gpus()[0].free}
    src.exit_process(5, after=0.05)
    assert await wait_for_recovery(src, gpu_bytes={0: 2 * GiB}, baseline=baseline, poll=0.01, timeout=2.0)
