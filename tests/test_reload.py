"""Applying a new config to a running scheduler (the core of a reload)."""

from __future__ import annotations

import pytest

from hoshikage_sup.config import parse_config
from httputil import post_json

DEADLINE = 60.0


def chat(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


async def test_apply_config_keeps_unchanged_runners_and_replaces_the_rest(make_server, http, demo_model, tmp_path):
    h = await make_server({"same": {}, "changed": {}, "gone": {}, "renamed_alias": {"aliases": ["old"]}},
                          server={"max_loaded_models": 5})
    for model in ("same", "changed", "gone", "renamed_alias"):
        status, body, _ = await post_json(http, h.url + "/v1/chat/completions", chat(model))
        assert status == 200, body
    sched = h.scheduler
    pids = {name: slot.replicas[0].process.pid for name, slot in sched.slots.items()}
    table = {
        "server": {"host": "127.0.0.1", "port": 0, "max_queue": 7, "max_loaded_models": 5},
        "models": {
            "same": {"path": str(demo_model), "n_ctx": 256},
            "changed": {"path": str(demo_model), "n_ctx": 512},
            # keep_alive and aliases are not the runner's business: same runner
            "renamed_alias": {"path": str(demo_model), "n_ctx": 256, "aliases": ["new"], "keep_alive": "1h"},
            "added": {"path": str(demo_model), "n_ctx": 256},
        },
    }
    new = parse_config(table, base_dir=tmp_path)
    h.gateway.config = new  # what Server.reload does for the API layers
    changes = sched.apply_config(new)
    assert changes == {"added": ["added"], "removed": ["gone"], "restarted": ["changed"],
                       "updated": ["renamed_alias"], "unchanged": ["same"]}
    assert sched.config.server.max_queue == 7
    await sched.wait_idle(DEADLINE)
    # The changed model is restarted without downtime: its new runner replaces the old.
    await h.scheduler.wait_until(lambda: "gone" not in sched.slots and sched.slots["changed"].replicas and all(
        r.process.pid != pids["changed"] for r in sched.slots["changed"].replicas), DEADLINE)
    for model in ("same", "changed", "renamed_alias", "new", "added"):
        status, body, _ = await post_json(http, h.url + "/v1/chat/completions", chat(model))
        assert status == 200, (model, body)
    status, body, _ = await post_json(http, h.url + "/v1/chat/completions", chat("gone"))
    assert status == 404
    assert sched.slots["same"].replicas[0].process.pid == pids["same"]
    assert sched.slots["renamed_alias"].replicas[0].process.pid == pids["renamed_alias"]
    assert sched.slots["renamed_alias"].session == 3600
    assert sched.slots["changed"].replicas[0].process.pid != pids["changed"]
    assert sched.slots["changed"].replicas[0].plan.n_ctx == 512
    assert sched.invariants() == []


async def test_a_runner_is_restarted_exactly_when_its_spec_changes(make_server, http, demo_model, tmp_path):
    h = await make_server({"a": {}, "b": {}, "c": {}}, server={"max_loaded_models": 5})
    for model in ("a", "b", "c"):
        assert (await post_json(http, h.url + "/v1/chat/completions", chat(model)))[0] == 200
    base = {"path": str(demo_model), "n_ctx": 256}
    new = parse_config({"server": {"host": "127.0.0.1", "port": 0, "max_loaded_models": 5}, "models": {
        "a": {**base, "chat_format": "chatml"},  # what the runner is told changes
        "b": {**base, "options": {"temperature": 0.1}, "pinned": True},  # request defaults only
        "c": {**base, "n_threads": 0},  # the default spelled out: the same spec
    }}, base_dir=tmp_path)
    changes = h.scheduler.apply_config(new)
    assert changes["restarted"] == ["a"] and changes["updated"] == ["b"] and changes["unchanged"] == ["c"]
