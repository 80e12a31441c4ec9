"""The shared per-domain rate budget: one request rate for every crawl, everywhere.

`politeness.rate` caps the requests per second that all crawl children of all
workers of all regions together send to one scope (the registrable domain by
default; `rate_scope: host`, or `domain+exit` to give each egress address its
own budget). The budget lives in Redis, as GCRA state read and written by one
Lua script per request, so the check is atomic whatever the number of workers:

- `{prefix}rate:{scope}` holds the earliest time the next request may go (the
  "theoretical arrival time", Redis clock). Asking reserves a slot: the caller
  gets the later of now, that time and any pause, and the time moves one
  interval past it. The caller sleeps until its slot and then re-checks: if a
  pause began meanwhile (a 429), or the re-check came more than `LATE` after
  its slot (a stalled process; Redis clock, the caller's round trip allowed
  for), it reserves a new slot instead of sending. No slot is lost to a round
  trip, so the budget runs at its rate; no slot is taken twice, and a late
  request cannot bunch with the slots after it.
- Each crawl holds at most one reservation per scope (the Scrapy middleware
  serialises its asks), so slots go round-robin between the crawls that wait:
  a region with a backlog cannot starve another.
- `{prefix}rate-pause:{scope}` is set by a 429, or a 503 with Retry-After: no
  request goes to that scope before it, from any worker. Retry-After (seconds
  or HTTP date) sets its length, capped by `politeness.max_retry_after`;
  repeated 429s (`{prefix}rate-strikes:{scope}`, forgotten a minute after the
  last) back off exponentially from one second.
- With `robots: obey`, robots.txt `Crawl-delay` and `Request-rate` lengthen
  the interval (never shorten it), and engage the budget without a `rate`.
  A site with neither never touches Redis (and 429s pause nothing).

If Redis cannot be reached (at start or mid-crawl), the crawl does not stop
and does not run unthrottled: it keeps the same rules in-process (its own
`rate`, pauses and robots delay, on top of the local `delay` and
`concurrency` that always apply) and says so in the run's note.
"""

from __future__ import annotations

import email.utils
import logging
import math
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from urllib.parse import urlsplit

import redis

from regions.settings import settings
from regions.site import ResolvedSite

log = logging.getLogger(__name__)

REDIS_TIMEOUT = 1.0  # seconds; a hung Redis must not hold a crawl longer than this once
STRIKE_MEMORY = 60.0  # seconds after the last 429 before the backoff starts over
BACKOFF_BASE = 1.0  # seconds: the pause of a first 429 without Retry-After
PAUSE_STATUSES = (429, 503)
# Requests are spaced at 1 / (rate * HEADROOM): a request reaches the site some
# time after its slot (waking up, connecting), and two neighbours bunch up when
# the first one is late. Slots are reserved, so none is lost and the rate is
# rate * HEADROOM; aiming 5% low keeps every 1-second window at or below the
# rate under up to ~0.05 s of such jitter, and at most one over under ~0.1 s
# (at 20/s; ~0.15 s at 10/s).
HEADROOM = 0.95
# A caller whose recheck reaches Redis more than this after its slot takes a
# new slot (see Budget.recheck): late requests bunch with later ones by at most
# this much. Callers aim their recheck at LATE / 2 past the slot, less their
# round trip to Redis.
LATE = 0.05  # seconds

