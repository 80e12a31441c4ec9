"""Distributed runs on the worker side: the owner, the participants, the joiner.

The worker that got a `distributed: true` job is the run's *owner*: it
publishes RunStarted, RunProgress and RunFinished as for any run, and lists
the run as open for its region in Redis (`{prefix}frontier:open:{region}`,
with the job under `{prefix}frontier:{run}:job`). Every worker runs a
`Joiner` thread: while the worker has no crawl of its own and an open run of
its region has queued requests, it runs a *participant* crawl of that run (the
same crawl child, the same job) that publishes only ItemBatches, keeps an
`alive:{participant}` key fresh and writes its stats to the run's `stats`
hash when it ends.

When the owner's crawl ends (the frontier is empty and no lease is open, or a
run-wide limit was hit), the owner closes the run (`closed`: participants
stop), waits for the participants still alive to report, and publishes one
RunFinished whose stats are the sum of its workers'.

Items go over the bus as for any run: ingest is idempotent by (run, key) and
(run, URL), so a page fetched again after a lease lapsed changes nothing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable

import redis

from regions.messages import Job, RunStats
from regions.settings import settings
from scheduler.cancel import mark_key
from scraper.frontier import connect, run_key

log = logging.getLogger(__name__)

ALIVE_SECONDS = 5.0  # a participant not heard from for this long is gone
REPORT_WAIT = 30.0  # how long the owner waits for the participants' stats
CLOSED_KEPT = 3600  # seconds the `closed` flag outlives the run (late joiners see it)
JOIN_POLL = 0.1  # a free worker joins an open run this soon (one Redis read)


def is_distributed(job: Job) -> bool:
    return job.config.distributed


def open_key(region: str) -> str:
    return f"{settings().redis_prefix}frontier:open:{region}"


class RunBoard:
    """A distributed run's bookkeeping in Redis, for its owner or one participant.

    Redis errors are logged, never raised: the crawl child (which needs the
    frontier itself) is the one that fails when Redis is gone.
    """

    def __init__(self, job: Job, worker: str, client: redis.Redis | None = None) -> None:
        self.job = job
        self.me = f"{worker}/{uuid.uuid4().hex[:6]}"
        self._redis = client or connect()

    def _key(self, name: str) -> str:
        return run_key(self.job.run_id, name)

    def _safely(self, what: str, fn: Callable[[], object]) -> object:
        try:
            return fn()
        except (redis.RedisError, OSError) as exc:
            log.warning("run %s: cannot %s in Redis: %s", self.job.run_id, what, exc)
            return None

    def open(self) -> None:
        """Owner: list the run as open for its region's workers to join."""

        def do() -> None:
            pipe = self._redis.pipeline()
            pipe.set(self._key("job"), self.job.model_dump_json())
            pipe.sadd(open_key(self.job.region), self.job.run_id)
            pipe.execute()

        self._safely("open the run", do)

    def join(self) -> None:
        """Participant: register and say we are alive."""

        def do() -> None:
            pipe = self._redis.pipeline()
            pipe.sadd(self._key("workers"), self.me)
            pipe.set(self._key(f"alive:{self.me}"), "1", ex=int(ALIVE_SECONDS))
            pipe.execute()

        self._safely("join the run", do)

    def alive(self) -> None:
        self._safely(
            "renew our presence",
            lambda: self._redis.set(self._key(f"alive:{self.me}"), "1", ex=int(ALIVE_SECONDS)),
        )

    def release(self, entries: list[str]) -> None:
        """End the leases of pages whose fetch and items are published."""
        self._safely(
            "end leases", lambda: self._redis.zrem(run_key(self.job.run_id, "leases"), *entries)
        )

    def report(self, stats: RunStats) -> None:
        """Participant: our share of the run's stats, for the owner to add up."""
        self._safely(
            "report our stats",
            lambda: self._redis.hset(self._key("stats"), self.me, stats.model_dump_json()),
        )

    def close(self) -> None:
        """Owner: no more joining; the participants' crawls stop."""

        def do() -> None:
            pipe = self._redis.pipeline()
            pipe.set(self._key("closed"), "1", ex=CLOSED_KEPT)
            pipe.srem(open_key(self.job.region), self.job.run_id)
            pipe.execute()

        self._safely("close the run", do)

    def cancelled(self) -> bool:
        """Has `geoscrape cancel` marked the run (scheduler/cancel.py)?"""
        return bool(
            self._safely(
                "read the cancel mark", lambda: self._redis.exists(mark_key(self.job.run_id))
            )
        )

    def total(self, own: RunStats, wait: float = REPORT_WAIT) -> RunStats:
        """Owner: our stats plus every participant's, once each one reported or is gone."""
        deadline = time.monotonic() + wait
        reports: dict[str, str] = {}
        while True:
            try:  # the client decodes responses: every value is a str
                members = [str(m) for m in self._redis.smembers(self._key("workers"))]
                reports = {
                    str(k): str(v) for k, v in self._redis.hgetall(self._key("stats")).items()
                }
                waiting = [
                    m
                    for m in members
                    if m not in reports and self._redis.exists(self._key(f"alive:{m}"))
                ]
            except (redis.RedisError, OSError) as exc:
                log.warning("run %s: participants' stats unavailable: %s", self.job.run_id, exc)
                break
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return add_stats(own, [RunStats.model_validate(json.loads(r)) for r in reports.values()])

    def cleanup(self) -> None:
        """Owner: drop the run's keys but `closed` (which expires by itself)."""
        names = ["queue", "seen", "leases", "pages", "started", "seeded", "job", "workers", "stats"]
        self._safely("clean up", lambda: self._redis.delete(*(self._key(n) for n in names)))


