"""RAM staging: copies in a real tmpfs, their lifetime, the fallback, and no partial files."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest

from hoshikage_sup import staging
from hoshikage_sup.staging import Stager, model_files
from httputil import post_json

SHM = Path("/dev/shm")
needs_tmpfs = pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm tmpfs on this machine")


@pytest.fixture
def stage_dir():
    """A fresh directory in the real tmpfs, removed afterwards."""
    d = SHM / f"hoshikage-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_model(tmp_path: Path, name: str = "m.gguf", size: int = 3 * 1024 * 1024 + 17) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def leftovers(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) if directory.exists() else []


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_model_files_lists_every_split_part(tmp_path: Path) -> None:
    assert model_files(tmp_path / "m.gguf") == [tmp_path / "m.gguf"]
    parts = model_files(tmp_path / "big-00001-of-00003.gguf")
    assert [p.name for p in parts] == ["big-00001-of-00003.gguf", "big-00002-of-00003.gguf", "big-00003-of-00003.gguf"]


@needs_tmpfs
async def test_copy_is_made_verified_reused_and_expires(tmp_path: Path, stage_dir: Path) -> None:
    source = make_model(tmp_path)
    stager = Stager(stage_dir, keep=0.3, reserve=0)
    path = await stager.stage("m", source)
    assert path != source and path.parent.parent == stage_dir
    assert path.read_bytes() == source.read_bytes()
    assert stager.staged_bytes() == 0  # a runner maps it: its pages are that runner's weights
    again = await stager.stage("m", source)  # a second replica: the same copy
    assert again == path and stager.staged["m"].users == 2
    stager.released("m", str(path))
    assert stager.staged["m"].expire is None  # one runner still has it
    stager.released("m", str(path))
    assert stager.staged_bytes() == source.stat().st_size  # unmapped: counted as held RAM
    await until(lambda: "m" not in stager.staged, timeout=5)
    assert not path.exists() and leftovers(stage_dir) == []


@needs_tmpfs
async def test_a_new_runner_cancels_the_expiry(tmp_path: Path, stage_dir: Path) -> None:
    source = make_model(tmp_path)
    stager = Stager(stage_dir, keep=0.3, reserve=0)
    path = await stager.stage("m", source)
    stager.released("m", str(path))
    assert await stager.stage("m", source) == path
    await asyncio.sleep(0.5)
    assert path.exists()
    await stager.close()
    assert leftovers(stage_dir) == []


@needs_tmpfs
async def test_split_models_are_copied_whole(tmp_path: Path, stage_dir: Path) -> None:
    parts = [make_model(tmp_path, f"big-{i:05d}-of-00003.gguf", 1000 + i) for i in (1, 2, 3)]
    stager = Stager(stage_dir, keep=60, reserve=0)
    path = await stager.stage("big", parts[0])
    assert path.name == parts[0].name
    for part in parts:
        assert (path.parent / part.name).read_bytes() == part.read_bytes()
    await stager.close()
    assert leftovers(stage_dir) == []


@needs_tmpfs
async def test_a_copy_that_does_not_fit_falls_back_to_the_original(tmp_path: Path, stage_dir: Path) -> None:
    source = make_model(tmp_path)
    stager = Stager(stage_dir, keep=60, reserve=1024, available=lambda: source.stat().st_size + 2048)
    path = await stager.stage("m", source, also_needed=4096)  # runner + reserve leave too little
    assert path == source and not stager.staged and leftovers(stage_dir) == []


@needs_tmpfs
async def test_a_failed_copy_leaves_nothing(tmp_path: Path, stage_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = [make_model(tmp_path, f"big-{i:05d}-of-00002.gguf", 5 * 1024 * 1024) for i in (1, 2)]
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):  # the second part hits a full disk at the last moment
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(staging.os, "replace", failing_replace)
    stager = Stager(stage_dir, keep=60, reserve=0)
    path = await stager.stage("big", parts[0])
    assert path == parts[0] and not stager.staged
    assert leftovers(stage_dir) == []  # neither the first part nor the partial second one
    # a part that is missing is also a clean fallback
    parts[1].unlink()
    monkeypatch.setattr(staging.os, "replace", real_replace)
    assert await stager.stage("big", parts[0]) == parts[0] and leftovers(stage_dir) == []


@needs_tmpfs
async def test_shutdown_during_a_copy_leaves_nothing(tmp_path: Path, stage_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = make_model(tmp_path, size=64 * 1024 * 1024)
    monkeypatch.setattr(staging, "_COPY_CHUNK", 64 * 1024)  # many chunks: the stop lands mid-copy
    stager = Stager(stage_dir, keep=60, reserve=0)
    task = asyncio.ensure_future(stager.stage("m", source))
    await until(lambda: any(p.name.endswith(".partial") for p in stage_dir.rglob("*")) if stage_dir.exists() else False)
    await stager.close()
    task.cancel()
    with pytest.raises(BaseException):
        await task
    await until(lambda: leftovers(stage_dir) == [], timeout=10)


# ------------------------------------------------------------------ through the supervisor


@needs_tmpfs
async def test_runner_loads_the_staged_copy_and_it_goes_after_stage_keep(http, make_server, stage_dir: Path) -> None:
    h = await make_server({"a": {"stage": "ram"}, "b": {}},
                          server={"stage_dir": str(stage_dir), "stage_keep": "300ms", "runner_pool": 0})
    status, _, _ = await post_json(http, f"{h.url}/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2})
    assert status == 200
    (replica,) = h.scheduler.slots["a"].replicas
    staged = Path(replica.process.load_path)
    assert staged.is_file() and staged.parent.parent == stage_dir
    assert replica.process.spec.model_path != str(staged)  # the spec keeps the configured path (reload compares it)
    assert staged.stat().st_size == Path(replica.process.spec.model_path).stat().st_size
    assert [e for e in h.scheduler.events.recent() if e.kind == "staging" and e.reason == "staged"]
    status, _, _ = await post_json(http, f"{h.url}/v1/completions", {"model": "b", "prompt": "hi", "max_tokens": 2})
    assert status == 200 and h.scheduler.slots["b"].replicas[0].process.load_path is None  # b is not staged
    async with http.post(f"{h.url}/admin/models/a/unload") as r:
        assert r.status == 200
    assert staged.exists()  # kept for stage_keep after the unload
    await until(lambda: not staged.exists(), timeout=5)
    assert leftovers(stage_dir) == []


@needs_tmpfs
async def test_shutdown_removes_staged_copies(http, make_server, stage_dir: Path) -> None:
    h = await make_server({"a": {}}, server={"stage": "ram", "stage_dir": str(stage_dir), "runner_pool": 0})
    status, _, _ = await post_json(http, f"{h.url}/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2})
    assert status == 200
    assert leftovers(stage_dir)
    await h.server.shutdown()
    assert leftovers(stage_dir) == []


@needs_tmpfs
async def test_staging_that_does_not_fit_loads_from_the_original(http, make_server, stage_dir: Path) -> None:
    from hoshikage_sup.devices import SimulatedSource

    h = await make_server({"a": {"stage": "ram"}}, server={"stage_dir": str(stage_dir), "runner_pool": 0},
                          devices=SimulatedSource(system_total=64 * 2**30))
    h.scheduler.pool.stager._available = lambda: 10 * 2**20  # the real RAM is short today
    status, _, _ = await post_json(http, f"{h.url}/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2})
    assert status == 200
    assert h.scheduler.slots["a"].replicas[0].process.load_path is None
    assert [e for e in h.scheduler.events.recent() if e.kind == "staging" and e.reason == "skipped"]
    assert leftovers(stage_dir) == []


@pytest.mark.model
@needs_tmpfs
async def test_real_runner_maps_the_staged_copy(http, make_server, stage_dir: Path) -> None:
    h = await make_server({"gemma": {"chat_format": "gemma", "n_threads": 1, "stage": "ram"}},
                          server={"stage_dir": str(stage_dir), "runner_pool": 0}, real=True)
    status, body, _ = await post_json(http, f"{h.url}/v1/completions",
                                      {"model": "gemma", "prompt": "Once upon a time", "max_tokens": 3})
    assert status == 200, body
    process = h.scheduler.slots["gemma"].replicas[0].process
    maps = Path(f"/proc/{process.pid}/maps").read_text()
    assert process.load_path in maps and process.spec.model_path not in maps


def test_config_keys(tmp_path: Path) -> None:
    from hoshikage_sup.config import ConfigError, parse_config

    model = make_model(tmp_path, size=16)
    cfg = parse_config({"server": {"stage": "ram", "stage_dir": "shm", "stage_keep": "10m"},
                        "models": {"a": {"path": str(model)}, "b": {"path": str(model), "stage": "off"}}},
                       base_dir=tmp_path)
    assert (cfg.server.stage, cfg.server.stage_dir, cfg.server.stage_keep) == ("ram", tmp_path / "shm", 600.0)
    assert cfg.models["a"].stage is None and cfg.models["b"].stage == "off"
    with pytest.raises(ConfigError) as e:
        parse_config({"server": {"stage": "disk"}, "models": {"a": {"path": str(model), "stage": True}}},
                     base_dir=tmp_path)
    assert "server.stage" in str(e.value) and "'off', 'ram'" in str(e.value) and "models.a.stage" in str(e.value)
