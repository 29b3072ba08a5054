"""Chaos: clients over two models while runners are SIGKILLed again and again.

Every request must end within a bound, either in success or in a clean
error (a JSON error in its API's shape, or a stream that ends with an error
event and `[DONE]` / an `{"error"}` line); none may hang and none may be
malformed.  A runner serves one request at a time, so one SIGKILL can cost
at most the one request it was serving: every request that had not reached
a runner yet is served by a replacement (the gateway's retry and the
scheduler's restart).  The figures are printed for the record.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import statistics
import time
from collections import Counter
from typing import Any

import aiohttp

DURATION = float(os.environ.get("HOSHIKAGE_CHAOS_SECONDS", "20"))
CLIENTS = 10
BOUND = 45.0  # seconds a single request may take before it counts as hung


async def one_request(http: aiohttp.ClientSession, url: str, rng: random.Random) -> tuple[str, str, str]:
    """(model, outcome, detail): outcome is "ok", "error" (clean) or "malformed"."""
    model = rng.choice(["a", "b"])
    kind = rng.choice(["openai", "openai-stream", "ollama", "ollama-stream"])
    fake = {"tokens": rng.randint(2, 8), "delay": 0.02}
    if kind.startswith("openai"):
        stream = kind.endswith("stream")
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, "fake": fake}
        async with http.post(url + "/v1/chat/completions", json=body) as r:
            raw = await r.read()
            if r.status != 200:
                return model, *_error(raw, openai=True)
            if not stream:
                data = json.loads(raw)
                return model, ("ok" if data["choices"][0]["message"]["content"] else "malformed"), ""
            events = [e for e in raw.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]
            if not events or events[-1] != b"data: [DONE]":
                return model, "malformed", f"stream without [DONE]: {raw[-200:]!r}"
            objs = [json.loads(e[5:]) for e in events[:-1]]
            if any("error" in o for o in objs):
                last = objs[-1]
                ok = "error" in last and isinstance(last["error"], dict) and last["error"].get("message")
                return model, ("error" if ok else "malformed"), str(last)[:200]
            return model, "ok", ""
    stream = kind.endswith("stream")
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    async with http.post(url + "/api/chat", json=body) as r:
        raw = await r.read()
        if r.status != 200:
            return model, *_error(raw, openai=False)
        lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        if not lines:
            return model, "malformed", "empty body"
        last = lines[-1]
        if isinstance(last.get("error"), str) and last["error"]:
            return model, "error", last["error"][:200]
        return model, ("ok" if last.get("done") is True else "malformed"), str(last)[:200]


def _error(raw: bytes, *, openai: bool) -> tuple[str, str]:
    try:
        data = json.loads(raw)
    except ValueError:
        return "malformed", raw[:200].decode("utf-8", "replace")
    err = data.get("error") if isinstance(data, dict) else None
    ok = (isinstance(err, dict) and isinstance(err.get("message"), str)) if openai else (isinstance(err, str) and err)
    return ("error" if ok else "malformed"), str(err)[:200]


async def test_sigkilled_runners_cost_only_their_own_request(make_server):
    h = await make_server({"a": {"parallel": 2}, "b": {}})
    rng = random.Random(8)
    outcomes: Counter = Counter()
    details: list[str] = []
    successes: list[tuple[float, str]] = []  # (time, model)
    kills: list[tuple[float, str]] = []
    stop_at = time.monotonic() + DURATION

    async def client(i: int, http: aiohttp.ClientSession) -> None:
        crng = random.Random(i)
        while time.monotonic() < stop_at:
            try:
                model, outcome, detail = await asyncio.wait_for(one_request(http, h.url, crng), BOUND)
            except asyncio.TimeoutError:
                outcome, model, detail = "hung", "?", ""
            outcomes[outcome] += 1
            if outcome == "ok":
                successes.append((time.monotonic(), model))
            elif detail:
                details.append(f"{outcome}: {detail}")

    async def killer() -> None:
        await asyncio.sleep(1.0)
        while time.monotonic() < stop_at - 2.0:
            ready = [(r.process.pid, s.name) for s in list(h.scheduler.slots.values())
                     for r in s.replicas if r.state == "ready" and r.process.pid]
            if ready:
                pid, model = rng.choice(ready)
                kills.append((time.monotonic(), model))
                os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(rng.uniform(0.8, 1.6))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND + 5)) as http:
        await asyncio.gather(killer(), *(client(i, http) for i in range(CLIENTS)))

    recovery = []
    for t_kill, model in kills:
        after = [t for t, m in successes if m == model and t > t_kill]
        if after:
            recovery.append(min(after) - t_kill)
    sent = sum(outcomes.values())
    print(f"chaos figures: sent={sent} ok={outcomes['ok']} clean_errors={outcomes['error']} hung={outcomes['hung']} "
          f"malformed={outcomes['malformed']} kills={len(kills)} "
          f"median_kill_to_next_success={statistics.median(recovery) if recovery else None:.3f}s")
    assert outcomes["hung"] == 0, details
    assert outcomes["malformed"] == 0, details
    assert len(kills) >= 5
    # One runner serves one request at a time: a kill costs at most that one.
    assert outcomes["error"] <= len(kills), details
    assert outcomes["ok"] >= sent - len(kills)
    await h.scheduler.wait_idle(BOUND)
    assert h.scheduler.invariants() == []