def add_stats(own: RunStats, others: list[RunStats]) -> RunStats:
    """The run's stats: counts added up; duration the owner's; peaks and strikes the max."""
    total = own.model_copy(deep=True)
    for other in others:
        total.pages += other.pages
        total.items += other.items
        total.errors += other.errors
        total.bytes += other.bytes
        total.rate_wait = round(total.rate_wait + other.rate_wait, 3)
        total.rate_pauses += other.rate_pauses
        total.rate_strikes = max(total.rate_strikes, other.rate_strikes)
        total.peak_rss = max(total.peak_rss, other.peak_rss)
        for code, n in other.status_codes.items():
            total.status_codes[code] = total.status_codes.get(code, 0) + n
    total.status_codes = dict(sorted(total.status_codes.items()))
    return total


def find_open_run(client: redis.Redis, region: str) -> Job | None:
    """An open distributed run of `region` not yet seeded or with requests waiting, or None."""
    for run_id in sorted(str(r) for r in client.smembers(open_key(region))):
        pipe = client.pipeline(transaction=False)
        pipe.exists(run_key(run_id, "closed"))
        pipe.exists(run_key(run_id, "seeded"))
        pipe.llen(run_key(run_id, "queue"))
        pipe.get(run_key(run_id, "job"))
        pipe.exists(mark_key(run_id))
        closed, seeded, queued, body, cancelled = pipe.execute()
        if not closed and not cancelled and (queued or not seeded) and body:
            return Job.model_validate_json(body)
    return None


class Joiner:
    """A worker's thread that joins open distributed runs while the worker is free.

    `is_free()` says whether the worker runs no crawl of its own; `participate(job)`
    runs a participant crawl of `job` (blocking). A participant crawl comes on
    top of the worker's `--concurrency`: a job that arrives meanwhile still runs.
    """

    def __init__(
        self,
        region: str,
        is_free: Callable[[], bool],
        participate: Callable[[Job], None],
        *,
        interval: float = JOIN_POLL,
    ) -> None:
        self.region = region
        self.is_free = is_free
        self.participate = participate
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="joiner", daemon=True)
        self._client: redis.Redis | None = None
        self._complained = False

    def start(self) -> Joiner:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.is_free():
                continue
            try:
                self._client = self._client or connect()
                job = find_open_run(self._client, self.region)
                self._complained = False
            except (redis.RedisError, OSError) as exc:
                if not self._complained:  # once per outage, not every poll
                    log.warning("cannot look for distributed runs to join: %s", exc)
                    self._complained = True
                continue
            if job is None:
                continue
            log.info("run %s: joining as a participant", job.run_id)
            try:
                self.participate(job)
            except Exception:
                log.exception("run %s: participant crawl failed", job.run_id)
