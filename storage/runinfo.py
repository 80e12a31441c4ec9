"""The full story of one run: `geoscrape runs show RUN`, `geoscrape fetches RUN`,
`GET /runs/{id}` and `GET /runs/{id}/fetches` (same models, same errors), and
the dashboard's run page (`run_page`, from the same lookups).

A run id may be given by a unique prefix, as `geoscrape dead requeue` takes it.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Integer, String, literal, null, or_, select, union_all
from sqlalchemy.orm import Session

from regions.messages import stored_job
from regions.site import ResolvedSite
from storage.errors import NotFoundError, QueryError
from storage.models import Run, Worker, fetch_samples, fetches
from storage.queries import RunFields, RunRow
from storage.validate import check_fetch_status

LIMIT_NOTE = re.compile(r"limit reached: [^;\n]+")


class RunDetail(RunFields):
    egress: str | None  # the worker's source address towards the broker, when known
    # Where the run's traffic left from (regions.messages.EgressAttestation), and
    # the deployed code it ran: None for runs from before either existed.
    attestation: dict[str, Any] | None = None
    code_version: str | None = None
    attempts: int
    stats: dict[str, Any]
    error: str | None  # complete, never cut
    limits_reached: list[str]
    # The resolved site the job carried (None: no job, or one from an older schema).
    config: ResolvedSite | None


class FetchDetail(BaseModel):
    url: str
    sample: int = 0  # compare.samples: 0 is the run's own fetch, 1.. the extra samples
    status: int | None
    bytes: int
    error: str | None
    final_url: str | None
    fetched_at: datetime
    sha256: str | None = None  # of the body as received
    block: str | None = None  # the block signature the response matched
    exit_address: str | None = None  # the egress exit it left through, when known


class FetchList(BaseModel):
    run_id: str
    site: str
    region: str
    fetches: list[FetchDetail]


def find_run(session: Session, run_id: str) -> Run:
    """The run with this id or unique id prefix; NotFoundError/QueryError otherwise."""
    if not run_id:
        raise QueryError("run: give a run id (or a unique prefix of one)")
    exact = session.get(Run, run_id)
    if exact is not None:
        return exact
    escaped = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    found = session.scalars(
        select(Run).where(Run.id.like(f"{escaped}%", escape="\\")).limit(2)
    ).all()
    if not found:
        raise NotFoundError(f"unknown run {run_id!r}")
    if len(found) > 1:
        raise QueryError(f"run {run_id!r}: more than one run starts with it, give more of the id")
    return found[0]


def run_detail(session: Session, run_id: str) -> RunDetail:
    run = find_run(session, run_id)
    address = None
    if run.worker:
        address = session.scalar(select(Worker.egress).where(Worker.name == run.worker))
    # The listing's row (storage.queries.RunRow) plus what only the full story shows;
    # its `egress` (the attestation) is `attestation` here, `egress` the worker's address.
    row = RunRow.of(run).model_dump()
    return RunDetail(
        **{k: v for k, v in row.items() if k != "egress"},
        egress=address,
        attestation=row["egress"],
        attempts=run.attempts,
        limits_reached=LIMIT_NOTE.findall(run.error or ""),
        config=job.config if (job := stored_job(run.job)) is not None else None,
    )


def run_fetches(
    session: Session, run_id: str, *, status: str | None = None, errors: bool = False
) -> FetchList:
    """The run's fetches in order; `status` 404 or 4xx; `errors`: failed ones only
    (no HTTP response, or a status of 400 and above)."""
    check_fetch_status(status)
    run = find_run(session, run_id)
    return FetchList(
        run_id=run.id,
        site=run.site,
        region=run.region,
        fetches=_fetches(session, run.id, status=status, errors=errors),
    )


def _fetches(
    session: Session, run_id: str, *, status: str | None = None, errors: bool = False
) -> list[FetchDetail]:
    cols = ("url", "status", "bytes", "error", "final_url", "fetched_at", "sha256", "block")
    first = select(
        *(fetches.c[c] for c in cols),
        fetches.c.exit_address,
        fetches.c.id.label("n"),
        literal(0, Integer).label("sample"),
    ).where(fetches.c.run_id == run_id)
    more = select(  # the extra samples of compare.samples (storage.models.fetch_samples)
        *(fetch_samples.c[c] for c in cols),
        null().cast(String).label("exit_address"),
        fetch_samples.c.id.label("n"),
        fetch_samples.c.sample,
    ).where(fetch_samples.c.run_id == run_id)
    both = union_all(first, more).subquery()
    stmt = select(both)
    if status is not None:
        if status.endswith("xx"):
            low = int(status[0]) * 100
            stmt = stmt.where(both.c.status >= low, both.c.status < low + 100)
        else:
            stmt = stmt.where(both.c.status == int(status))
    if errors:
        stmt = stmt.where(
            or_(both.c.status.is_(None), both.c.status >= 400, both.c.error.is_not(None))
        )
    rows = session.execute(stmt.order_by(both.c.sample, both.c.fetched_at, both.c.n)).mappings()
    return [FetchDetail.model_validate(dict(r)) for r in rows]


MAX_FAILED_SHOWN = 200


class RunPage(BaseModel):
    """The dashboard's run page: the listing's row, the job as dispatched, status
    codes and failed fetches of the run's own fetches (not compare samples)."""

    run: RunRow
    job: dict[str, Any] | None
    attempts: int
    status_codes: list[tuple[str, int]]  # ("200", 11), ("error", 2)
    failed: list[FetchDetail]  # no response or a status >= 400, the first MAX_FAILED_SHOWN
    limits: list[str]  # each limit reached


def run_page(session: Session, run_id: str) -> RunPage:
    run = find_run(session, run_id)
    own = [f for f in _fetches(session, run.id) if f.sample == 0]
    codes = Counter("error" if f.status is None else str(f.status) for f in own)
    failed = [f for f in own if f.status is None or f.status >= 400]
    # The runner reports limits as "limit reached: a; b" in a succeeded run's error.
    limits = []
    if run.error and run.error.startswith("limit reached: "):
        limits = run.error.removeprefix("limit reached: ").split("; ")
    return RunPage(
        run=RunRow.of(run),
        job=run.job,
        attempts=run.attempts,
        status_codes=sorted(codes.items()),
        failed=failed[:MAX_FAILED_SHOWN],
        limits=limits,
    )
