"""RAM staging: copy a model's GGUF files to a RAM-backed directory before loading it.

A model with ``stage = "ram"`` (or every model, from ``[server] stage``) is
copied into ``stage_dir`` (``/dev/shm/hoshikage`` by default, a tmpfs) before
its runner starts, and the runner loads the copy: loads from slow disks,
network mounts or spinning drives then read from RAM, and a reload never
touches the disk again.  The copy:

* is made only when free RAM allows it beside the runners (available RAM
  less the system reserve and the runner's own estimate); otherwise the
  model loads from its original path and a warning says why;
* covers every part of a split GGUF (``name-00001-of-00003.gguf`` ...);
* is written to a temporary name, verified by size and then renamed, so a
  failed or interrupted copy never leaves a partial file that a runner
  could load (the temporary file is removed on any failure);
* counts in memory accounting (`staged_bytes`) while no runner maps it
  (a runner that does map it shares its pages: tmpfs pages are the page
  cache);
* is removed ``stage_keep`` (60 min by default) after the model's last
  runner is gone, when the config no longer stages the model, and at
  shutdown.

The supervisor's `RunnerSpec` keeps the configured path (a reload compares
specs, and a staged copy must not look like a different model); the runner
process is told the staged path separately (`RunnerProcess.load_path`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil

from .durations import format_size
from .logs import get_logger

log = get_logger("hoshikage.staging")

_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
_COPY_CHUNK = 8 * 1024 * 1024


def model_files(path: Path) -> list[Path]:
    """The GGUF file and, for a split model, every part (named from its first part)."""
    m = _SPLIT.match(path.name)
    if not m:
        return [path]
    count = int(m.group("count"))
    return [path.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


@dataclass
class Staged:
    name: str
    source: Path
    directory: Path
    files: list[Path]
    size: int
    users: int = 0  # runners of the model not yet gone
    expire: asyncio.TimerHandle | None = None

    @property
    def path(self) -> Path:
        """The staged copy of the configured file (the first part of a split model)."""
        return self.directory / self.source.name


class StageError(Exception):
    """The copy could not be made; the model loads from its original path."""


class Stager:
    """Owns the staged copies: makes them, counts them, and removes them."""

    def __init__(self, directory: Path, *, keep: float, reserve: int,
                 available: Callable[[], int] | None = None, events: object | None = None):
        self.directory = Path(directory)
        self.keep = keep
        self.reserve = reserve
        self._available = available or (lambda: psutil.virtual_memory().available)
        self.events = events
        self.staged: dict[str, Staged] = {}
        self._copying: dict[str, asyncio.Future[Staged]] = {}
        self._stop = threading.Event()  # tells copies in progress (in threads) to give up and clean up
        self.closed = False

    # ------------------------------------------------------------ staging

    async def stage(self, name: str, source: Path, *, also_needed: int = 0) -> Path:
        """The path the runner should load: the staged copy, made now if needed, or
        `source` when it cannot be made (with a warning).  `also_needed` is the
        RAM the runner itself will take beside the copy."""
        existing = self.staged.get(name)
        if existing is not None and existing.source == source and self._intact(existing):
            self._use(existing)
            return existing.path
        if existing is not None:
            self._remove(existing)
        pending = self._copying.get(name)
        if pending is None:
            pending = asyncio.ensure_future(self._copy(name, source, also_needed))
            self._copying[name] = pending
            pending.add_done_callback(lambda _f, n=name: self._copying.pop(n, None))
        try:
            staged = await asyncio.shield(pending)
        except StageError as e:
            log.warning("not staging; loading from the original path", model=name, source=str(source), reason=str(e))
            self._record(name, "skipped", str(e))
            return source
        self._use(staged)
        return staged.path

    async def _copy(self, name: str, source: Path, also_needed: int) -> Staged:
        files = model_files(source)
        try:
            size = sum(f.stat().st_size for f in files)
        except OSError as e:
            raise StageError(f"cannot read {e.filename}: {e.strerror}") from e
        room = self._available() - self.reserve - also_needed
        if size > room:
            raise StageError(f"the copy needs {format_size(size)} of RAM, {format_size(max(0, room))} is free "
                             f"beside the runner and the system reserve")
        directory = self.directory / _dir_name(name, source)
        started = time.monotonic()
        try:
            await asyncio.to_thread(_copy_files, files, directory, self._stop)
        except OSError as e:
            raise StageError(f"copy to {directory} failed: {e.strerror or e}") from e
        staged = Staged(name, source, directory, [directory / f.name for f in files], size)
        self.staged[name] = staged
        seconds = time.monotonic() - started
        log.info("staged", model=name, path=str(staged.path), size=format_size(size), seconds=round(seconds, 3))
        self._record(name, "staged", f"{format_size(size)} in {seconds:.2f} s", path=str(staged.path), size=size)
        return staged

    def _intact(self, staged: Staged) -> bool:
        try:
            return sum(f.stat().st_size for f in staged.files) == staged.size
        except OSError:
            return False

    # ------------------------------------------------------------ lifetime

    def _use(self, staged: Staged) -> None:
        staged.users += 1
        if staged.expire is not None:
            staged.expire.cancel()
            staged.expire = None

    def released(self, name: str, load_path: str | None) -> None:
        """A runner that loaded `load_path` is gone; the last one starts the `stage_keep` timer."""
        staged = self.staged.get(name)
        if staged is None or load_path != str(staged.path):
            return
        staged.users = max(0, staged.users - 1)
        if staged.users == 0 and not self.closed:
            if staged.expire is not None:
                staged.expire.cancel()
            loop = asyncio.get_running_loop()
            staged.expire = loop.call_later(self.keep, self._expire, name)

    def _expire(self, name: str) -> None:
        staged = self.staged.get(name)
        if staged is not None and staged.users == 0:
            self._remove(staged)
            self._record(name, "unstaged", "stage_keep")

    def forget(self, names_kept: set[str]) -> None:
        """After a reload: remove the copies of models that are no longer staged (and unused)."""
        for name, staged in list(self.staged.items()):
            if name not in names_kept and staged.users == 0:
                self._remove(staged)
                self._record(name, "unstaged", "reload")

    def _remove(self, staged: Staged) -> None:
        if staged.expire is not None:
            staged.expire.cancel()
        self.staged.pop(staged.name, None)
        shutil.rmtree(staged.directory, ignore_errors=True)
        log.info("removed staged copy", model=staged.name, path=str(staged.directory))

    def staged_bytes(self) -> int:
        """RAM held by copies no runner maps (a mapped copy is the runner's weights)."""
        return sum(s.size for s in self.staged.values() if s.users == 0)

    async def close(self) -> None:
        """Shutdown: wait for copies in progress, then remove every copy."""
        self.closed = True
        self._stop.set()
        for pending in list(self._copying.values()):
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        for staged in list(self.staged.values()):
            self._remove(staged)

    def _record(self, name: str, reason: str, detail: str, **extra: object) -> None:
        record = getattr(self.events, "record", None)
        if record is not None:
            record("staging", name, reason, detail=detail, **extra)


def _dir_name(name: str, source: Path) -> str:
    """One directory per model and source file, safe as a file name."""
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return f"{safe}-{digest}"


def _copy_files(files: list[Path], directory: Path, stop: threading.Event | None = None) -> None:
    """Copy each file to `directory` through a temporary name, checked by size, then renamed.

    Any failure (no space, a vanished source, an interruption) removes what
    was written, including the directory when it was made for this copy.
    """
    made = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    done: list[Path] = []
    try:
        for f in files:
            target = directory / f.name
            tmp = directory / f".{f.name}.partial"
            try:
                expected = f.stat().st_size
                with open(f, "rb") as src, open(tmp, "wb") as dst:
                    while chunk := src.read(_COPY_CHUNK):
                        if stop is not None and stop.is_set():
                            raise OSError(f"copy of {f} cancelled: shutting down")
                        dst.write(chunk)
                if tmp.stat().st_size != expected:
                    raise OSError(f"size mismatch copying {f}: {tmp.stat().st_size} of {expected} bytes")
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            done.append(target)
    except BaseException:
        for target in done:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
        if made:
            shutil.rmtree(directory, ignore_errors=True)
        raise
