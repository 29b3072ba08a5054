"""`bench.py all`: every figure of the speed targets, each next to its baseline in the same run.

Rows (see docs/benchmarks.md for the method and the latest table):

 1. stream      tokens/s: supervisor, C++ llama-server, bare llama_cpp.server, our runner direct
 2. latency     1-token completion p50/p99: supervisor minus its runner hit directly (real model),
                and the same with an instant fake runner (pure proxy cost)
 3. cold        request for an unloaded model -> first token: supervisor with and without the
                warm spare, C++ router mode (router already up), bare llama_cpp.server spawn
 4. switch      one model loaded at a time: evict A, load B, first token (supervisor vs C++ router)
 5. crash       SIGKILL of a runner under steady load -> next success, next to the load time
 6. gguf        metadata read: ours vs gguf-py (from the llama.cpp sources, when present)
 7. proxy       requests/s to an instant fake runner with 64 clients; supervisor CPU per request
 8. rss         supervisor RSS idle and with three runners loaded
 9. scale       200 models, 5,000 queued requests, max_loaded_models = 4
10. parallel    two runners generating at once vs one alone (fair share vs every runner on all cores)
11. staging     runner load from a cold page cache: RAM-staged copy vs the model file

Rounds are interleaved between a figure and its baseline and summarised by
median and spread (min-max), because absolute figures on a shared 2-core box
move with whatever else runs.  Rows whose baseline is missing (the C++
binary not built) say how to get it and are skipped, not failed.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import psutil

from bench_baselines import BUILD_HINT, BareServer, CppRouter, CppServer, find_llama_server
from bench_serving import PROMPT, DirectRunner, Supervisor, model_table, one_token, stream_rate

# ------------------------------------------------------------------ helpers


def summary(values: list[float], scale: float = 1.0) -> dict[str, Any]:
    """Median and spread of one series (scaled, e.g. 1000 for ms)."""
    v = [x * scale for x in values]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def p99(values: list[float]) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


def first_token(client: httpx.Client, url: str, model: str, *, timeout: float = 300) -> float:
    """Seconds from sending a streamed completion to its first token."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    t = time.perf_counter()
    with client.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line[6:].strip() != "[DONE]":
                choice = json.loads(line[6:])["choices"][0]
                if choice.get("text"):
                    return time.perf_counter() - t
    raise RuntimeError("no token streamed")


