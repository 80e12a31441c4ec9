"""The Redis frontier of a distributed run: one crawl shared by a region's workers.

A site with `distributed: true` runs as one run whose URL queue, seen-set and
page count live in Redis; the worker that got the job (the run's *owner*) and
every free worker of the region that joins it (*participants*,
scraper/distributed.py) pull requests from it. Keys, under
`{prefix}frontier:{run_id}:`:

- `queue`   list of entries (JSON: url, fingerprint, the request's depth and
            retry/redirect state), first in, first out;
- `seen`    set of request fingerprints: a URL enters the queue once, whichever
            worker found it;
- `leases`  sorted set entry -> lease expiry (Redis clock). A request taken is
            *leased*, not popped: it stays here until its worker acks it: the
            links found on the page are queued and its fetch and items are
            published on the bus (the crawl child says `release`, the parent
            acks after the batch holding them went out). The holder renews
            its leases every few seconds; a lease that lapses (its worker died)
            goes back to the queue before anything else is handed out, so a
            killed worker loses no URL;
- `pages`   responses counted for the run as a whole (`max_pages`);
- `started` the run's start (Redis clock) for `max_duration`;
- `seeded`  set by the first request queued: until then the run is not done;
- `closed`  set by the owner when its crawl ended: participants stop;
- `job`, `workers`, `alive:{worker}`, `stats`: how participants find the run
  and report their stats (scraper/distributed.py).

The run is done when the queue is empty and no lease is open.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from regions.settings import settings
from scraper.errors import ScraperError

REDIS_TIMEOUT = 5.0
KEPT_META = ("depth", "redirect_times", "redirect_ttl", "redirect_urls", "retry_times")

# KEYS: queue, leases, closed. ARGV: lease seconds. Returns an entry or nil.
_LEASE = """
if redis.call('EXISTS', KEYS[3]) == 1 then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, entry in ipairs(lapsed) do
  redis.call('ZREM', KEYS[2], entry)
  redis.call('LPUSH', KEYS[1], entry)
end
local entry = redis.call('LPOP', KEYS[1])
if not entry then return false end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), entry)
return entry
"""

# KEYS: queue, seen, leases, seeded. ARGV: fingerprint, entry, force (1: skip
# the seen check, e.g. a retry), acked (an entry this one replaces, or "").
_ADD = """
redis.call('SET', KEYS[4], '1')
local added = 0
local new = redis.call('SADD', KEYS[2], ARGV[1])
if new == 1 or ARGV[3] == '1' then
  redis.call('RPUSH', KEYS[1], ARGV[2])
  added = 1
end
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[3], ARGV[4]) end
return added
"""

# KEYS: leases. ARGV: lease seconds, entries... Pushes the expiry of held leases.
_RENEW = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', until_, ARGV[i]) end
return #ARGV - 1
"""

