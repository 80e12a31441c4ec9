"""Parsing the time filters the query commands and the API accept."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from storage.errors import QueryError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_AGO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_since(text: str, now: datetime | None = None, what: str = "since") -> datetime:
    """``1d``, ``12h``, ``30m``, ``2w`` ago, or an ISO date/datetime (naive = UTC)."""
    if match := _AGO.match(text):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise QueryError(
            f"{what}: {text!r} is neither a duration (30m, 12h, 1d, 2w) nor an ISO date/time"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
