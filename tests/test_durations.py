import math

import pytest

from hoshikage_sup.durations import DurationError, parse_keep_alive, parse_size

VALID = [
    (0, 0.0),
    (30, 30.0),
    (1.5, 1.5),
    (-1, math.inf),
    (-0.5, math.inf),
    ("0", 0.0),
    ("0s", 0.0),
    ("10m", 600.0),
    ("1h30m", 5400.0),
    ("500ms", 0.5),
    ("1.5h", 5400.0),
    ("2h45m30s", 9930.0),
    ("100us", 100e-6),
    ("-1s", math.inf),
    ("-5m", math.inf),
    ("+3s", 3.0),
    (" 5m ", 300.0),
]

INVALID = ["10", "", "abc", "5 m", "m5", "1d", "1.5.5s", "--1s", True, None, [], {}, float("nan")]


@pytest.mark.parametrize("value,expected", VALID)
def test_keep_alive_valid(value, expected):
    assert parse_keep_alive(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", INVALID)
def test_keep_alive_invalid(value):
    with pytest.raises(DurationError) as e:
        parse_keep_alive(value)
    assert "expected" in str(e.value)


@pytest.mark.parametrize(
    "value,expected",
    [(0, 0), (1024, 1024), ("512MiB", 512 * 1024**2), ("2GiB", 2 * 1024**3), ("2GB", 2 * 10**9), ("1.5GiB", int(1.5 * 1024**3))],
)
def test_sizes(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["lots", -1, "1PB", True, 1.5])
def test_sizes_invalid(value):
    with pytest.raises(DurationError):
        parse_size(value)
