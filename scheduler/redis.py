"""The central Redis the scheduler keeps its lease, tick claims and last ticks in."""

from __future__ import annotations

import redis

from regions.settings import settings
from scheduler.errors import SchedulerError


class RedisUnavailable(SchedulerError):
    """Redis cannot be reached at start."""


def connect_redis(url: str | None = None) -> redis.Redis:
    """A client with short timeouts (a hung Redis must not hang the beat); checked once."""
    url = url or settings().redis_url
    try:
        client = redis.Redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True
        )
        client.ping()
    except (redis.RedisError, ValueError) as exc:
        raise RedisUnavailable(
            f"cannot reach Redis at {_redact(url)} ({exc}): start redis-server, or point "
            "geoscrape at it with GEOSCRAPE_REDIS_URL"
        ) from exc
    return client


def _redact(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))