def wait_events(client: httpx.Client, url: str, kind: str, reason: str, after: int, timeout: float = 30) -> int:
    """Wait for an event of `kind`/`reason` after sequence `after`; returns the newest sequence."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = client.get(url + "/admin/events", params={"after": after}).json()["events"]
        if any(e["kind"] == kind and e["reason"] == reason for e in events):
            return max(e["seq"] for e in events)
        time.sleep(0.05)
    raise RuntimeError(f"no {kind}/{reason} event within {timeout:g} s")


def last_seq(client: httpx.Client, url: str) -> int:
    return max((e["seq"] for e in client.get(url + "/admin/events").json()["events"]), default=0)


# ------------------------------------------------------------------ 1 + 2: stream and added latency


SETTLE = 0.3  # seconds of quiet before each streamed measurement


def row_stream(model: Path, rounds: int, max_tokens: int, requests: int) -> dict[str, Any]:
    binary = find_llama_server()
    sup = Supervisor("[server]\nkeep_alive = -1\nrunner_pool = 0\n" + model_table("demo", model))
    direct = cpp = bare = None
    try:
        direct = DirectRunner(model)
        bare = BareServer(model)
        cpp = CppServer(binary, model) if binary else None
        series: dict[str, list[float]] = {"supervisor": [], "runner_direct": [], "bare_llama_cpp_server": []}
        if cpp:
            series["cpp_llama_server"] = []
        with httpx.Client() as client:
            one_token(client, sup.url, "demo")  # load the supervisor's runner
            targets = {"supervisor": (client, sup.url), "runner_direct": (direct.client, direct.url),
                       "bare_llama_cpp_server": (client, bare.url)}
            if cpp:
                targets["cpp_llama_server"] = (client, cpp.url)
            for c, url in targets.values():
                stream_rate(c, url, "demo", 16)  # warm every path once
            names = list(targets)
            for i in range(rounds):
                # Each round starts with another server, and each measurement
                # after a pause: a server's idle OpenMP threads spin for a
                # while after its stream ends, and in a fixed order the same
                # server would always run on the heels of the same other one.
                for name in names[i % len(names):] + names[:i % len(names)]:
                    time.sleep(SETTLE)
                    c, url = targets[name]
                    series[name].append(stream_rate(c, url, "demo", max_tokens)[0])
            lat_via, lat_dir = [], []
            for _ in range(requests):
                lat_via.append(one_token(client, sup.url, "demo"))
                lat_dir.append(one_token(direct.client, direct.url, "demo"))
    finally:
        for p in (direct, bare, cpp):
            if p is not None:
                p.close()
        sup.close()
    out: dict[str, Any] = {name: summary(v) for name, v in series.items()}
    via = series["supervisor"]
    out["ratio_supervisor_to_runner_direct"] = summary([a / b for a, b in zip(via, series["runner_direct"])])
    out["ratio_supervisor_to_bare"] = summary([a / b for a, b in zip(via, series["bare_llama_cpp_server"])])
    if cpp:
        out["ratio_supervisor_to_cpp"] = summary([a / b for a, b in zip(via, series["cpp_llama_server"])])
    else:
        out["cpp_skipped"] = BUILD_HINT
    out["latency_real_model_ms"] = {
        "supervisor_p50": statistics.median(lat_via) * 1000, "supervisor_p99": p99(lat_via) * 1000,
        "direct_p50": statistics.median(lat_dir) * 1000, "direct_p99": p99(lat_dir) * 1000,
        "added_p50": (statistics.median(lat_via) - statistics.median(lat_dir)) * 1000,
        "added_p99": (p99(lat_via) - p99(lat_dir)) * 1000, "requests": requests,
    }
    return out


# ------------------------------------------------------------------ 3 + 4: cold start and switch


def _supervisor_cold(model: Path, spare: bool) -> tuple[Supervisor, httpx.Client]:
    sup = Supervisor(f"[server]\nkeep_alive = -1\nrunner_pool = {1 if spare else 0}\n" + model_table("demo", model))
    return sup, httpx.Client(timeout=60)


def _cold_supervisor_round(sup: Supervisor, client: httpx.Client, spare: bool) -> float:
    after = last_seq(client, sup.url)
    client.post(sup.url + "/admin/models/demo/unload").raise_for_status()
    if spare:  # a new spare is spawned once nothing loads; give it time for its imports
        try:
            wait_events(client, sup.url, "spare", "ready", after, timeout=5)
        except RuntimeError:
            pass  # the spare from before this round is still waiting
        time.sleep(1.5)
    else:
        time.sleep(0.5)
    return first_token(client, sup.url, "demo")


def _bare_spawn_round(model: Path) -> float:
    """Spawn `python -m llama_cpp.server` and time spawn -> first token (requests retried until it listens)."""
    t = time.perf_counter()
    server = BareServer(model, wait=False)
    try:
        with httpx.Client(timeout=60) as client:
            while True:
                try:
                    first_token(client, server.url, "demo")
                    return time.perf_counter() - t
                except httpx.ConnectError:
                    if server.proc.poll() is not None:
                        raise RuntimeError("llama_cpp.server exited")
                    time.sleep(0.01)
    finally:
        server.close()


def row_cold(model: Path, rounds: int) -> dict[str, Any]:
    binary = find_llama_server()
    with_spare, spare_client = _supervisor_cold(model, True)
    without, plain_client = _supervisor_cold(model, False)
    router = CppRouter(binary, {"demo": model}, models_max=4) if binary else None
    series: dict[str, list[float]] = {"supervisor_with_spare": [], "supervisor_without_spare": [],
                                      "bare_llama_cpp_server_spawn": []}
    if router:
        series["cpp_router"] = []
    try:
        time.sleep(2.0)  # the first spare's imports
        with httpx.Client(timeout=120) as rc:
            for _ in range(rounds):
                series["supervisor_with_spare"].append(_cold_supervisor_round(with_spare, spare_client, True))
                series["supervisor_without_spare"].append(_cold_supervisor_round(without, plain_client, False))
                if router:
                    router.unload("demo")
                    time.sleep(0.5)
                    series["cpp_router"].append(first_token(rc, router.url, "demo"))
                series["bare_llama_cpp_server_spawn"].append(_bare_spawn_round(model))
    finally:
        spare_client.close()
        plain_client.close()
        with_spare.close()
        without.close()
        if router:
            router.close()
    out: dict[str, Any] = {name: summary(v) for name, v in series.items()}
    if router:
        out["ratio_with_spare_to_cpp_router"] = summary(
            [a / b for a, b in zip(series["supervisor_with_spare"], series["cpp_router"])])
    else:
        out["cpp_skipped"] = BUILD_HINT
    out["ratio_with_spare_to_without"] = summary(
        [a / b for a, b in zip(series["supervisor_with_spare"], series["supervisor_without_spare"])])
    return out


def row_switch(model: Path, rounds: int) -> dict[str, Any]:
    binary = find_llama_server()
    toml = ("[server]\nmax_loaded_models = 1\nkeep_alive = -1\nrunner_pool = 1\n"
            + model_table("a", model) + model_table("b", model))
    sup = Supervisor(toml)
    router = CppRouter(binary, {"a": model, "b": model}, models_max=1) if binary else None
    series: dict[str, list[float]] = {"supervisor": []}
    if router:
        series["cpp_router"] = []
    try:
        with httpx.Client(timeout=120) as client:
            first_token(client, sup.url, "a")
            if router:
                first_token(client, router.url, "a")
            for i in range(rounds):
                target = "b" if i % 2 == 0 else "a"
                time.sleep(1.5)  # the spare taken by the previous switch is replaced meanwhile
                series["supervisor"].append(first_token(client, sup.url, target))
                if router:
                    series["cpp_router"].append(first_token(client, router.url, target))
    finally:
        sup.close()
        if router:
            router.close()
    out: dict[str, Any] = {name: summary(v) for name, v in series.items()}
    if router:
        out["ratio_supervisor_to_cpp_router"] = summary([a / b for a, b in zip(series["supervisor"], series["cpp_router"])])
    else:
        out["cpp_skipped"] = BUILD_HINT
    return out


# ------------------------------------------------------------------ 5: crash


def row_crash(model: Path, rounds: int) -> dict[str, Any]:
    from bench_serving import bench_crash

    r = bench_crash(model, rounds)
    return {
        "kill_to_next_success": summary(r["kill_to_next_success_seconds"]),
        "replacement_load": summary(r["replacement_load_seconds"]),
        "kill_to_next_success_minus_load": summary(
            [g - l for g, l in zip(r["kill_to_next_success_seconds"], r["replacement_load_seconds"])]),
    }


# ------------------------------------------------------------------ 6: gguf


def _gguf_py_path() -> Path | None:
    """gguf-py from the llama.cpp sources that build-llama-server unpacks, when present."""
    import importlib.metadata as md

    candidate = Path.home() / ".cache/llama-server" / md.version("llama-cpp-python") / "src/gguf-py"
    return candidate if (candidate / "gguf").is_dir() else None


def row_gguf(model: Path, repeat: int) -> dict[str, Any]:
    from hoshikage_sup import gguf as ours

    def read_ours() -> Any:
        ours.clear_cache()
        return ours.read_gguf(model)

    read_ours()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        read_ours()
        times.append(time.perf_counter() - t)
    out: dict[str, Any] = {"ours_ms": summary(times, 1000)}
    try:
        from gguf import GGUFReader  # noqa: F401
    except ImportError:
        path = _gguf_py_path()
        if path is None:
            out["gguf_py_skipped"] = "gguf-py not importable; it comes with the llama.cpp sources: " + BUILD_HINT
            return out
        sys.path.insert(0, str(path))
    from gguf import GGUFReader

    t = time.perf_counter()
    GGUFReader(str(model), "r")
    ref = time.perf_counter() - t
    out["gguf_py_ms"] = ref * 1000
    out["ratio_gguf_py_to_ours"] = ref / statistics.median(times)
    return out


# ------------------------------------------------------------------ 7 + 9: proxy capacity and scale


def _proxy_module() -> Any:
    import bench_proxy

    return bench_proxy


def row_proxy(duration: float) -> dict[str, Any]:
    bp = _proxy_module()
    return {
        "non_streamed": bp.bench_proxy(duration=duration, clients=64, stream=False),
        "streamed": bp.bench_proxy(duration=duration, clients=64, stream=True),
        "added_latency_fake_runner": bp.bench_added_latency(),
    }


def row_scale() -> dict[str, Any]:
    return _proxy_module().bench_scale(models=200, requests=5000, max_loaded=4)


# ------------------------------------------------------------------ 8: rss


def row_rss(model: Path) -> dict[str, Any]:
    toml = "[server]\nkeep_alive = -1\nrunner_pool = 0\n" + "".join(
        model_table(n, model, n_ctx=512) for n in ("a", "b", "c"))
    sup = Supervisor(toml)
    try:
        time.sleep(1.0)
        idle = sup.rss()
        with httpx.Client(timeout=120) as client:
            for name in ("a", "b", "c"):
                one_token(client, sup.url, name)
            loaded = sup.rss()
            children = psutil.Process(sup.proc.pid).children()
            runner_rss = [c.memory_info().rss for c in children]
    finally:
        sup.close()
    return {"supervisor_idle_mib": idle / 2**20, "supervisor_three_loaded_mib": loaded / 2**20,
            "runner_rss_mib": [r / 2**20 for r in runner_rss]}


# ------------------------------------------------------------------ 11: RAM staging


def drop_page_cache(path: Path) -> None:
    """Evict a file's pages from the page cache (no root needed; unmapped pages only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _load_round(sup: Supervisor, client: httpx.Client, model: Path) -> tuple[float, float]:
    """Unload, evict the model file from the page cache, then a cold request:
    (the runner's load seconds from its ready event, request -> first token)."""
    client.post(sup.url + "/admin/models/demo/unload").raise_for_status()
    time.sleep(1.0)  # a new spare's imports, out of the way
    drop_page_cache(model)
    after = last_seq(client, sup.url)
    first = first_token(client, sup.url, "demo")
    events = client.get(sup.url + "/admin/events", params={"after": after}).json()["events"]
    ready = [e for e in events if e["kind"] == "ready"]
    return ready[0]["detail"]["load_seconds"], first


