"""systemd's notify protocol (Type=notify), without a dependency.

What the supervisor tells systemd, one datagram each to $NOTIFY_SOCKET:
`READY=1` once it listens; `STATUS=...` (what `systemctl status` shows) when
the loaded models or the queue change; `WATCHDOG=1` every half of
$WATCHDOG_USEC when the unit sets `WatchdogSec=`; `RELOADING=1` with
`MONOTONIC_USEC=` before a reload and `READY=1` after it; `STOPPING=1` when
shutdown starts.

The watchdog pings come from a task on the supervisor's event loop, not from
a thread: a loop that is stuck (a blocking call, a busy loop) stops pinging,
and systemd restarts the daemon, which is the point of the watchdog.

Without $NOTIFY_SOCKET (not started by systemd) nothing is sent.  A send
never raises and never waits long: a notification that cannot be delivered
is dropped, the daemon goes on serving.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Mapping

# A datagram to systemd is queued at once unless systemd is stuck itself;
# never hold the event loop longer than this for one.
SEND_TIMEOUT = 1.0


def enabled() -> bool:
    """Whether systemd asked for notifications ($NOTIFY_SOCKET is set)."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(*states: str) -> bool:
    """Send `states` ("READY=1", "STOPPING=1", "STATUS=...") to systemd, in one
    datagram, if it asked for notifications; True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not states:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.settimeout(SEND_TIMEOUT)
            s.connect(address)
            s.sendall("\n".join(states).encode("utf-8", "replace"))
        return True
    except OSError:
        return False


def status(text: str) -> bool:
    """`STATUS=text`: one line of free text shown by `systemctl status`."""
    return notify("STATUS=" + " ".join(text.split()))


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd's MONOTONIC_USEC= wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading() -> bool:
    """Tell systemd a reload has begun; send `READY=1` once it is over.
    systemd (253 and later) matches the timestamp against its own reload
    request; older versions ignore both fields."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between two WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None
    when systemd wants none: no watchdog set, or one meant for another
    process ($WATCHDOG_PID names someone else)."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1e6 / 2


async def watchdog(interval: float) -> None:
    """Ping systemd's watchdog every `interval` seconds until cancelled."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
