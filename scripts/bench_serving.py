"""Serving benchmarks: the supervisor measured side by side with its own runner.

Everything is measured in one run on one machine, alternating the two paths
round by round, and reported as ratios, because absolute figures on a shared
2-core box move with whatever else runs.

- stream:   tokens/s of a streamed completion through the supervisor versus
            the same runner process reached directly on its own port.
- overhead: latency of a 1-token request, supervisor versus direct (p50).
- switch:   model switch time with max_loaded_models = 1: evict A, load B,
            first token of B.
- rss:      the supervisor's own RSS idle (nothing loaded) and after serving.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / ".cache/models/gemma3-270m-q4_k_m.gguf"
PROMPT = "Write a long story about a lighthouse keeper who counts the stars every night."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Supervisor:
    """`hoshikage serve` as a subprocess with a temporary config."""

    def __init__(self, toml: str):
        self.dir = tempfile.TemporaryDirectory(prefix="hoshikage-bench-")
        self.config = Path(self.dir.name) / "bench.toml"
        self.config.write_text(toml)
        self.port = free_port()
        self.log = open(Path(self.dir.name) / "server.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hoshikage_sup", "serve", "--config", str(self.config), "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("supervisor did not come up")

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def close(self) -> None:
        stop(self.proc)
        self.log.close()
        self.dir.cleanup()


def stop(proc: subprocess.Popen, grace: float = 30, *, group: bool = False) -> None:
    """SIGTERM (to its whole process group with `group`), SIGKILL after
    `grace` seconds; reaped either way."""
    if proc.poll() is not None:
        return

    def send(sig: int) -> None:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()


def model_table(name: str, path: Path, *, n_ctx: int = 2048, threads: int = 0, extra: str = "") -> str:
    return f'[models.{name}]\npath = "{path}"\nn_ctx = {n_ctx}\nn_threads = {threads}\nchat_format = "gemma"\n{extra}\n'


def stream_rate(client: httpx.Client, url: str, model: str, max_tokens: int) -> tuple[float, int]:
    """Tokens per second between the first and the last streamed token."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "seed": 1, "stream": True}
    stamps = []
    with client.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line[6:].strip() != "[DONE]":
                if json.loads(line[6:])["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    if len(stamps) < 2:
        raise RuntimeError("stream produced fewer than two tokens")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


def one_token(client: httpx.Client, url: str, model: str) -> float:
    body = {"model": model, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
    t = time.perf_counter()
    client.post(url + "/v1/completions", json=body, timeout=60).raise_for_status()
    return time.perf_counter() - t


class DirectRunner:
    """The baseline for "through the supervisor": a runner started here with the
    supervisor's own runner code and the same settings, hit directly on its
    socket with its secret (the supervisor's own runners are private)."""

    def __init__(self, model: Path, *, n_ctx: int = 2048):
        import asyncio
        import threading

        from hoshikage_sup.process import RunnerProcess, RunnerSpec

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        spec = RunnerSpec(model_name="demo", model_path=str(model), n_ctx=n_ctx,
                          n_threads=os.cpu_count() or 1, chat_format="gemma")
        self.proc = RunnerProcess(spec)
        asyncio.run_coroutine_threadsafe(self.proc.start(load_timeout=300), self.loop).result(330)
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=self.proc.socket_path),
                                   headers=self.proc.auth_headers())
        self.url = "http://runner"

    def close(self) -> None:
        import asyncio

        self.client.close()
        asyncio.run_coroutine_threadsafe(self.proc.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def bench_stream(model: Path, rounds: int, max_tokens: int, requests: int) -> dict:
    sup = Supervisor('[server]\nkeep_alive = -1\n' + model_table("demo", model))
    direct = None
    try:
        rss_idle = sup.rss()
        direct = DirectRunner(model)
        with httpx.Client() as client:
            one_token(client, sup.url, "demo")  # load the runner
            via, dir_ = [], []
            for _ in range(rounds):
                via.append(stream_rate(client, sup.url, "demo", max_tokens)[0])
                dir_.append(stream_rate(direct.client, direct.url, "demo", max_tokens)[0])
            lat_via, lat_dir = [], []
            for _ in range(requests):
                lat_via.append(one_token(client, sup.url, "demo"))
                lat_dir.append(one_token(direct.client, direct.url, "demo"))
        rss_served = sup.rss()
    finally:
        if direct is not None:
            direct.close()
        sup.close()
    ratios = [a / b for a, b in zip(via, dir_)]
    return {
        "stream_tokens_per_s_supervisor_median": statistics.median(via),
        "stream_tokens_per_s_direct_median": statistics.median(dir_),
        "stream_ratio_median": statistics.median(ratios),
        "stream_ratios": ratios,
        "one_token_p50_supervisor_ms": statistics.median(lat_via) * 1000,
        "one_token_p50_direct_ms": statistics.median(lat_dir) * 1000,
        "one_token_added_ms_p50": (statistics.median(lat_via) - statistics.median(lat_dir)) * 1000,
        "supervisor_rss_idle_mib": rss_idle / 2**20,
        "supervisor_rss_after_serving_mib": rss_served / 2**20,
    }


def bench_switch(model: Path, rounds: int) -> dict:
    toml = "[server]\nmax_loaded_models = 1\nkeep_alive = -1\n" + model_table("a", model) + model_table("b", model)
    sup = Supervisor(toml)
    times = []
    try:
        with httpx.Client() as client:
            one_token(client, sup.url, "a")
            for i in range(rounds):
                target = "b" if i % 2 == 0 else "a"
                times.append(one_token(client, sup.url, target))
    finally:
        sup.close()
    return {"switch_seconds_median": statistics.median(times), "switch_seconds": times}


def bench_crash(model: Path, rounds: int) -> dict:
    """SIGKILL a runner under steady load; seconds until the next success for
    its model, next to that replacement's own load time (from the events).
    Each round uses a fresh supervisor: a runner killed again within a minute
    is a crash loop, replaced with a growing delay on purpose."""
    import threading

    gaps, loads = [], []
    for _ in range(rounds):
        sup = Supervisor("[server]\nkeep_alive = -1\n" + model_table("demo", model, n_ctx=512))
        try:
            with httpx.Client() as client:
                one_token(client, sup.url, "demo")
                successes: list[float] = []
                stop = threading.Event()

                def load() -> None:
                    with httpx.Client() as c:
                        while not stop.is_set():
                            try:
                                body = {"model": "demo", "prompt": "Hi", "max_tokens": 1}
                                if c.post(sup.url + "/v1/completions", json=body, timeout=60).status_code == 200:
                                    successes.append(time.monotonic())
                            except httpx.HTTPError:
                                pass

                worker = threading.Thread(target=load)
                worker.start()
                time.sleep(0.5)
                pid = client.get(sup.url + "/api/ps").json()["models"][0]["pids"][0]
                after = max((e["seq"] for e in client.get(sup.url + "/admin/events").json()["events"]), default=0)
                killed = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                deadline = killed + 60
                while time.monotonic() < deadline and not any(t > killed + 0.05 for t in successes):
                    time.sleep(0.01)
                stop.set()
                worker.join()
                nxt = min((t for t in successes if t > killed + 0.05), default=None)
                events = client.get(sup.url + "/admin/events", params={"after": after}).json()["events"]
                ready = [e for e in events if e["kind"] == "ready"]
                if nxt is not None and ready:
                    gaps.append(nxt - killed)
                    loads.append(ready[0]["detail"]["load_seconds"])
        finally:
            sup.close()
    return {
        "kill_to_next_success_seconds_median": statistics.median(gaps),
        "replacement_load_seconds_median": statistics.median(loads),
        "kill_to_next_success_minus_load_seconds_median": statistics.median(g - l for g, l in zip(gaps, loads)),
        "kill_to_next_success_seconds": gaps,
        "replacement_load_seconds": loads,
    }


def _check_model(model: Path) -> bool:
    if not model.is_file():
        print(f"bench: model file {model} not found (run scripts/setup)", file=sys.stderr)
        return False
    return True


def _print(out: dict) -> None:
    for k, v in out.items():
        print(f"{k}: {[round(x, 4) for x in v] if isinstance(v, list) else round(v, 4)}")


def cmd_stream(args) -> int:
    if not _check_model(args.model):
        return 2
    _print(bench_stream(args.model, args.rounds, args.max_tokens, args.requests))
    return 0


def cmd_switch(args) -> int:
    if not _check_model(args.model):
        return 2
    _print(bench_switch(args.model, args.rounds))
    return 0


def _model_arg(p) -> None:
    p.add_argument("--model", type=Path, default=Path(os.environ.get("HOSHIKAGE_DEMO_MODEL") or DEFAULT_MODEL))


def add_stream(sub) -> None:
    p = sub.add_parser("stream", help="tokens/s and 1-token latency: supervisor vs its runner directly; supervisor RSS")
    _model_arg(p)
    p.add_argument("--rounds", type=int, default=5, help="streams per path, alternating")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=20, help="1-token requests per path, alternating")
    p.set_defaults(func=cmd_stream)


def cmd_crash(args) -> int:
    if not _check_model(args.model):
        return 2
    _print(bench_crash(args.model, args.rounds))
    return 0


def add_crash(sub) -> None:
    p = sub.add_parser("crash", help="SIGKILL a runner under steady load: time to the next success vs its load time")
    _model_arg(p)
    p.add_argument("--rounds", type=int, default=5)
    p.set_defaults(func=cmd_crash)


def add_switch(sub) -> None:
    p = sub.add_parser("switch", help="model switch time with max_loaded_models = 1 (evict A, load B, first token)")
    _model_arg(p)
    p.add_argument("--rounds", type=int, default=5)
    p.set_defaults(func=cmd_switch)