def row_staging(model: Path, rounds: int) -> dict[str, Any]:
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir():
        return {"staging_skipped": "no /dev/shm tmpfs on this machine"}
    stage_dir = Path(tempfile.mkdtemp(prefix="hoshikage-bench-stage-", dir=shm))
    plain = Supervisor("[server]\nkeep_alive = -1\n" + model_table("demo", model))
    staged = Supervisor(f'[server]\nkeep_alive = -1\nstage = "ram"\nstage_dir = "{stage_dir}"\n'
                        + model_table("demo", model))
    series: dict[str, list[float]] = {"load_cold_cache": [], "load_staged": [],
                                      "first_token_cold_cache": [], "first_token_staged": []}
    try:
        with httpx.Client(timeout=120) as client:
            drop_page_cache(model)
            t = time.perf_counter()
            first_token(client, staged.url, "demo")  # the first staged load includes the copy
            first_with_copy = time.perf_counter() - t
            one_token(client, plain.url, "demo")
            for _ in range(rounds):
                load, first = _load_round(plain, client, model)
                series["load_cold_cache"].append(load)
                series["first_token_cold_cache"].append(first)
                load, first = _load_round(staged, client, model)
                series["load_staged"].append(load)
                series["first_token_staged"].append(first)
    finally:
        plain.close()
        staged.close()
        shutil.rmtree(stage_dir, ignore_errors=True)
    out: dict[str, Any] = {name: summary(v) for name, v in series.items()}
    out["first_token_first_staged_load_with_copy"] = first_with_copy
    out["ratio_staged_to_cold_cache_load"] = summary(
        [a / b for a, b in zip(series["load_staged"], series["load_cold_cache"])])
    return out


