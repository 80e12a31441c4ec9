"""The dead-letter queue `scrape.dead`, consumed inside `geoscrape ingest`.

RabbitMQ moves a job there from `scrape.<region>` with an `x-death` header
whose reason says why:

- `expired`: its per-message TTL (the site's next tick) passed before any
  worker took it; the run becomes `expired`, the error naming the region and
  the deadline. Nothing else is kept: the next tick dispatches afresh.
- anything else (`rejected`: a worker refused it, e.g. a job for another
  region; `maxlen`, `delivery_limit`; and `lease`, which does not come from
  RabbitMQ: ingest's reaper (storage/reaper.py) records a poison job that
  lost its lease GEOSCRAPE_MAX_ATTEMPTS times the same way): the job is kept in
  `dead_jobs` (attempts from the x-death count) for a human to inspect and
  requeue, and the run becomes `dead`.

Ingest applies a dead letter like any ingest message: committed, then acked;
a redelivery changes nothing (the run's first final status wins, the
dead_jobs row is keyed by run id).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kombu import Consumer
from kombu.message import Message
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from regions.bus import CRAWL_TASK, DEAD_QUEUE
from regions.messages import (
    Job,
    MessageError,
    RunFinished,
    RunQueued,
    RunStats,
    dump,
    expired_run,
    stored_job,
    utcnow,
)
from storage.errors import StorageError
from storage.models import DeadJob, dead_jobs, runs
from storage.writer import apply_message, insert

LEASE_REASON = "lease"  # a run the reaper gave up on (not an x-death reason)


@dataclass(frozen=True)
class DeadLetter:
    job: Job
    reason: str  # the x-death reason of the latest death
    queue: str  # the queue it died in
    attempts: int  # deliveries counted by RabbitMQ for that queue and reason
    dead_at: datetime
    lease: float = 0.0  # reason "lease": the lease that lapsed, seconds

    @property
    def verdict(self) -> RunFinished:
        """The run's final status: expired, or dead."""
        if self.reason == "expired":
            return expired_run(self.job, at=self.dead_at)
        times = "time" if self.attempts == 1 else "times"
        error = f"dead-lettered from {self.queue} ({self.reason}, {self.attempts} {times})"
        if self.reason == LEASE_REASON:
            error = (
                f"dead after {self.attempts} {'attempt' if self.attempts == 1 else 'attempts'}: "
                f"each time its worker stopped sending heartbeats for {self.lease:g}s "
                "(the crawl killed its worker, or the worker died)"
            )
        return RunFinished(
            run_id=self.job.run_id,
            site=self.job.site,
            region=self.job.region,
            status="dead",
            finished_at=self.dead_at,
            stats=RunStats(),
            error=error,
        )


def parse_dead_letter(message: Message) -> DeadLetter:
    """A geoscrape job message from `scrape.dead`; MessageError for anything else."""
    headers = message.headers or {}
    if headers.get("task") != CRAWL_TASK:
        raise MessageError(f"not a {CRAWL_TASK} job (task {headers.get('task')!r})")
    try:
        args = message.decode()[0]  # Celery protocol 2: [args, kwargs, embed]
        job = Job.model_validate(args[0])
    except Exception as exc:
        raise MessageError(f"not a valid job: {exc}") from exc
    deaths = headers.get("x-death") or [{}]
    latest: dict[str, Any] = deaths[0]  # RabbitMQ keeps the most recent death first
    when = latest.get("time")
    if isinstance(when, datetime):
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
    else:
        when = utcnow()
    return DeadLetter(
        job=job,
        reason=str(latest.get("reason", "unknown")),
        queue=str(latest.get("queue", f"scrape.{job.region}")),
        attempts=int(latest.get("count", 1)),
        dead_at=when,
    )


def apply_dead_letter(session: Session, dead: DeadLetter) -> None:
    """Record a dead letter; the caller commits. Idempotent."""
    job = dead.job
    # The run row as the dispatcher described it, whichever message came first.
    apply_message(session, RunQueued.for_job(job))
    verdict = dead.verdict
    if dead.reason != "expired":
        row = {
            "run_id": job.run_id,
            "site": job.site,
            "region": job.region,
            "reason": dead.reason,
            "error": verdict.error,
            "attempts": dead.attempts,
            "job": dump(job),
            "dead_at": dead.dead_at,
            "requeued_at": None,
        }
        stmt = insert(session, dead_jobs).values(row)
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=[dead_jobs.c.run_id],
                set_={k: v for k, v in row.items() if k != "run_id"},
            )
        )
    apply_message(session, verdict)


def dead_letter_consumer(
    consumer_cls: Callable[..., Consumer], on_message: Callable[[Message], None], prefetch: int
) -> Consumer:
    return consumer_cls(
        queues=[DEAD_QUEUE], on_message=on_message, accept=["json"], prefetch_count=prefetch
    )


class UnknownDeadJob(StorageError):
    """A run id that names no dead job (or more than one, as a prefix)."""


class UnreadableDeadJob(StorageError):
    """A dead job kept by an older schema, which cannot be published again."""


def find_dead_job(session: Session, run_id: str) -> DeadJob:
    """The dead job whose run id is `run_id` or starts with it (as `geoscrape dead` shows)."""
    rows = list(session.scalars(select(DeadJob).where(DeadJob.run_id.startswith(run_id))))
    exact = [row for row in rows if row.run_id == run_id]
    if exact:
        return exact[0]
    if not rows:
        raise UnknownDeadJob(f"no dead job with run id {run_id!r} (see `geoscrape dead`)")
    if len(rows) > 1:
        raise UnknownDeadJob(f"run id prefix {run_id!r} names {len(rows)} dead jobs; give more")
    return rows[0]


def requeue(session: Session, run_id: str, publish: Callable[[Job], None]) -> Job:
    """Put a dead job back on its region's queue, same run id; the caller's session commits.

    The job's `expires_at` is dropped: a requeue is a human's decision to run it now.
    Attempts start again from 1 (a poison job gets GEOSCRAPE_MAX_ATTEMPTS fresh
    attempts after its fix) and the old lease is cleared.
    """
    dead = find_dead_job(session, run_id)
    job = stored_job({**dead.job, "expires_at": None, "attempt": 1})
    if job is None:
        raise UnreadableDeadJob(
            f"dead job {dead.run_id} is from an older schema and no longer validates: "
            "dispatch the site again instead"
        )
    session.execute(
        update(runs)
        .where(runs.c.id == job.run_id)
        .values(status="queued", finished_at=None, error=None, attempts=0, heartbeat_at=None)
    )
    dead.requeued_at = utcnow()
    session.flush()
    publish(job)  # after the writes: a failed publish rolls them back
    return job


class DeadJobRow(BaseModel):
    """One row of `geoscrape dead` and the dashboard's dead jobs page."""

    model_config = ConfigDict(frozen=True, from_attributes=True)

    run_id: str
    site: str
    region: str
    reason: str
    error: str | None
    attempts: int
    dead_at: datetime
    requeued_at: datetime | None


def list_dead_jobs(
    session: Session, site: str | None = None, requeued: bool = False
) -> list[DeadJobRow]:
    """Dead jobs, newest first; `requeued`: also those already requeued."""
    stmt = select(DeadJob).order_by(DeadJob.dead_at.desc())
    if site is not None:
        stmt = stmt.where(DeadJob.site == site)
    if not requeued:
        stmt = stmt.where(DeadJob.requeued_at.is_(None))
    return [DeadJobRow.model_validate(d) for d in session.scalars(stmt)]
