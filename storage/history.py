"""History of one item and the changes of a site over time, per region.

Observations hold a content hash per (run, key) and the data once per distinct
value (storage.content), so an item seen unchanged by a hundred runs costs a
hundred narrow rows and one copy of its data. Both queries collapse runs that
saw the same value.

A region's *snapshot runs* are its succeeded runs that observed at least one
item (storage.snapshots): an item is *absent* from a snapshot run that did not
observe it, and *vanished* when the first snapshot run after its last sighting
did not see it. Runs that failed or saw nothing (blocked) say nothing about
absence.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.errors import NotFoundError
from storage.models import contents, observations, runs
from storage.snapshots import (
    contents_of,
    require_site,
    site_regions,
    snapshot_hashes,
    snapshot_runs,
)
from storage.validate import check_region


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class HistoryEntry(_Model):
    """A stretch of runs of one region that saw the same value (or did not see the item)."""

    region: str
    seen: bool
    values: dict[str, Any] | None  # the selected fields (every field without --field)
    first_at: datetime
    last_at: datetime
    first_run_id: str
    last_run_id: str
    runs: int


class HistoryResult(_Model):
    site: str
    key: str
    fields: list[str] | None
    entries: list[HistoryEntry]  # by region, then time


def _project(data: dict[str, Any], fields: Sequence[str] | None) -> dict[str, Any]:
    return dict(data) if not fields else {f: data.get(f) for f in fields}


def history(
    session: Session,
    site: str,
    key: str,
    region: str | None = None,
    fields: Sequence[str] | None = None,
) -> HistoryResult:
    """The values of ``key`` over time per region (stretches of equal value merged)."""
    regions = [region] if region else site_regions(session, site)
    if region:
        require_site(session, site)
        check_region(session, region, site)  # the message every front gives for it
    stmt = (
        select(
            observations.c.region,
            observations.c.run_id,
            observations.c.observed_at,
            contents.c.data,
        )
        .join(contents, contents.c.hash == observations.c.content_hash)
        .join(runs, runs.c.id == observations.c.run_id)
        .where(observations.c.site == site, observations.c.key == key)
    )
    if region:
        stmt = stmt.where(observations.c.region == region)
    seen_rows = session.execute(stmt).all()
    if not seen_rows:
        where = f" in region {region!r}" if region else ""
        raise NotFoundError(f"site {site!r} has no item {key!r}{where}")

    entries: list[HistoryEntry] = []
    for reg in regions:
        # (time, run id, value or None for absent)
        events: list[tuple[datetime, str, dict[str, Any] | None]] = [
            (r.observed_at, r.run_id, _project(r.data, fields))
            for r in seen_rows
            if r.region == reg
        ]
        saw = {run_id for _, run_id, _ in events}
        events += [
            (ref.finished_at, ref.id, None)
            for ref in snapshot_runs(session, site, reg)
            if ref.id not in saw and ref.finished_at is not None
        ]
        events.sort(key=lambda e: (e[0], e[1]))
        for at, run_id, value in events:
            last = entries[-1] if entries else None
            if (
                last
                and last.region == reg
                and last.seen == (value is not None)
                and last.values == value
            ):
                entries[-1] = last.model_copy(
                    update={"last_at": at, "last_run_id": run_id, "runs": last.runs + 1}
                )
            else:
                entries.append(
                    HistoryEntry(
                        region=reg,
                        seen=value is not None,
                        values=value,
                        first_at=at,
                        last_at=at,
                        first_run_id=run_id,
                        last_run_id=run_id,
                        runs=1,
                    )
                )
    return HistoryResult(
        site=site, key=key, fields=list(fields) if fields else None, entries=entries
    )


ChangeKind = Literal["appeared", "changed", "vanished"]


class Change(_Model):
    region: str
    key: str
    change: ChangeKind
    at: datetime  # when the run that saw the change finished
    run_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    fields: list[str]  # the fields whose value changed (every field for appeared/vanished)


class ChangesResult(_Model):
    site: str
    since: datetime
    regions: list[str]
    total: int
    offset: int = 0
    changes: list[Change]  # by region, time, key


def changes(
    session: Session,
    site: str,
    since: datetime,
    region: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> ChangesResult:
    """Items that appeared, changed or vanished in snapshot runs finished at or after ``since``.

    Each snapshot run is compared with the region's previous one (the last
    before ``since`` is the baseline; none: every item of the first run appeared).
    """
    regions = [region] if region else site_regions(session, site)
    if region:
        require_site(session, site)
        check_region(session, region, site)  # the message every front gives for it
    raw: list[tuple[str, str, ChangeKind, datetime, str, str | None, str | None]] = []
    for reg in regions:
        chain = snapshot_runs(session, site, reg)
        start = next(
            (i for i, ref in enumerate(chain) if ref.finished_at and ref.finished_at >= since),
            len(chain),
        )
        previous = snapshot_hashes(session, chain[start - 1].id) if start > 0 else {}
        for ref in chain[start:]:
            current = snapshot_hashes(session, ref.id)
            assert ref.finished_at is not None
            for key in sorted(previous.keys() | current.keys()):
                old, new = previous.get(key), current.get(key)
                if old == new:
                    continue
                kind: ChangeKind = (
                    "appeared" if old is None else "vanished" if new is None else "changed"
                )
                raw.append((reg, key, kind, ref.finished_at, ref.id, old, new))
            previous = current
    raw.sort(key=lambda c: (c[0], c[3], c[1]))
    total = len(raw)
    page = raw[offset : None if limit is None else offset + limit]
    data = contents_of(session, {h for c in page for h in c[5:7] if h})
    out: list[Change] = []
    for reg, key, kind, at, run_id, before_h, after_h in page:
        before = data[before_h] if before_h else None
        after = data[after_h] if after_h else None
        names = list(dict.fromkeys([*(before or {}), *(after or {})]))
        changed = [n for n in names if (before or {}).get(n) != (after or {}).get(n)]
        out.append(
            Change(
                region=reg,
                key=key,
                change=kind,
                at=at,
                run_id=run_id,
                before=before,
                after=after,
                fields=changed if kind == "changed" else names,
            )
        )
    return ChangesResult(
        site=site, since=since, regions=regions, total=total, offset=offset, changes=out
    )