# ------------------------------------------------------------------ 10: two runners at once


def _concurrent_rates(client: httpx.Client, url: str, models: list[str], max_tokens: int) -> float:
    """Sum of the tokens/s of streams running at once, one per model."""
    rates: list[float] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(models))

    def run(name: str) -> None:
        try:
            with httpx.Client() as c:
                barrier.wait()
                rates.append(stream_rate(c, url, name, max_tokens)[0])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    workers = [threading.Thread(target=run, args=(m,)) for m in models]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return sum(rates)


def row_parallel(model: Path, rounds: int, max_tokens: int) -> dict[str, Any]:
    cpus = len(os.sched_getaffinity(0))
    fair = Supervisor("[server]\nkeep_alive = -1\nrunner_pool = 0\n"
                      + model_table("a", model) + model_table("b", model))
    greedy = Supervisor("[server]\nkeep_alive = -1\nrunner_pool = 0\n"
                        + model_table("a", model, threads=cpus) + model_table("b", model, threads=cpus))
    series: dict[str, list[float]] = {"fair_one_alone": [], "fair_two_at_once": [],
                                      "all_cores_one_alone": [], "all_cores_two_at_once": []}
    try:
        with httpx.Client(timeout=300) as client:
            for sup in (fair, greedy):
                for name in ("a", "b"):
                    one_token(client, sup.url, name)
            for _ in range(rounds):
                series["fair_one_alone"].append(stream_rate(client, fair.url, "a", max_tokens)[0])
                series["fair_two_at_once"].append(_concurrent_rates(client, fair.url, ["a", "b"], max_tokens))
                series["all_cores_one_alone"].append(stream_rate(client, greedy.url, "a", max_tokens)[0])
                series["all_cores_two_at_once"].append(_concurrent_rates(client, greedy.url, ["a", "b"], max_tokens))
    finally:
        fair.close()
        greedy.close()
    out: dict[str, Any] = {name: summary(v) for name, v in series.items()}
    out["ratio_fair_two_to_one"] = summary([b / a for a, b in zip(series["fair_one_alone"], series["fair_two_at_once"])])
    out["ratio_all_cores_two_to_one"] = summary(
        [b / a for a, b in zip(series["all_cores_one_alone"], series["all_cores_two_at_once"])])
    out["cpus"] = cpus
    return out


