"""Parsing the time filters the query commands and the API accept."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from storage.errors import QueryError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_AGO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
# Everything parse_since accepts (the API's document publishes it): a span ago,
# or an ISO date or date-time. Anything else is refused before parsing, so
# fromisoformat's rarer forms (week dates, basic format) are not half-supported.
TIME_PATTERN = (
    r"^\s*(\d+(\.\d+)?\s*[smhdw]"
    r"|\d{4}-\d{2}-\d{2}([T ]\d{2}(:\d{2}(:\d{2}(\.\d{1,6})?)?)?(Z|[+-]\d{2}:?\d{2})?)?)\s*$"
)
_TIME = re.compile(TIME_PATTERN)


def parse_since(text: str, now: datetime | None = None, what: str = "since") -> datetime:
    """``1d``, ``12h``, ``30m``, ``2w`` ago, or an ISO date/datetime (naive = UTC)."""
    if "\x00" in text:
        raise QueryError(f"{what}: must not contain a NUL character")
    if not _TIME.match(text):
        raise QueryError(
            f"{what}: {text!r} is neither a duration (30m, 12h, 1d, 2w) nor an ISO date/time"
        )
    if match := _AGO.match(text):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        try:
            return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
        except OverflowError:  # a span reaching past year 1
            raise QueryError(f"{what}: {text!r} reaches before the year 1") from None
    try:
        when = datetime.fromisoformat(text.strip())
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except ValueError:
        raise QueryError(
            f"{what}: {text!r} is neither a duration (30m, 12h, 1d, 2w) nor an ISO date/time"
        ) from None
    except OverflowError:  # 9999-12-31T23:59:59-05:00 is past the year 9999 in UTC
        raise QueryError(f"{what}: {text!r} is outside the years 1 to 9999 in UTC") from None
