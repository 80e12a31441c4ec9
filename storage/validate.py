"""One validation of the names a query front receives: site, region, status, field.

The CLI and the API both call these before querying, so the same bad name
gives the same message (and the CLI's exit 2 matches the API's 4xx):
unknown site or region -> NotFoundError (404), a bad status or field ->
QueryError (400).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from regions.messages import RunStatus
from storage.errors import NotFoundError, QueryError
from storage.models import runs
from storage.snapshots import require_site

RUN_STATUSES: tuple[str, ...] = RunStatus.__args__  # type: ignore[attr-defined]
# A fetch status filter: "404", or a class such as "4xx".
FETCH_STATUS = re.compile(r"^(?:[1-9]xx|[1-9][0-9]{2})$")


def check_status(status: str | None) -> None:
    if status is not None and status not in RUN_STATUSES:
        known = ", ".join(sorted(RUN_STATUSES))
        raise QueryError(f"status: {status!r} is not a run status (one of: {known})")


def check_fetch_status(status: str | None) -> None:
    """The `status` filter of `fetches` / `GET /runs/{id}/fetches`."""
    if status is not None and not FETCH_STATUS.match(status):
        raise QueryError(f"status: {status!r} is not an HTTP status or class (e.g. 404, 4xx)")


def check_site(session: Session, site: str | None) -> None:
    if site is not None:
        require_site(session, site)


def check_region(session: Session, region: str | None, site: str | None = None) -> None:
    """NotFoundError unless some run (of `site`, if given) ran in `region`."""
    if region is None:
        return
    stmt = select(runs.c.id).where(runs.c.region == region)
    if site is not None:
        stmt = stmt.where(runs.c.site == site)
    if session.execute(stmt.limit(1)).first() is None:
        where = f"site {site!r} has" if site is not None else "the store has"
        raise NotFoundError(f"{where} no runs in region {region!r}")


def check_run_filters(
    session: Session, site: str | None, region: str | None, status: str | None
) -> None:
    """The filters of `runs` / `GET /runs`."""
    check_status(status)
    check_site(session, site)
    check_region(session, region, site)


def check_fields(site: str, fields: Sequence[str] | None, declared: Sequence[str]) -> None:
    """QueryError for a field the site does not declare (when it declares any)."""
    if not fields or not declared:
        return
    unknown = [f for f in dict.fromkeys(fields) if f not in declared]
    if unknown:
        raise QueryError(
            f"field(s) {', '.join(repr(f) for f in unknown)} not declared by site {site!r} "
            f"(fields: {', '.join(declared)})"
        )