# KEYS: started. Returns the seconds since the run's start (set on first call).
_ELAPSED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('SET', KEYS[1], tostring(now), 'NX')
return tostring(now - tonumber(redis.call('GET', KEYS[1])))
"""


class FrontierError(ScraperError):
    """The frontier of a distributed run cannot be reached."""


def connect(url: str | None = None) -> redis.Redis:
    return redis.Redis.from_url(
        url or settings().redis_url,
        socket_timeout=REDIS_TIMEOUT,
        socket_connect_timeout=REDIS_TIMEOUT,
        decode_responses=True,
    )


def run_key(run_id: str, name: str, prefix: str | None = None) -> str:
    return f"{prefix if prefix is not None else settings().redis_prefix}frontier:{run_id}:{name}"


@dataclass(frozen=True)
class Entry:
    """One request in the frontier; `raw` is its JSON, also its identity in `leases`."""

    url: str
    fingerprint: str
    meta: dict[str, Any]
    raw: str

    @classmethod
    def make(cls, url: str, fingerprint: str, meta: dict[str, Any]) -> Entry:
        kept = {k: meta[k] for k in KEPT_META if k in meta}
        raw = json.dumps({"url": url, "fp": fingerprint, "meta": kept}, sort_keys=True)
        return cls(url, fingerprint, kept, raw)

    @classmethod
    def parse(cls, raw: str) -> Entry:
        body = json.loads(raw)
        return cls(body["url"], body["fp"], body["meta"], raw)


class Frontier:
    """A crawl child's handle on the run's frontier. Thread-safe."""

    def __init__(self, run_id: str, *, client: redis.Redis | None = None) -> None:
        self.run_id = run_id
        self.lease = settings().frontier_lease
        self._redis = client or connect()
        self._keys = {n: run_key(run_id, n) for n in ("queue", "seen", "leases", "pages")}
        self._keys |= {n: run_key(run_id, n) for n in ("closed", "started", "seeded")}
        self._lease_script = self._redis.register_script(_LEASE)
        self._add_script = self._redis.register_script(_ADD)
        self._renew_script = self._redis.register_script(_RENEW)
        self._elapsed_script = self._redis.register_script(_ELAPSED)
        self._held: set[str] = set()
        self._handed: dict[str, float] = {}  # entry -> renew until (monotonic)
        self._lock = threading.Lock()

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (redis.RedisError, OSError) as exc:
            raise FrontierError(f"frontier of run {self.run_id} unreachable: {exc}") from exc

    def add(self, entry: Entry, *, force: bool = False, replaces: str | None = None) -> bool:
        """Queue `entry` unless its fingerprint was seen (or `force`); ack `replaces`."""
        k = self._keys
        added = self._call(
            self._add_script,
            keys=[k["queue"], k["seen"], k["leases"], k["seeded"]],
            args=[entry.fingerprint, entry.raw, "1" if force else "0", replaces or ""],
        )
        if replaces:
            with self._lock:
                self._held.discard(replaces)
        return bool(added)

    def take(self) -> Entry | None:
        """Lease the next request (lapsed leases first); None when nothing is queued."""
        k = self._keys
        raw = self._call(
            self._lease_script, keys=[k["queue"], k["leases"], k["closed"]], args=[self.lease]
        )
        if not raw:
            return None
        with self._lock:
            self._held.add(raw)
        return Entry.parse(raw)

    def ack(self, *raws: str) -> None:
        """These requests are handled (links queued, items published): their leases end."""
        if raws:
            self._call(self._redis.zrem, self._keys["leases"], *raws)
        with self._lock:
            for raw in raws:
                self._held.discard(raw)
                self._handed.pop(raw, None)

    def hand_over(self, raw: str, grace: float) -> None:
        """The page is handled here; the parent ends its lease once its items are out.

        Until then (at most `grace` seconds) this process keeps renewing it.
        """
        with self._lock:
            self._held.discard(raw)
            self._handed[raw] = time.monotonic() + grace

    def renew(self) -> int:
        """Push the expiry of every lease this process holds one lease length on."""
        with self._lock:
            now = time.monotonic()
            self._handed = {raw: t for raw, t in self._handed.items() if t > now}
            held = [*self._held, *self._handed]
        if not held:
            return 0
        return int(
            self._call(self._renew_script, keys=[self._keys["leases"]], args=[self.lease, *held])
        )

    def pending(self) -> bool:
        """True while the run is open and not yet seeded, or something is queued or leased.

        A participant that starts before the owner queued the start URLs waits.
        """
        k = self._keys
        pipe = self._redis.pipeline(transaction=False)
        pipe.exists(k["closed"])
        pipe.exists(k["seeded"])
        pipe.llen(k["queue"])
        pipe.zcard(k["leases"])
        closed, seeded, queued, leased = self._call(pipe.execute)
        return not closed and (not seeded or queued > 0 or leased > 0)

    def count_page(self) -> int:
        return int(self._call(self._redis.incr, self._keys["pages"]))

    def pages(self) -> int:
        return int(self._call(self._redis.get, self._keys["pages"]) or 0)

    def elapsed(self) -> float:
        """Seconds since the run started (its first crawl process set the start)."""
        return float(self._call(self._elapsed_script, keys=[self._keys["started"]]))