# KEYS: tat, pause. ARGV: interval (s), slot ("": none), late (s).
# Returns {seconds until the slot, the slot's time} (Redis clock, as strings).
# Without a slot: reserves the next one (not before any pause). With the slot
# the caller slept until: {"0", slot} (send) if no pause is on and it is at
# most `late` past it, else a new slot. Lateness is on the Redis clock, so a
# reply that was slow to arrive cannot hide it.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local pause = tonumber(redis.call('GET', KEYS[2]) or '0')
local slot = tonumber(ARGV[2])
if slot and pause <= now then
  if now < slot then return {tostring(slot - now), ARGV[2]} end
  if now - slot <= tonumber(ARGV[3]) then return {'0', ARGV[2]} end
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local at = math.max(now, pause, tat)
local next_tat = at + tonumber(ARGV[1])
redis.call('SET', KEYS[1], tostring(next_tat), 'PX', math.ceil((next_tat - now) * 1000) + 1000)
return {tostring(at - now), tostring(at)}
"""

# KEYS: pause, strikes. ARGV: retry_after (s, -1: none), cap (s), base (s), memory (s).
# Returns {strikes, pause seconds as a string}. A 429 that arrives while a pause
# is on (a request sent before it) extends nothing and is no new strike.
_PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current > now then return {tonumber(redis.call('GET', KEYS[2]) or '0'), '0'} end
local strikes = redis.call('INCR', KEYS[2])
local retry_after, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local seconds = math.max(retry_after, tonumber(ARGV[3]) * 2 ^ (strikes - 1))
if seconds > cap then seconds = cap end
redis.call('EXPIRE', KEYS[2], math.ceil(seconds + tonumber(ARGV[4])))
if seconds > 0 then
  redis.call('SET', KEYS[1], tostring(now + seconds), 'PX', math.ceil(seconds * 1000) + 1000)
end
return {strikes, tostring(seconds)}
"""


@lru_cache(maxsize=1)
def _extractor() -> object:
    import tldextract

    # The public suffix list bundled with tldextract: a crawl never fetches it.
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


def registrable_domain(host: str) -> str:
    """`shop.example.co.uk` -> `example.co.uk`; an address or `localhost` stays as is."""
    host = host.lower().rstrip(".")
    result = _extractor()(host)  # type: ignore[operator]
    return str(result.top_domain_under_public_suffix or host)


def exit_of(url: str) -> str:
    """The egress a request to `url` leaves by: its proxy (from the environment) or direct."""
    scheme = urlsplit(url).scheme
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(urlsplit(url).hostname or ""):
        return urlsplit(proxy).netloc.rsplit("@", 1)[-1]
    return "direct"


def scope_of(url: str, scope: str) -> str:
    host = (urlsplit(url).hostname or "").lower()
    if scope == "host":
        return host
    domain = registrable_domain(host)
    if scope == "domain+exit":
        return f"{domain}@{exit_of(url)}"
    return domain


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A Retry-After header (delta-seconds or HTTP date) in seconds; None if absent or bad."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass(frozen=True)
class Slot:
    """A reserved slot: `wait` seconds from when it was given; `at` on Redis's
    clock (`remote`) or the crawl's own (the local fallback)."""

    wait: float
    at: float
    remote: bool


@dataclass
class _LocalState:
    """The same rules in-process, for a crawl that lost Redis."""

    tat: dict[str, float] = field(default_factory=dict)
    pause: dict[str, float] = field(default_factory=dict)
    strikes: dict[str, tuple[int, float]] = field(default_factory=dict)


