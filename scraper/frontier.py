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

Round trips are what a distributed crawl pays per page (each one stalls the
crawl's reactor), so a crawl child leases as many requests as it has free
download slots in one, queues all the links of a page in one, and adds the
responses it counted to `pages` along with those (at once near `max_pages`).
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
# Responses are added to the run's page count in Redis with the next frontier
# call; this close to max_pages every response is counted there at once (the
# others' counts lag by the few responses they have not sent yet).
EXACT_MARGIN = 64

# KEYS: queue, leases, closed, pages. ARGV: lease seconds, most entries to
# lease, responses to add to `pages`. Returns {entry..., pages}: no entry when
# nothing is queued or the run is closed.
_LEASE = """
local pages = redis.call('INCRBY', KEYS[4], ARGV[3])
if redis.call('EXISTS', KEYS[3]) == 1 then return {pages} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, entry in ipairs(lapsed) do
  redis.call('ZREM', KEYS[2], entry)
  redis.call('LPUSH', KEYS[1], entry)
end
local out = {}
local entries = redis.call('LPOP', KEYS[1], tonumber(ARGV[2]))
local until_ = now + tonumber(ARGV[1])
for _, entry in ipairs(entries or {}) do
  redis.call('ZADD', KEYS[2], until_, entry)
  out[#out + 1] = entry
end
out[#out + 1] = pages
return out
"""

# KEYS: queue, seen, leases, seeded, pages. ARGV: acked (an entry the first one
# replaces, or ""), responses to add to `pages`, then per entry: fingerprint,
# entry, force (1: skip the seen check, e.g. a retry). Returns {added, pages}.
_ADD = """
redis.call('SET', KEYS[4], '1')
local added = 0
for i = 3, #ARGV, 3 do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 or ARGV[i + 2] == '1' then
    redis.call('RPUSH', KEYS[1], ARGV[i + 1])
    added = added + 1
  end
end
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[3], ARGV[1]) end
return {added, redis.call('INCRBY', KEYS[5], ARGV[2])}
"""

# KEYS: queue, leases. ARGV: entries leased here but never handed to the
# crawl: back to the head of the queue at once, for any worker.
_GIVE_BACK = """
for i = #ARGV, 1, -1 do
  if redis.call('ZREM', KEYS[2], ARGV[i]) == 1 then redis.call('LPUSH', KEYS[1], ARGV[i]) end
end
return #ARGV
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
    """A crawl child's handle on the run's frontier. Thread-safe.

    Every call is one round trip: `take` leases up to n requests at once,
    `add` queues all the links of a page at once, and the responses this
    process counted (`count_page`) ride along on the next of either.
    """

    def __init__(self, run_id: str, *, client: redis.Redis | None = None) -> None:
        self.run_id = run_id
        self.lease = settings().frontier_lease
        self._redis = client or connect()
        self._keys = {n: run_key(run_id, n) for n in ("queue", "seen", "leases", "pages")}
        self._keys |= {n: run_key(run_id, n) for n in ("closed", "started", "seeded")}
        self._lease_script = self._redis.register_script(_LEASE)
        self._add_script = self._redis.register_script(_ADD)
        self._give_back_script = self._redis.register_script(_GIVE_BACK)
        self._renew_script = self._redis.register_script(_RENEW)
        self._elapsed_script = self._redis.register_script(_ELAPSED)
        self._held: set[str] = set()
        self._handed: dict[str, float] = {}  # entry -> renew until (monotonic)
        self._pages = 0  # the run's page count as Redis last told us
        self._uncounted = 0  # responses counted here, not yet added in Redis
        self._done = False  # the run was seen done: that never changes back
        self._lock = threading.Lock()

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (redis.RedisError, OSError) as exc:
            raise FrontierError(f"frontier of run {self.run_id} unreachable: {exc}") from exc

    def _counting(self, call: Any) -> Any:
        """Make `call(uncounted)` (a round trip that adds our uncounted responses
        to `pages`); `pages`' new value is its result's last element."""
        with self._lock:
            n, self._uncounted = self._uncounted, 0
        try:
            result = self._call(call, n)
        except FrontierError:
            with self._lock:
                self._uncounted += n
            raise
        with self._lock:
            self._pages = max(self._pages, int(result[-1]))
        return result

    def add(self, entry: Entry, *, force: bool = False, replaces: str | None = None) -> bool:
        """Queue `entry` unless its fingerprint was seen (or `force`); ack `replaces`."""
        return self.add_many([(entry, force)], replaces=replaces) > 0

    def add_many(self, entries: list[tuple[Entry, bool]], *, replaces: str | None = None) -> int:
        """Queue (entry, force) pairs in one round trip; returns how many were queued."""
        k = self._keys
        keys = [k["queue"], k["seen"], k["leases"], k["seeded"], k["pages"]]
        args: list[str] = []
        for entry, force in entries:
            args += [entry.fingerprint, entry.raw, "1" if force else "0"]
        added, _ = self._counting(
            lambda n: self._add_script(keys=keys, args=[replaces or "", n, *args])
        )
        if replaces:
            with self._lock:
                self._held.discard(replaces)
        return int(added)

    def take(self) -> Entry | None:
        """Lease the next request (lapsed leases first); None when nothing is queued."""
        taken = self.take_many(1)
        return taken[0] if taken else None

    def take_many(self, n: int) -> list[Entry]:
        """Lease up to `n` requests in one round trip (lapsed leases first)."""
        k = self._keys
        keys = [k["queue"], k["leases"], k["closed"], k["pages"]]
        *raws, _ = self._counting(
            lambda counted: self._lease_script(keys=keys, args=[self.lease, max(n, 1), counted])
        )
        with self._lock:
            self._held.update(raws)
        return [Entry.parse(raw) for raw in raws]

    def give_back(self, raws: list[str]) -> None:
        """Requests leased but not crawled here: queued again at once, not after the lease."""
        if not raws:
            return
        k = self._keys
        self._call(self._give_back_script, keys=[k["queue"], k["leases"]], args=raws)
        with self._lock:
            self._held.difference_update(raws)

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
        Once false it stays false (nothing queued or leased: nobody can queue more).
        """
        if self._done:
            return False
        k = self._keys
        pipe = self._redis.pipeline(transaction=False)
        pipe.exists(k["closed"])
        pipe.exists(k["seeded"])
        pipe.llen(k["queue"])
        pipe.zcard(k["leases"])

        def check(n: int) -> list[Any]:
            pipe.incrby(k["pages"], n)
            return pipe.execute()

        closed, seeded, queued, leased, _ = self._counting(check)
        self._done = bool(closed) or (bool(seeded) and queued == 0 and leased == 0)
        return not self._done

    def count_page(self, limit: int | None = None) -> int:
        """Count one response for the run; returns the run's count as far as known.

        The count goes to Redis with this process's next frontier call; within
        EXACT_MARGIN of `limit` it goes at once, so `max_pages` holds across workers.
        """
        with self._lock:
            self._uncounted += 1
            known = self._pages + self._uncounted
        if limit is None or known < limit - EXACT_MARGIN:
            return known
        return self.flush_count()

    def flush_count(self) -> int:
        """Add the responses counted here to the run's count; returns the run's count."""
        [total] = self._counting(lambda n: [self._redis.incrby(self._keys["pages"], n)])
        return int(total)

    def pages(self) -> int:
        """The run's page count as far as this process knows (no round trip)."""
        with self._lock:
            return self._pages + self._uncounted

    def elapsed(self) -> float:
        """Seconds since the run started (its first crawl process set the start)."""
        return float(self._call(self._elapsed_script, keys=[self._keys["started"]]))
