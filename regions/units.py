"""Human units in config: durations ("90s", "15m", "1h30m"), sizes ("10MB") and rates ("10/s")."""

from __future__ import annotations

import re
from typing import Any

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|kib|mib|gib)?\s*$", re.IGNORECASE)
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_RATE_PERIODS |= {"h": 3600.0, "hour": 3600.0}
_SIZE_FACTORS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def parse_duration(value: Any) -> Any:
    """Seconds from a number or a string like "30s", "15m", "1h30m", "250ms"."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        parts = list(_DURATION_PART.finditer(text))
        if parts and "".join(p.group(0) for p in parts) == text.replace(" ", ""):
            return sum(float(p.group(1)) * _DURATION_FACTORS[p.group(2)] for p in parts)
        try:
            return float(text)
        except ValueError:
            pass
        raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 15m, 6h, 1h30m)")
    return value


def parse_size(value: Any) -> Any:
    """Bytes from a number or a string like "10MB", "512KiB"."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"not a size: {value!r} (use e.g. 512KB, 10MB, 1GiB)")
        unit = (match.group(2) or "b").lower()
        return int(float(match.group(1)) * _SIZE_FACTORS[unit])
    return value


def parse_rate(value: Any) -> Any:
    """Requests per second from a number or a string like "10/s", "600/min", "100/h"."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _RATE.match(value.lower())
        if not match:
            raise ValueError(f"not a rate: {value!r} (use e.g. 10/s, 600/min)")
        return float(match.group(1)) / _RATE_PERIODS[match.group(2)]
    return value
