"""Read-side queries of the store, returning typed, immutable rows."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.models import FetchRecord, Item, Run, Worker

log = logging.getLogger("geoscrape.store")


@dataclass(frozen=True, slots=True)
class RunRow:
    id: str
    site: str
    region: str
    trigger: str
    tick: str | None
    status: str
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    worker: str | None
    stats: dict[str, Any]
    error: str | None
    code_version: str | None = None  # the deployed code bundle it ran (geoscrape deploy)
    # regions.messages.EgressAttestation as JSON; None: from before attestation.
    egress: dict[str, Any] | None = None

    @property
    def verified(self) -> bool:
        """Did every exit of this run pass verification?"""
        return bool(self.egress and self.egress.get("verified"))

    @classmethod
    def of(cls, run: Run) -> RunRow:
        return cls(
            id=run.id,
            site=run.site,
            region=run.region,
            trigger=run.trigger,
            tick=run.tick,
            status=run.status,
            queued_at=run.queued_at,
            started_at=run.started_at,
            finished_at=run.finished_at,
            worker=run.worker,
            stats=dict(run.stats or {}),
            error=run.error,
            code_version=run.code_version,
            egress=dict(run.egress) if run.egress is not None else None,
        )


@dataclass(frozen=True, slots=True)
class ItemRow:
    site: str
    region: str
    key: str
    url: str
    data: dict[str, Any]
    first_run_id: str
    last_run_id: str
    first_seen_at: datetime
    last_seen_at: datetime

    @classmethod
    def of(cls, item: Item) -> ItemRow:
        return cls(
            site=item.site,
            region=item.region,
            key=item.key,
            url=item.url,
            data=dict(item.data),
            first_run_id=item.first_run_id,
            last_run_id=item.last_run_id,
            first_seen_at=item.first_seen_at,
            last_seen_at=item.last_seen_at,
        )


@dataclass(frozen=True, slots=True)
class FetchRow:
    run_id: str
    region: str
    url: str
    status: int | None
    bytes: int
    error: str | None
    final_url: str | None
    fetched_at: datetime
    exit_address: str | None = None

    @classmethod
    def of(cls, fetch: FetchRecord) -> FetchRow:
        return cls(
            run_id=fetch.run_id,
            region=fetch.region,
            url=fetch.url,
            status=fetch.status,
            bytes=fetch.bytes,
            error=fetch.error,
            final_url=fetch.final_url,
            fetched_at=fetch.fetched_at,
            exit_address=fetch.exit_address,
        )


def list_runs(
    session: Session,
    site: str | None = None,
    region: str | None = None,
    status: str | None = None,
    limit: int = 50,
) -> list[RunRow]:
    """Runs, newest first (by queued time, else start, else finish time)."""
    stmt = select(Run)
    if site is not None:
        stmt = stmt.where(Run.site == site)
    if region is not None:
        stmt = stmt.where(Run.region == region)
    if status is not None:
        stmt = stmt.where(Run.status == status)
    # A run known only from a late message has no queued_at yet.
    newest = func.coalesce(Run.queued_at, Run.started_at, Run.finished_at)
    stmt = stmt.order_by(newest.desc().nulls_last(), Run.id.desc()).limit(limit)
    return [RunRow.of(r) for r in session.scalars(stmt)]


def get_runs(session: Session, run_ids: Sequence[str]) -> list[RunRow]:
    """The given runs in the order asked; unknown ids are left out."""
    if not run_ids:
        return []
    found = {r.id: r for r in session.scalars(select(Run).where(Run.id.in_(set(run_ids))))}
    return [RunRow.of(found[i]) for i in dict.fromkeys(run_ids) if i in found]


def list_items(session: Session, site: str, region: str | None = None) -> list[ItemRow]:
    """The latest data of every item of ``site``, ordered by region then key."""
    stmt = select(Item).where(Item.site == site)
    if region is not None:
        stmt = stmt.where(Item.region == region)
    stmt = stmt.order_by(Item.region, Item.key)
    return [ItemRow.of(i) for i in session.scalars(stmt)]


def list_fetches(session: Session, run_id: str) -> list[FetchRow]:
    """Every URL the run fetched, in the order the batches were observed."""
    stmt = (
        select(FetchRecord)
        .where(FetchRecord.run_id == run_id)
        .order_by(FetchRecord.fetched_at, FetchRecord.id)
    )
    return [FetchRow.of(f) for f in session.scalars(stmt)]


# --- workers and status (geoscrape status) ------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerRow:
    name: str
    region: str
    host: str
    pid: int
    egress: str | None
    started_at: datetime
    last_seen_at: datetime
    stopped_at: datetime | None
    exits: list[dict[str, Any]] | None = None  # regions.messages.ExitReport as JSON

    @classmethod
    def of(cls, worker: Worker) -> WorkerRow:
        return cls(
            name=worker.name,
            region=worker.region,
            host=worker.host,
            pid=worker.pid,
            egress=worker.egress,
            started_at=worker.started_at,
            last_seen_at=worker.last_seen_at,
            stopped_at=worker.stopped_at,
            exits=list(worker.exits) if worker.exits is not None else None,
        )


def live_workers(session: Session, seen_since: datetime) -> list[WorkerRow]:
    """Workers heard from at or after ``seen_since`` that have not said they stopped."""
    stmt = (
        select(Worker)
        .where(Worker.last_seen_at >= seen_since, Worker.stopped_at.is_(None))
        .order_by(Worker.region, Worker.host, Worker.pid)
    )
    return [WorkerRow.of(w) for w in session.scalars(stmt)]


def last_runs(session: Session) -> list[RunRow]:
    """The newest run of every (site, region), ordered by region then site."""
    newest = func.coalesce(Run.queued_at, Run.started_at, Run.finished_at)
    ranked = select(
        Run.id,
        func.row_number()
        .over(
            partition_by=(Run.site, Run.region),
            order_by=(newest.desc().nulls_last(), Run.id.desc()),
        )
        .label("n"),
    ).subquery()
    stmt = (
        select(Run)
        .join(ranked, ranked.c.id == Run.id)
        .where(ranked.c.n == 1)
        .order_by(Run.region, Run.site)
    )
    return [RunRow.of(r) for r in session.scalars(stmt)]


# --- paged lists (the HTTP API, exports) ----------------------------------------


def list_runs_page(
    session: Session,
    site: str | None = None,
    region: str | None = None,
    status: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[RunRow]:
    """Like list_runs, plus a time window on the run's time (queued, else started,
    else finished) and an offset."""
    newest = func.coalesce(Run.queued_at, Run.started_at, Run.finished_at)
    stmt = select(Run)
    for column, value in ((Run.site, site), (Run.region, region), (Run.status, status)):
        if value is not None:
            stmt = stmt.where(column == value)
    if since is not None:
        stmt = stmt.where(newest >= since)
    if until is not None:
        stmt = stmt.where(newest < until)
    stmt = stmt.order_by(newest.desc().nulls_last(), Run.id.desc()).limit(limit).offset(offset)
    return [RunRow.of(r) for r in session.scalars(stmt)]


def list_items_page(
    session: Session, site: str, region: str | None = None, limit: int = 100, offset: int = 0
) -> list[ItemRow]:
    """A page of list_items (by region, then key)."""
    stmt = select(Item).where(Item.site == site)
    if region is not None:
        stmt = stmt.where(Item.region == region)
    stmt = stmt.order_by(Item.region, Item.key).limit(limit).offset(offset)
    return [ItemRow.of(i) for i in session.scalars(stmt)]


def open_run(
    session: Session, site: str, region: str, other_than: str, now: datetime
) -> tuple[str, str] | None:
    """(id, status) of a run of (site, region), not `other_than`, still in
    progress at `now`: running, or queued before its job's deadline (after it,
    the job has expired or is about to). The beat's `overlap: skip` asks this."""
    rows = session.execute(
        select(Run.id, Run.status, Run.job).where(
            Run.site == site,
            Run.region == region,
            Run.status.in_(("queued", "running")),
            Run.id != other_than,
        )
    ).all()
    for row_id, status, job in rows:
        if status == "running":
            return row_id, status
        expires = (job or {}).get("expires_at")
        if expires is None or datetime.fromisoformat(expires) > now:
            return row_id, status
    return None


def open_run_checker(
    database_url: str,
) -> Callable[[str, str, str, datetime], tuple[str, str] | None]:
    """`open_run` on its own sessions, for the beat. An unreachable store answers
    None (logged): the beat then dispatches, and the job expires at the next tick."""
    from storage.db import make_engine, session_factory

    sessions = session_factory(make_engine(database_url))

    def check(site: str, region: str, other_than: str, now: datetime) -> tuple[str, str] | None:
        try:
            with sessions() as session:
                return open_run(session, site, region, other_than, now)
        except sa_exc.SQLAlchemyError as exc:
            log.warning("overlap check skipped, store unavailable: %s", str(exc).splitlines()[0])
            return None

    return check