class Budget:
    """One crawl's view of the shared budget. Thread-safe.

    `interval_for(url)` gives the spacing between requests to its scope
    (0: unlimited); `reserve(url)` reserves a slot and `recheck(url, slot)`,
    after sleeping until it, says go (wait 0) or gives a new slot; `wait(url)`
    does both and blocks until the request may go; `observe(url, status,
    retry_after)` turns a 429/503 into a pause for everyone.
    """

    def __init__(
        self,
        site: ResolvedSite,
        *,
        url: str | None = None,
        prefix: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        politeness = site.politeness
        self.rate = politeness.rate
        self.scope = politeness.rate_scope
        self.max_retry_after = politeness.max_retry_after
        self.obey_robots = politeness.robots == "obey"
        env = settings()
        self._url = url or env.redis_url
        self._prefix = prefix if prefix is not None else env.redis_prefix
        self._clock = clock
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._reserve: Callable[..., object] | None = None
        self._pause: Callable[..., object] | None = None
        self._robots_interval: dict[str, float] = {}
        self._local: _LocalState | None = None
        self.note: str | None = None  # set when the crawl fell back to local politeness
        self.waited = 0.0  # seconds this crawl spent waiting for the budget
        self.pauses = 0  # pauses this crawl's responses started
        self.strikes = 0  # the highest 429 strike count seen

    # -- rules -------------------------------------------------------------------

    def set_robots(self, url: str, crawl_delay: float | None, request_rate: float | None) -> None:
        """Lower the rate for `url`'s scope from robots.txt (`robots: obey` only).

        `request_rate` is in requests per second (robots' `Request-rate: n/s`).
        """
        if not self.obey_robots:
            return
        interval = max(crawl_delay or 0.0, 1.0 / request_rate if request_rate else 0.0)
        if interval > 0:
            key = scope_of(url, self.scope)
            with self._lock:
                self._robots_interval[key] = max(interval, self._robots_interval.get(key, 0.0))

    def interval_for(self, url: str) -> float:
        if not self.rate and not self._robots_interval:
            return 0.0  # no scope lookup (the suffix list loads on first use)
        key = scope_of(url, self.scope)
        base = 1.0 / (self.rate * HEADROOM) if self.rate else 0.0
        return max(base, self._robots_interval.get(key, 0.0))

    @property
    def active(self) -> bool:
        return self.rate is not None or bool(self._robots_interval)

    # -- asking ------------------------------------------------------------------

    def reserve(self, url: str) -> Slot:
        """Reserve the next slot for a request to `url` (wait 0: send now)."""
        return self._ask(url, None)

    def recheck(self, url: str, slot: Slot) -> Slot:
        """After sleeping until `slot`: wait 0 to send now, else a new slot to sleep until.

        A new slot when a pause began meanwhile (one after the pause), or when
        this recheck reached Redis more than LATE after the slot: sent now,
        the late request would bunch with the slots after it (a stalled crawl
        holds one, so several stalled crawls would burst together).
        """
        return self._ask(url, slot)

    def _ask(self, url: str, slot: Slot | None) -> Slot:
        interval = self.interval_for(url)
        if interval <= 0:
            return Slot(0.0, 0.0, remote=False)  # no rate and no robots delay: no budget
        key = scope_of(url, self.scope)
        if self._local is None:
            try:
                keys = [self._key("rate", key), self._key("rate-pause", key)]
                at = "" if slot is None else repr(slot.at)
                asked = self._clock()
                reply = self._remote_reserve()(keys=keys, args=[interval, at, LATE])
                assert isinstance(reply, list)
                wait, rtt = float(reply[0]), self._clock() - asked
                if wait > 0:
                    # The reply and the recheck each travel half a round trip:
                    # aim the recheck at mid-window on Redis's clock, so a
                    # worker far from Redis is not always late (and starved).
                    wait = max(0.001, wait - rtt + LATE / 2)
                return Slot(wait, float(reply[1]), remote=True)
            except (redis.RedisError, OSError) as exc:
                self._fall_back(exc)
        if slot is not None and slot.remote:
            slot = None  # reserved in Redis before it failed: its time is on Redis's clock
        return self._local_reserve(key, interval, slot)

    def wait(self, url: str, sleep: Callable[[float], None] = time.sleep) -> float:
        """Block until a request to `url` may go; returns the seconds waited."""
        started, waited = self._clock(), 0.0
        slot = self.reserve(url)
        while slot.wait > 0:
            sleep(slot.wait)
            waited = self._clock() - started
            slot = self.recheck(url, slot)
        self.add_wait(waited)
        return waited

    def add_wait(self, seconds: float) -> None:
        with self._lock:
            self.waited += seconds

    def observe(self, url: str, status: int, retry_after: str | None) -> float:
        """Record a response; a 429 (or 503 with Retry-After) pauses the scope.

        Returns the pause it started (0: none, or one was already on).
        """
        if status not in PAUSE_STATUSES or self.interval_for(url) <= 0:
            return 0.0
        seconds = retry_after_seconds(retry_after)
        if status == 503 and seconds is None:
            return 0.0  # a plain 503 is an error, not a request to slow down
        key = scope_of(url, self.scope)
        args = [
            -1.0 if seconds is None else seconds,
            self.max_retry_after,
            BACKOFF_BASE,
            STRIKE_MEMORY,
        ]
        if self._local is None:
            try:
                keys = [self._key("rate-pause", key), self._key("rate-strikes", key)]
                reply = self._remote_pause()(keys=keys, args=args)
                assert isinstance(reply, list)
                return self._count_pause(key, int(reply[0]), float(reply[1]))
            except (redis.RedisError, OSError) as exc:
                self._fall_back(exc)
        local_strikes, local_pause = self._local_pause(key, *args)
        return self._count_pause(key, local_strikes, local_pause)

    # -- Redis -------------------------------------------------------------------

    def _key(self, kind: str, scope: str) -> str:
        return f"{self._prefix}{kind}:{scope}"

    def _connect(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(
                self._url,
                socket_timeout=REDIS_TIMEOUT,
                socket_connect_timeout=REDIS_TIMEOUT,
                decode_responses=True,
            )
        return self._client

    def _remote_reserve(self) -> Callable[..., object]:
        if self._reserve is None:
            self._reserve = self._connect().register_script(_RESERVE)
        return self._reserve

    def _remote_pause(self) -> Callable[..., object]:
        if self._pause is None:
            self._pause = self._connect().register_script(_PAUSE)
        return self._pause

    def _fall_back(self, exc: BaseException) -> None:
        with self._lock:
            if self._local is not None:
                return
            self._local = _LocalState()
            stamp = datetime.now(UTC).strftime("%H:%M:%SZ")
            self.note = (
                f"shared rate budget unavailable from {stamp} (Redis: {type(exc).__name__}): "
                "local politeness only"
            )
        log.warning("%s: %s", self.note, exc)

    def _count_pause(self, key: str, strikes: int, paused: float) -> float:
        with self._lock:
            self.strikes = max(self.strikes, strikes)
            if paused > 0:
                self.pauses += 1
        if paused > 0:
            log.warning("%s paused for %.1fs (429 strike %d)", key, paused, strikes)
        return paused

    # -- in-process fallback (same rules, this crawl only) -----------------------

    def _local_reserve(self, key: str, interval: float, slot: Slot | None) -> Slot:
        assert self._local is not None
        with self._lock:
            now = self._clock()
            pause = self._local.pause.get(key, 0.0)
            if slot is not None and pause <= now:
                if now < slot.at:
                    return Slot(slot.at - now, slot.at, remote=False)
                if now - slot.at <= LATE:
                    return Slot(0.0, slot.at, remote=False)
            at = max(now, pause, self._local.tat.get(key, 0.0))
            self._local.tat[key] = at + interval
            return Slot(at - now, at, remote=False)

    def _local_pause(
        self, key: str, retry_after: float, cap: float, base: float, memory: float
    ) -> tuple[int, float]:
        assert self._local is not None
        with self._lock:
            now = self._clock()
            if self._local.pause.get(key, 0.0) > now:
                return self._local.strikes.get(key, (0, 0.0))[0], 0.0
            strikes, last = self._local.strikes.get(key, (0, 0.0))
            strikes = strikes + 1 if now - last < memory else 1
            seconds = min(cap, max(retry_after, base * 2 ** (strikes - 1)))
            self._local.strikes[key] = (strikes, now + seconds)
            if seconds > 0:
                self._local.pause[key] = now + seconds
            return strikes, seconds


def robots_rate(request_rate: object) -> float | None:
    """Requests per second from a robots parser's RequestRate (requests, seconds)."""
    requests_ = getattr(request_rate, "requests", None)
    seconds = getattr(request_rate, "seconds", None)
    if not requests_ or not seconds:
        return None
    rate = float(requests_) / float(seconds)
    return rate if math.isfinite(rate) and rate > 0 else None
