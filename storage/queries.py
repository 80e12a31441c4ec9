"""Read-side queries of the store, returning typed, immutable rows (pydantic).

Every statement the fronts (CLI, API, dashboard, beat) need lives in
`storage/`; they call these functions and render what comes back. Runs are
ordered newest first by `storage.models.newest_first()`, and paged lists go
through `page()`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from regions.messages import FINAL_STATUSES
from storage.models import FetchRecord, Item, Run, Worker, newest_first, run_time, runs

log = logging.getLogger("geoscrape.store")

T = TypeVar("T")


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True)  # .model_validate(orm_row)


class RunFields(_Row):
    """What every view of a run starts with (RunRow; runinfo.RunDetail adds more)."""

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


class RunRow(RunFields):
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
        return cls.model_validate(run)


class ItemRow(_Row):
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
        return cls.model_validate(item)


class FetchRow(_Row):
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
        return cls.model_validate(fetch)


# --- paging -----------------------------------------------------------------------


class Page(BaseModel, Generic[T]):
    data: list[T]
    limit: int
    offset: int
    next_offset: int | None  # None on the last page


def page(rows: Sequence[T], limit: int, offset: int) -> Page[T]:
    """A page from `limit + 1` rows fetched at `offset`: the extra one says whether more follow."""
    return Page(
        data=list(rows[:limit]),
        limit=limit,
        offset=offset,
        next_offset=offset + limit if len(rows) > limit else None,
    )


def list_runs(
    session: Session,
    site: str | None = None,
    region: str | None = None,
    status: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[RunRow]:
    """Runs, newest first (storage.models.run_time: finished, else started, else
    queued), filtered by site, region, status and a window [since, until) on that time."""
    stmt = select(Run)
    for column, value in ((Run.site, site), (Run.region, region), (Run.status, status)):
        if value is not None:
            stmt = stmt.where(column == value)
    if since is not None:
        stmt = stmt.where(run_time() >= since)
    if until is not None:
        stmt = stmt.where(run_time() < until)
    stmt = stmt.order_by(*newest_first()).limit(limit).offset(offset)
    return [RunRow.of(r) for r in session.scalars(stmt)]


def in_progress(session: Session, limit: int = 100) -> list[RunRow]:
    """Runs not yet in a final status, newest first."""
    stmt = select(Run).where(Run.status.not_in(FINAL_STATUSES))
    return [RunRow.of(r) for r in session.scalars(stmt.order_by(*newest_first()).limit(limit))]


def get_runs(session: Session, run_ids: Sequence[str]) -> list[RunRow]:
    """The given runs in the order asked; unknown ids are left out."""
    if not run_ids:
        return []
    found = {r.id: r for r in session.scalars(select(Run).where(Run.id.in_(set(run_ids))))}
    return [RunRow.of(found[i]) for i in dict.fromkeys(run_ids) if i in found]


def list_items(
    session: Session,
    site: str,
    region: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[ItemRow]:
    """The latest data of every item of ``site``, ordered by region then key
    (`limit`/`offset`: one page of it)."""
    stmt = select(Item).where(Item.site == site)
    if region is not None:
        stmt = stmt.where(Item.region == region)
    stmt = stmt.order_by(Item.region, Item.key).limit(limit).offset(offset)
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


class WorkerRow(_Row):
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
        return cls.model_validate(worker)


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
    ranked = select(
        Run.id,
        func.row_number()
        .over(partition_by=(Run.site, Run.region), order_by=newest_first())
        .label("n"),
    ).subquery()
    stmt = (
        select(Run)
        .join(ranked, ranked.c.id == Run.id)
        .where(ranked.c.n == 1)
        .order_by(Run.region, Run.site)
    )
    return [RunRow.of(r) for r in session.scalars(stmt)]


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


# --- sites (GET /sites) ------------------------------------------------------------


class SiteRow(_Row):
    name: str
    regions: list[str]
    runs: int
    last_run_at: datetime | None


def list_sites(session: Session, limit: int = 100, offset: int = 0) -> list[SiteRow]:
    """Every site with runs in the store, by name: its regions, run count and newest run time."""
    stmt = (
        select(runs.c.site, func.count(), func.max(run_time()))
        .group_by(runs.c.site)
        .order_by(runs.c.site)
        .limit(limit)
        .offset(offset)
    )
    found = []
    for name, count, last in session.execute(stmt).all():
        regions = session.scalars(
            select(runs.c.region).where(runs.c.site == name).distinct().order_by(runs.c.region)
        ).all()
        found.append(SiteRow(name=name, regions=list(regions), runs=count, last_run_at=last))
    return found


# --- /metrics -----------------------------------------------------------------------


class RunCount(_Row):
    site: str
    region: str
    status: str
    count: int


class StoreCounts(_Row):
    """What /metrics reads from the store on each scrape."""

    runs: list[RunCount]
    pages: dict[str, int]  # region -> pages fetched by its runs
    items: dict[str, int]  # region -> items extracted by its runs
    regions: list[str]  # every region with a run, sorted
    newest_heartbeat: datetime | None  # the newest worker heartbeat stored


def store_counts(session: Session) -> StoreCounts:
    counted = session.execute(
        select(Run.site, Run.region, Run.status, func.count()).group_by(
            Run.site, Run.region, Run.status
        )
    )
    pages: dict[str, int] = {}
    items: dict[str, int] = {}
    for region, stats in session.execute(select(Run.region, Run.stats)):
        pages[region] = pages.get(region, 0) + int((stats or {}).get("pages", 0) or 0)
        items[region] = items.get(region, 0) + int((stats or {}).get("items", 0) or 0)
    return StoreCounts(
        runs=[RunCount(site=s, region=r, status=st, count=n) for s, r, st, n in counted],
        pages=pages,
        items=items,
        regions=sorted(set(session.scalars(select(Run.region).distinct()))),
        newest_heartbeat=session.scalar(select(func.max(Worker.last_seen_at))),
    )
