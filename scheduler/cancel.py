"""Cancelling runs: `geoscrape cancel RUN` marks a run, workers read the mark.

The store learns of a cancel over the bus, like every other verdict (a
RunFinished with status `cancelled`, sent by the CLI). Workers cannot read the
store, so the mark they check lives in Redis: one key per run, with a TTL
longer than any job waits in a queue. A worker checks it when a job is
delivered (a cancelled job is dropped, not run) and while the crawl runs
(the crawl is aborted, the items it sent so far are kept).

A worker that cannot reach Redis never sees the mark: its crawl runs to the
end, but the run stays `cancelled` (the first final status wins in the store).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from regions.settings import settings
from scheduler.redis import connect_redis

log = logging.getLogger("geoscrape.cancel")

MARK_TTL_SECONDS = 7 * 24 * 3600  # longer than any job's expiry (defaults.expires: 1h)
CHECK_INTERVAL = 1.0  # seconds between two Redis reads for one run


def mark_key(run_id: str) -> str:
    return f"{settings().redis_prefix}cancel:{run_id}"


def mark_cancelled(run_id: str, url: str | None = None) -> None:
    """Set the run's cancel mark (RedisUnavailable if Redis cannot be reached)."""
    client = connect_redis(url)
    try:
        client.set(mark_key(run_id), "1", ex=MARK_TTL_SECONDS)
    finally:
        client.close()


class CancelMarks:
    """`marks(run_id)`: is the run cancelled? Read from Redis at most once a second
    per run (the crawl runner asks several times a second); Redis errors read as
    "not cancelled", logged once, so a Redis outage never stops a crawl."""

    def __init__(self, url: str | None = None, clock: Callable[[], float] = time.monotonic):
        self._url = url
        self._client: redis.Redis | None = None
        self._clock = clock
        self._checked: dict[str, tuple[float, bool]] = {}
        self._warned = False

    def __call__(self, run_id: str) -> bool:
        now = self._clock()
        checked = self._checked.get(run_id)
        if checked is not None and (checked[1] or now - checked[0] < CHECK_INTERVAL):
            return checked[1]
        cancelled = self._read(run_id)
        if len(self._checked) > 1000:  # runs of long ago
            self._checked.clear()
        self._checked[run_id] = (now, cancelled)
        return cancelled

    def _read(self, run_id: str) -> bool:
        try:
            if self._client is None:
                self._client = connect_redis(self._url)
            return bool(self._client.exists(mark_key(run_id)))
        except Exception as exc:  # RedisUnavailable, redis.RedisError
            self._client = None
            if not self._warned:
                log.warning("cannot read cancel marks (%s): cancels are not seen here", exc)
                self._warned = True
            return False
