"""GET /metrics: Prometheus text format, figures that follow the scheduler."""

from __future__ import annotations

import re

import aiohttp
import pytest

from hoshikage_sup.devices import CpuSource

SAMPLE = re.compile(r'^([a-z_]+)(\{([a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*)\})? (-?[0-9.e+]+)$')


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every line is a comment or a well-formed sample."""
    out = []
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample: {line!r}"
        labels = dict(re.findall(r'([a-z_]+)="([^"]*)"', m.group(3) or ""))
        out.append((m.group(1), labels, float(m.group(5))))
    return out


def value(samples, name: str, **labels: str) -> float:
    found = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


async def scrape(http, url: str):
    async with http.get(url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(await r.text())


async def test_metrics_follow_requests_loads_and_unloads(make_server, http):
    h = await make_server({"m": {}, "other": {}}, server={"max_loaded_models": 1}, devices=CpuSource())
    before = await scrape(http, h.url)
    assert value(before, "hoshikage_requests_total") == 0
    assert value(before, "hoshikage_models_loaded") == 0
    assert value(before, "hoshikage_max_loaded_models") == 1

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(h.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
    after = await scrape(http, h.url)
    assert value(after, "hoshikage_requests_total") == 1
    assert value(after, "hoshikage_loads_total") == 1
    assert value(after, "hoshikage_models_loaded") == 1
    assert value(after, "hoshikage_model_requests_in_flight", model="m") == 0
    assert value(after, "hoshikage_model_replicas", model="m", state="ready") == 1
    assert value(after, "hoshikage_model_memory_bytes", model="m", kind="estimate", device="cpu") > 0
    assert value(after, "hoshikage_model_memory_bytes", model="m", kind="measured", device="cpu") > 0

    body["model"] = "other"  # max_loaded_models = 1: m is evicted
    async with http.post(h.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
    last = await scrape(http, h.url)
    assert value(last, "hoshikage_evictions_total") == 1
    assert value(last, "hoshikage_requests_total") == 2
    assert not [s for s in last if s[1].get("model") == "m"]
