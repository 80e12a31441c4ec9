"""The run reaper: redelivers runs whose lease lapsed, gives up on poison jobs.

A worker acks its job when the crawl starts (regions/worker.py), so RabbitMQ
no longer redelivers a job whose worker dies. The run's heartbeats
(RunStarted, ItemBatch, RunProgress about every second) are its lease instead:
the writer keeps the newest in ``runs.heartbeat_at``. Inside `geoscrape
ingest` the reaper looks, every few seconds, for runs still ``running`` whose
newest heartbeat is older than GEOSCRAPE_RUN_LEASE seconds (default 10):

- below GEOSCRAPE_MAX_ATTEMPTS (default 3) started attempts, the job goes back
  to ``scrape.<region>`` with the same run id and ``attempt`` + 1, and the run
  back to ``queued`` (a job waiting for a worker holds no lease);
- at the bound, the run becomes ``dead`` and the job is kept in ``dead_jobs``
  (storage/deadletter.py records it), for `geoscrape dead requeue`.

Each run is claimed by one conditional UPDATE (same id, still running, same
heartbeat_at as read), in the transaction that publishes the job, so of
several ingest processes exactly one acts on a lapse; a publish that fails
rolls the claim back. Ingest calls the reaper only when it has caught up with
the `ingest` queue, and not before one lease has passed since it (re)connected
to the broker, so heartbeats delayed in a backlog or a broker outage do not
count as a lapse.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session, sessionmaker

from regions.bus import scrape_queue
from regions.messages import Job, stored_job, utcnow, verdict
from regions.settings import DEFAULT_MAX_ATTEMPTS, DEFAULT_RUN_LEASE, settings
from storage.deadletter import LEASE_REASON, DeadLetter, apply_dead_letter
from storage.models import runs
from storage.writer import apply_message

log = logging.getLogger("geoscrape.reaper")


def lease_settings() -> tuple[float, int]:
    """(lease seconds, max attempts) from the environment; SettingsError if unusable."""
    env = settings()
    return env.run_lease, env.max_attempts


# Publishes a job to its region's queue as dispatch does; given by the caller
# (regions.app.job_publisher), so storage never imports the Celery app.
PublishJob = Callable[[Job], None]


@dataclass(frozen=True)
class Reaped:
    run_id: str
    action: Literal["redelivered", "dead"]
    attempt: int  # the attempt whose lease lapsed


class Reaper:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        publish: PublishJob,
        *,
        lease: float = DEFAULT_RUN_LEASE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self.sessions = sessions
        self.publish = publish
        self.lease = lease
        self.max_attempts = max_attempts
        # How often ingest calls reap(): a few times per lease, at most every 10 s.
        self.interval = min(max(lease / 4, 0.5), 10.0)

    def reap(self, now: datetime | None = None) -> list[Reaped]:
        """Act on every run whose lease lapsed before `now`; what was done."""
        now = now or utcnow()
        cutoff = now - timedelta(seconds=self.lease)
        with self.sessions() as session:
            lapsed = session.execute(
                select(
                    runs.c.id,
                    runs.c.heartbeat_at,
                    runs.c.attempts,
                    runs.c.job,
                    runs.c.site,
                    runs.c.region,
                ).where(
                    runs.c.status == "running",
                    runs.c.heartbeat_at < cutoff,
                    runs.c.job.is_not(None),
                )
            ).all()
        done = []
        for run_id, heartbeat_at, attempts, body, site, region in lapsed:
            where = (site, region)
            reaped = self._reap_one(run_id, heartbeat_at, max(attempts, 1), body, now, where)
            if reaped is not None:
                done.append(reaped)
        return done

    def _reap_one(
        self,
        run_id: str,
        heartbeat_at: datetime,
        attempt: int,
        body: dict[str, object],
        now: datetime,
        where: tuple[str, str],  # the run's (site, region), for a job that does not validate
    ) -> Reaped | None:
        job = stored_job({**body, "attempt": attempt})
        # A job from an older schema cannot be redelivered: the run ends dead.
        dead = job is None or attempt >= self.max_attempts
        with self.sessions.begin() as session:
            # The claim: only the process whose UPDATE matches the lease it read acts.
            claim = update(runs).where(
                runs.c.id == run_id,
                runs.c.status == "running",
                runs.c.heartbeat_at == heartbeat_at,
            )
            values: dict[str, object] = {"heartbeat_at": now}
            if not dead:
                values["status"] = "queued"
            result = cast(CursorResult[Any], session.execute(claim.values(values)))
            if result.rowcount != 1:
                return None  # another ingest got there first, or a heartbeat came in
            if job is None:
                error = "lease lapsed; its stored job is from an older schema: not redelivered"
                apply_message(session, verdict(run_id, *where, "dead", error, at=now))
                log.warning("run %s: %s", run_id, error)
                return Reaped(run_id, "dead", attempt)
            if dead:
                letter = DeadLetter(
                    job=job,
                    reason=LEASE_REASON,
                    queue=scrape_queue(job.region).name,
                    attempts=attempt,
                    dead_at=now,
                    lease=self.lease,
                )
                apply_dead_letter(session, letter)
                log.warning("run %s: %s", run_id, letter.verdict.error)
                return Reaped(run_id, "dead", attempt)
            # Published inside the transaction: a failed publish rolls the claim back.
            self.publish(job.model_copy(update={"attempt": attempt + 1}))
        log.warning(
            "run %s: no heartbeat since %s (lease %gs): redelivered as attempt %d of %d",
            run_id,
            heartbeat_at.isoformat(),
            self.lease,
            attempt + 1,
            self.max_attempts,
        )
        return Reaped(run_id, "redelivered", attempt)