# ------------------------------------------------------------------ all


ROWS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "stream": lambda a: row_stream(a.model, a.rounds, a.max_tokens, a.requests),
    "cold": lambda a: row_cold(a.model, a.rounds),
    "switch": lambda a: row_switch(a.model, a.rounds),
    "crash": lambda a: row_crash(a.model, max(3, a.rounds // 2)),
    "gguf": lambda a: row_gguf(a.model, 5),
    "proxy": lambda a: row_proxy(a.proxy_seconds),
    "rss": lambda a: row_rss(a.model),
    "scale": lambda a: row_scale(),
    "parallel": lambda a: row_parallel(a.model, a.rounds, a.max_tokens),
    "staging": lambda a: row_staging(a.model, a.rounds),
}


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    return {
        "cpus": len(os.sched_getaffinity(0)), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": _cpu_model(), "python": platform.python_version(),
        "llama_cpp_python": md.version("llama-cpp-python"), "llama_server": find_llama_server(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_all(args: Any) -> dict[str, Any]:
    wanted = args.only or list(ROWS)
    results: dict[str, Any] = {"machine": machine(), "rows": {}}
    for name in wanted:
        print(f"bench all: {name} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            results["rows"][name] = ROWS[name](args)
        except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
            results["rows"][name] = {"error": f"{type(e).__name__}: {e}"}
        results["rows"][name]["seconds"] = round(time.perf_counter() - t, 1)
    return results


# ------------------------------------------------------------------ the table


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, dict) and "median" in value:
        spread = f" ({_fmt(float(value['min']))}–{_fmt(float(value['max']))})" if value.get("n", 1) > 1 else ""
        return f"{_fmt(float(value['median']))}{unit}{spread}"
    if isinstance(value, float):
        return f"{value:,.0f}{unit}" if abs(value) >= 1000 else f"{value:.3g}{unit}"
    return f"{value}{unit}"


def _met(value: Any, ok: Callable[[float], bool]) -> str:
    if isinstance(value, dict):
        value = value.get("median")
    if not isinstance(value, (int, float)):
        return "–"
    return "yes" if ok(value) else "**no**"


def table(results: dict[str, Any]) -> str:
    """The results as a Markdown table: figure, baseline, ratio, target, met."""
    r = results["rows"]
    lines = ["| # | figure | ours | baseline | ratio | target | met |", "|---|---|---|---|---|---|---|"]

    def add(n: str, figure: str, ours: Any, base: Any, ratio: Any, target: str, met: str) -> None:
        lines.append(f"| {n} | {figure} | {ours} | {base} | {ratio} | {target} | {met} |")

    s = r.get("stream", {})
    add("1", "stream tokens/s: supervisor vs C++ llama-server", _fmt(s.get("supervisor")),
        _fmt(s.get("cpp_llama_server")), _fmt(s.get("ratio_supervisor_to_cpp"), "x"), "≥ 0.95x",
        _met(s.get("ratio_supervisor_to_cpp"), lambda v: v >= 0.95))
    add("1", "stream tokens/s: supervisor vs bare llama_cpp.server", _fmt(s.get("supervisor")),
        _fmt(s.get("bare_llama_cpp_server")), _fmt(s.get("ratio_supervisor_to_bare"), "x"), "", "")
    add("1", "stream tokens/s: supervisor vs its runner direct", _fmt(s.get("supervisor")),
        _fmt(s.get("runner_direct")), _fmt(s.get("ratio_supervisor_to_runner_direct"), "x"), "", "")
    lat = s.get("latency_real_model_ms") or {}
    add("2", "1-token p50 / p99 ms: supervisor vs runner direct (demo model)",
        f"{_fmt(lat.get('supervisor_p50'))} / {_fmt(lat.get('supervisor_p99'))}",
        f"{_fmt(lat.get('direct_p50'))} / {_fmt(lat.get('direct_p99'))}",
        f"+{_fmt(lat.get('added_p50'))} ms", "≤ +1 ms", _met(lat.get("added_p50"), lambda v: v <= 1.0))
    fake = _get(r, "proxy", "added_latency_fake_runner") or {}
    add("2", "1-token p50 ms: supervisor vs runner direct (instant fake runner)",
        _fmt(fake.get("supervisor_p50_ms")), _fmt(fake.get("direct_p50_ms")),
        f"+{_fmt(fake.get('added_p50_ms'))} ms", "≤ +1 ms", _met(fake.get("added_p50_ms"), lambda v: v <= 1.0))
    c = r.get("cold", {})
    add("3", "cold request → first token, s: with spare vs C++ router", _fmt(c.get("supervisor_with_spare")),
        _fmt(c.get("cpp_router")), _fmt(c.get("ratio_with_spare_to_cpp_router"), "x"), "≤ 0.5x",
        _met(c.get("ratio_with_spare_to_cpp_router"), lambda v: v <= 0.5))
    add("3", "cold → first token, s: without spare / bare llama_cpp.server spawn",
        _fmt(c.get("supervisor_without_spare")), _fmt(c.get("bare_llama_cpp_server_spawn")),
        _fmt(c.get("ratio_with_spare_to_without"), "x (with/without spare)"), "", "")
    w = r.get("switch", {})
    add("4", "model switch (evict A, load B, first token), s", _fmt(w.get("supervisor")), _fmt(w.get("cpp_router")),
        _fmt(w.get("ratio_supervisor_to_cpp_router"), "x"), "≤ 0.6 s", _met(w.get("supervisor"), lambda v: v <= 0.6))
    k = r.get("crash", {})
    add("5", "SIGKILL → next success, s (vs the replacement's load)", _fmt(k.get("kill_to_next_success")),
        _fmt(k.get("replacement_load")), f"+{_fmt(k.get('kill_to_next_success_minus_load'))} s", "≤ load + 0.3 s",
        _met(k.get("kill_to_next_success_minus_load"), lambda v: v <= 0.3))
    g = r.get("gguf", {})
    add("6", "GGUF metadata read, ms: ours vs gguf-py", _fmt(g.get("ours_ms")), _fmt(g.get("gguf_py_ms")),
        _fmt(g.get("ratio_gguf_py_to_ours"), "x faster"), "", "")
    for label, key in (("non-streamed", "non_streamed"), ("streamed", "streamed")):
        p = _get(r, "proxy", key) or {}
        # The target is for plain requests; a streamed one is shown beside it.
        target = key == "non_streamed"
        add("7", f"proxy req/s, 64 clients, instant fake runner ({label}); CPU ms/request",
            f"{_fmt(p.get('rps'))}; {_fmt(p.get('supervisor_cpu_ms_per_request'))}", "", "",
            "≥ 2000/s" if target else "", _met(p.get("rps"), lambda v: v >= 2000) if target else "")
        add("7", f"asyncio slow-callback warnings during the {label} run", _fmt(p.get("slow_callbacks")), "", "",
            "0", _met(p.get("slow_callbacks"), lambda v: v == 0))
    m = r.get("rss", {})
    add("8", "supervisor RSS MiB: idle / three runners loaded",
        f"{_fmt(m.get('supervisor_idle_mib'))} / {_fmt(m.get('supervisor_three_loaded_mib'))}", "", "", "", "")
    sc = r.get("scale", {})
    add("9", "200 models, 5,000 requests, 4 loaded: completed / failed; µs per decision; pass µs p50 / p99",
        f"{_fmt(sc.get('completed'))} / {_fmt(sc.get('failed'))}; {_fmt(sc.get('us_per_decision'))}; "
        f"{_fmt(sc.get('pass_median_us'))} / {_fmt(sc.get('pass_p99_us'))}", "", "",
        "all, no deadlock", _met(sc.get("failed"), lambda v: v == 0))
    pa = r.get("parallel", {})
    add("10", "two runners at once ÷ one alone, tokens/s (fair share; baseline: each on all cores)",
        _fmt(pa.get("ratio_fair_two_to_one"), "x"), _fmt(pa.get("ratio_all_cores_two_to_one"), "x"), "", "≥ 0.9x",
        _met(pa.get("ratio_fair_two_to_one"), lambda v: v >= 0.9))
    st = r.get("staging", {})
    add("11", "runner load s from a cold page cache: RAM-staged copy vs the model file", _fmt(st.get("load_staged")),
        _fmt(st.get("load_cold_cache")), _fmt(st.get("ratio_staged_to_cold_cache_load"), "x"), "", "")
    add("11", "cold request → first token s: staged vs file; first staged load (copy included)",
        f"{_fmt(st.get('first_token_staged'))}; {_fmt(st.get('first_token_first_staged_load_with_copy'))}",
        _fmt(st.get("first_token_cold_cache")), "", "", "")
    errors = [f"- {name}: {row['error']}" for name, row in r.items() if isinstance(row, dict) and "error" in row]
    skipped = sorted({v for row in r.values() if isinstance(row, dict)
                      for k, v in row.items() if k.endswith("_skipped")})
    return "\n".join(lines + ([""] + errors if errors else []) + ([""] + [f"- skipped: {x}" for x in skipped] if skipped else []))


# ------------------------------------------------------------------ command line


def cmd_all(args: Any) -> int:
    if not args.model.is_file():
        print(f"bench: model file {args.model} not found (run scripts/setup)", file=sys.stderr)
        return 2
    unknown = [name for name in args.only or [] if name not in ROWS]
    if unknown:
        print(f"bench all: unknown row(s) {', '.join(unknown)}; expected some of {', '.join(ROWS)}", file=sys.stderr)
        return 2
    results = run_all(args)
    text = table(results)
    results["table"] = text
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    print(f"machine: {m['cpus']} cores ({m['cpu_model']}), {m['ram_gib']} GiB RAM, "
          f"llama-cpp-python {m['llama_cpp_python']}, {m['date']}")
    print(text)
    print(f"\nJSON: {args.json}")
    return 0


def add_all(sub: Any) -> None:
    from bench_serving import DEFAULT_MODEL

    p = sub.add_parser("all", help="every speed figure next to its baseline (docs/benchmarks.md)")
    p.add_argument("--model", type=Path, default=Path(os.environ.get("HOSHIKAGE_DEMO_MODEL") or DEFAULT_MODEL))
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds per comparison (default 10)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per streamed completion (default 128)")
    p.add_argument("--requests", type=int, default=200, help="1-token requests per path for latency (default 200)")
    p.add_argument("--proxy-seconds", type=float, default=10.0, help="seconds per proxy capacity run (default 10)")
    p.add_argument("--only", nargs="+", metavar="ROW", help=f"rows to run (default all): {' '.join(ROWS)}")
    p.add_argument("--json", type=Path, default=Path(".cache/bench/latest.json"),
                   help="where to write the results (default .cache/bench/latest.json)")
    p.set_defaults(func=cmd_all)
