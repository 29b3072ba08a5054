"""Durations and sizes as users write them.

keep_alive follows Ollama exactly: a JSON number is seconds, a string is a Go
duration ("10m", "1h30m", "500ms", "-1s"); any negative value means "forever"
and 0 means "unload as soon as idle".  A unit-less string such as "10" is
rejected, as Ollama rejects it.  A session of 100 years or more (1e12, 2**70,
an overflowing "99999...h") is "forever" too: no clock can represent its end,
and nobody means less.
"""

from __future__ import annotations

import math
import re

FOREVER = math.inf
# Sessions this long or longer are "forever" (Ollama clamps the same way).
FOREVER_AFTER = 100 * 365.25 * 86400
# A duration string longer than this is not a duration anybody writes.
MAX_DURATION_TEXT = 100

_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class DurationError(ValueError):
    """A value that is not a valid duration; the message says what was expected."""


def parse_go_duration(text: str) -> float:
    """Parse a Go `time.ParseDuration` string into seconds (may be negative)."""
    s = text.strip()
    if len(s) > MAX_DURATION_TEXT:
        raise DurationError(f"expected a duration such as \"5m\", got a string of {len(s)} characters")
    if not s:
        raise DurationError("expected a duration such as \"5m\", \"1h30m\" or \"500ms\", got an empty string")
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _GO_PART.match(s, pos)
        if not m:
            raise DurationError(
                f"expected a duration such as \"5m\", \"1h30m\" or \"500ms\" (a number needs a unit: ns, us, ms, s, m, h), got {text!r}"
            )
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def parse_keep_alive(value: object) -> float:
    """keep_alive → seconds; math.inf for "forever" (any negative value)."""
    if isinstance(value, bool):
        raise DurationError(f"expected a number of seconds or a duration string, got {value!r}")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isnan(value):
            raise DurationError("expected a number of seconds or a duration string, got NaN")
        if isinstance(value, int) and abs(value) >= FOREVER_AFTER:
            return FOREVER  # compared as an int: 10**400 would overflow a float
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_go_duration(value)
    else:
        raise DurationError(f"expected a number of seconds or a duration string, got {type(value).__name__}")
    return FOREVER if seconds < 0 or seconds >= FOREVER_AFTER else seconds


def parse_duration(value: object, *, allow_negative: bool = False) -> float:
    """A plain (non keep_alive) duration: number of seconds or Go duration string."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DurationError(f"expected a number of seconds or a duration string such as \"30s\", got {value!r}")
    seconds = float(value) if not isinstance(value, str) else parse_go_duration(value)
    if not math.isfinite(seconds):
        raise DurationError(f"expected a finite duration, got {value!r}")
    if seconds < 0 and not allow_negative:
        raise DurationError(f"expected a non-negative duration, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds == FOREVER:
        return "forever"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:g}s"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4,
}


def parse_size(value: object) -> int:
    """Bytes from an integer or a string such as "512MiB", "2GB", "1.5GiB"."""
    if isinstance(value, bool):
        raise DurationError(f"expected a size in bytes or a string such as \"2GiB\", got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise DurationError(f"expected a non-negative size, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise DurationError(f"expected a size in bytes or a string such as \"512MiB\" or \"2GiB\", got {value!r}")


def format_size(n: float) -> str:
    for unit, div in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"
