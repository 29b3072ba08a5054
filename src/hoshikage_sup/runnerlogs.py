"""What each model's runners printed, kept where ops can read it.

A runner that crashed is gone, and with it the only copy of its last words
unless somebody kept them: the supervisor's log has them, mixed with every
other runner's, and `RunnerProcess.output_tail` only lives as long as the
process object.  So every model has a `RunnerLog`: the last lines its
runners printed (all replicas together, `DEFAULT_LINES` at most), each with
its time, replica, pid and whether it looks like an error (`process.ERROR_LINE`).
It outlives the runners, so `/admin/models/{name}/logs` shows why a runner
crashed after the scheduler has already replaced it, and it can be followed
live.

`RunnerProcess` knows nothing of this module: it takes an optional `output`
callable, and the scheduler's spawn hands it the model's `RunnerLog.append`.
The registry (`RunnerLogs`, one per supervisor) hangs off the scheduler as
the attribute `runner_logs`, created on first use by `runner_logs_of`: the
scheduler is the one object the spawn function and every API handler can
both reach, and it lives exactly as long as the runners whose output it
keeps.

A runner's secret reaches it on stdin and is never printed; `RunnerProcess`
also blanks it out of any line before the line gets here.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator

# Lines kept per model, across its replicas; older ones are only in the supervisor's log.
DEFAULT_LINES = 2000
# And at most this many characters per model (a line is at most 4 KiB, see process.MAX_LINE_BYTES).
DEFAULT_CHARS = 2 * 1024 * 1024


@dataclass(frozen=True)
class LogLine:
    seq: int  # increasing per model, so a reader can ask for what came after the last line it saw
    time: float  # wall clock
    replica: int
    pid: int | None
    error: bool  # looks like the reason for a failure (process.ERROR_LINE)
    text: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class RunnerLog:
    """One model's runner output: a bounded ring of lines that can be followed."""

    def __init__(self, model: str, *, max_lines: int = DEFAULT_LINES, max_chars: int = DEFAULT_CHARS):
        self.model = model
        self.max_chars = max_chars
        self._lines: deque[LogLine] = deque(maxlen=max_lines)
        self._chars = 0
        self._seq = itertools.count(1)
        self._waiters: set[asyncio.Event] = set()

    def append(self, replica: int, pid: int | None, text: str, error: bool = False) -> LogLine:
        """Keep one line (the `output` callable of a RunnerProcess) and wake the followers."""
        line = LogLine(seq=next(self._seq), time=time.time(), replica=replica, pid=pid, error=error, text=text)
        if len(self._lines) == self._lines.maxlen:
            self._chars -= len(self._lines[0].text)
        self._lines.append(line)
        self._chars += len(text)
        while self._chars > self.max_chars and len(self._lines) > 1:
            self._chars -= len(self._lines.popleft().text)
        for waiter in self._waiters:
            waiter.set()
        return line

    def __len__(self) -> int:
        return len(self._lines)

    @property
    def last_seq(self) -> int:
        return self._lines[-1].seq if self._lines else 0

    def recent(self, *, after: int = 0, limit: int | None = None) -> list[LogLine]:
        """Lines with seq > `after`, oldest first; only the last `limit` when given."""
        if after <= 0 or not self._lines or self._lines[0].seq > after:
            out = list(self._lines)
        else:
            out = [line for line in self._lines if line.seq > after]
        if limit is not None:
            out = out[-limit:] if limit > 0 else []
        return out

    async def follow(self, *, after: int = 0) -> AsyncIterator[LogLine]:
        """The lines after `after`, then each new one as it comes, until cancelled."""
        last = after
        waiter = asyncio.Event()
        self._waiters.add(waiter)
        try:
            while True:
                waiter.clear()
                for line in self.recent(after=last):
                    last = line.seq
                    yield line
                if self.last_seq <= last:
                    await waiter.wait()
        finally:
            self._waiters.discard(waiter)


class RunnerLogs:
    """The `RunnerLog` of every model that has had a runner, by configured name."""

    def __init__(self, *, max_lines: int = DEFAULT_LINES, max_chars: int = DEFAULT_CHARS):
        self.max_lines = max_lines
        self.max_chars = max_chars
        self._logs: dict[str, RunnerLog] = {}

    def for_model(self, name: str) -> RunnerLog:
        """The model's log, created empty on first use."""
        log = self._logs.get(name)
        if log is None:
            log = self._logs[name] = RunnerLog(name, max_lines=self.max_lines, max_chars=self.max_chars)
        return log

    def get(self, name: str) -> RunnerLog | None:
        return self._logs.get(name)

    def names(self) -> list[str]:
        return sorted(self._logs)


def runner_logs_of(scheduler: Any) -> RunnerLogs:
    """The registry of `scheduler` (its `runner_logs` attribute), made on first use."""
    logs = getattr(scheduler, "runner_logs", None)
    if logs is None:
        logs = RunnerLogs()
        scheduler.runner_logs = logs
    return logs
