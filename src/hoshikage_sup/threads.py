"""The thread budget: runners share the CPU cores instead of each taking all of them.

llama.cpp collapses when the CPU is oversubscribed: two runners that each
use every core, generating at once on 2 cores, were measured at about 3
tokens/s against 13 for one alone.  A model whose ``n_threads`` is 0 (the
default) gets a *fair share* instead: the cores divided by the number of
CPU runners generating right now, re-read by the runner before every decode
step (see ``hoshikage_runner.threads``), so a runner alone still uses every
core and two at once use half each.

The share travels through a small shared file in the supervisor's private
runtime directory (one little-endian u32 at offset 0).  Writing it is one
store into a mapped page; a runner reads it in well under a microsecond and
calls ``llama_set_n_threads`` only when it changed.  No request, no message,
no lock on the hot path.  Runners with an explicit ``n_threads`` keep it, but
still count as busy (they use the cores too).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from pathlib import Path

from . import policy

FILE_NAME = "thread-budget"  # in the runtime directory; runtime.py sweeps a dead supervisor's
SIZE = 4096
_U32 = struct.Struct("<I")


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask), at least 1."""
    with contextlib.suppress(AttributeError, OSError):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class ThreadBudget:
    """Counts busy CPU runners and publishes each one's fair share of `cpus`."""

    def __init__(self, directory: Path | None, cpus: int | None = None):
        self.cpus = cpus or usable_cpus()
        self.busy = 0
        self.share = self.cpus
        self.path: Path | None = None
        self._map: mmap.mmap | None = None
        if directory is None:
            return
        path = Path(directory) / FILE_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, SIZE)
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self.path = path
        self._publish()

    def _publish(self) -> None:
        if self._map is not None:
            _U32.pack_into(self._map, 0, self.share)

    def started(self) -> None:
        """A CPU runner began serving a request."""
        self.busy += 1
        self._update()

    def finished(self) -> None:
        """A CPU runner has no request left."""
        self.busy = max(0, self.busy - 1)
        self._update()

    def _update(self) -> None:
        share = policy.fair_share(self.cpus, self.busy)
        if share != self.share:
            self.share = share
            self._publish()

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(Exception):
                self._map.close()
            self._map = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
