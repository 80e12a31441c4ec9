"""Which runs a query looks at, and what they saw.

A *snapshot* is the set of items one run observed. Compare reads each
region's latest succeeded run (or the runs of one tick); history and changes
walk a region's succeeded runs that observed at least one item (a run that
saw nothing, e.g. one answered 451 everywhere, says the region was blocked,
not that every item vanished).

Keys are ordered by code point on every backend (``COLLATE "C"`` on
PostgreSQL, SQLite's BINARY), so per-region streams merge by key in Python.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, exists, select
from sqlalchemy.orm import Session

from regions.messages import stored_job
from regions.site import ResolvedSite
from storage.errors import NotFoundError
from storage.models import contents, newest_first, observations, oldest_first, runs

STREAM_CHUNK = 2000  # rows fetched per round trip when streaming


@dataclass(frozen=True, slots=True)
class RunRef:
    """The columns of a run that queries need (never the job snapshot)."""

    id: str
    region: str
    status: str
    tick: str | None
    round: str  # tick, else the dispatch time shared by the runs of one `crawl`
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    egress: dict[str, Any] | None = None  # regions.messages.EgressAttestation as JSON

    @property
    def verified(self) -> bool:
        """Did every egress exit of this run pass verification?"""
        return bool(self.egress and self.egress.get("verified"))

    @property
    def at(self) -> datetime | None:
        """storage.models.run_time, in Python."""
        return self.finished_at or self.started_at or self.queued_at


def binary_key(session: Session) -> ColumnElement[Any]:
    """observations.key ordered by code point, as Python orders str."""
    if session.get_bind().dialect.name == "postgresql":
        return observations.c.key.collate("C")
    return observations.c.key


def _run_refs(session: Session, stmt: Any) -> list[RunRef]:
    return [
        RunRef(
            id=r.id,
            region=r.region,
            status=r.status,
            tick=r.tick,
            round=r.tick or r.dispatched_at or (r.queued_at.isoformat() if r.queued_at else r.id),
            queued_at=r.queued_at,
            started_at=r.started_at,
            finished_at=r.finished_at,
            error=r.error,
            egress=r.egress,
        )
        for r in session.execute(stmt)
    ]


def _run_columns() -> list[Any]:
    return [
        runs.c.id,
        runs.c.region,
        runs.c.status,
        runs.c.tick,
        runs.c.job["dispatched_at"].as_string().label("dispatched_at"),
        runs.c.queued_at,
        runs.c.started_at,
        runs.c.finished_at,
        runs.c.error,
        runs.c.egress,
    ]


def site_runs(session: Session, site: str, region: str | None = None) -> list[RunRef]:
    """Every run of ``site`` (oldest first); NotFoundError if the site has none."""
    stmt = select(*_run_columns()).where(runs.c.site == site)
    if region is not None:
        stmt = stmt.where(runs.c.region == region)
    found = _run_refs(session, stmt.order_by(*oldest_first()))
    if not found:
        require_site(session, site)
        if region is not None:
            raise NotFoundError(f"site {site!r} has no runs in region {region!r}")
    return found


def require_site(session: Session, site: str) -> None:
    if session.execute(select(runs.c.id).where(runs.c.site == site).limit(1)).first() is None:
        raise NotFoundError(f"unknown site {site!r}: no runs of it in the store")


def site_regions(session: Session, site: str) -> list[str]:
    """The regions that ran ``site`` at least once, sorted."""
    stmt = select(runs.c.region).where(runs.c.site == site).distinct().order_by(runs.c.region)
    found = list(session.scalars(stmt))
    if not found:
        require_site(session, site)
    return found


def latest_succeeded(
    session: Session, site: str, regions: Sequence[str], verified_only: bool = False
) -> dict[str, RunRef]:
    """Each region's newest succeeded run (regions without one are left out);
    with `verified_only`, its newest succeeded run whose egress was verified."""
    latest: dict[str, RunRef] = {}
    for region in regions:
        stmt = (
            select(*_run_columns())
            .where(runs.c.site == site, runs.c.status == "succeeded", runs.c.region == region)
            .order_by(*newest_first())
        )
        if not verified_only:
            stmt = stmt.limit(1)
        for ref in _run_refs(session, stmt):
            if ref.verified or not verified_only:
                latest[region] = ref
                break
    return latest


def tick_runs(session: Session, site: str, tick: str) -> dict[str, RunRef]:
    """The runs of one tick (or one `crawl` round), per region: a succeeded one first."""
    chosen: dict[str, RunRef] = {}
    for ref in site_runs(session, site):
        if tick not in (ref.tick, ref.round):
            continue
        held = chosen.get(ref.region)
        if held is None or (held.status != "succeeded") or ref.status == "succeeded":
            chosen[ref.region] = ref
    if not chosen:
        raise NotFoundError(f"site {site!r} has no runs in tick {tick!r}")
    return chosen


def snapshot_runs(session: Session, site: str, region: str) -> list[RunRef]:
    """Succeeded runs of (site, region) that observed an item, oldest first."""
    saw = exists().where(observations.c.run_id == runs.c.id)
    stmt = (
        select(*_run_columns())
        .where(runs.c.site == site, runs.c.region == region, runs.c.status == "succeeded", saw)
        .order_by(*oldest_first())
    )
    return _run_refs(session, stmt)


def site_config(session: Session, site: str) -> ResolvedSite | None:
    """The newest job config snapshot of ``site`` (None when no run carried one,
    or the newest job is from an older schema and no longer validates)."""
    stmt = (
        select(runs.c.job)
        .where(runs.c.site == site, runs.c.job.is_not(None))
        .order_by(*newest_first())
        .limit(1)
    )
    job = stored_job(session.scalar(stmt))
    return job.config if job is not None else None


def declared_fields(config: ResolvedSite | None) -> tuple[dict[str, str], str | None]:
    """(field -> declared type, key field) from a job config's extract section."""
    extract = config.extract if config is not None else None
    if extract is None:
        return {}, None
    return {name: spec.type for name, spec in extract.fields.items()}, extract.key


def stream_snapshot(session: Session, run_id: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(key, url, data) of everything ``run_id`` observed, by key in code-point order."""
    stmt = (
        select(observations.c.key, observations.c.url, contents.c.data)
        .join(contents, contents.c.hash == observations.c.content_hash)
        .where(observations.c.run_id == run_id)
        .order_by(binary_key(session))
        .execution_options(yield_per=STREAM_CHUNK)
    )
    for row in session.execute(stmt):
        yield row.key, row.url, row.data


def snapshot_hashes(session: Session, run_id: str) -> dict[str, str]:
    """key -> content hash of everything ``run_id`` observed."""
    stmt = select(observations.c.key, observations.c.content_hash).where(
        observations.c.run_id == run_id
    )
    return {k: h for k, h in session.execute(stmt)}


def contents_of(session: Session, hashes: set[str]) -> dict[str, dict[str, Any]]:
    """hash -> data, in chunks (IN lists stay small)."""
    found: dict[str, dict[str, Any]] = {}
    ordered = sorted(hashes)
    for i in range(0, len(ordered), 500):
        chunk = ordered[i : i + 500]
        stmt = select(contents.c.hash, contents.c.data).where(contents.c.hash.in_(chunk))
        found.update({h: d for h, d in session.execute(stmt)})
    return found
