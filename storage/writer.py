"""Idempotent application of ingest messages to the store.

Delivery is at-least-once and unordered, so every message may arrive any
number of times, in any order. ``apply_message`` is written so that applying
a message again leaves every table unchanged, and the final state does not
depend on the order of arrival:

- The run row is created by whichever message comes first (a placeholder
  built from that message), then only ever moved forward: a status goes up
  in rank (queued < running < succeeded/failed), never down.
- Observations and fetches are inserted once per (run_id, key) and
  (run_id, url); a redelivered batch inserts nothing. An observation holds
  the content hash of its data; the data goes to ``contents`` once per
  distinct value (storage.content), so unchanged items do not copy it again.
- An item (site, region, key) keeps the data of its newest observation; an
  older batch arriving late only pushes first_seen_at back if it is earlier.
- A run's lease (heartbeat_at) and attempts only grow: the newest heartbeat
  time (RunStarted, ItemBatch, RunProgress) and the highest attempt seen.

Every write is one set-based SQL statement (atomic on its own), so two ingest
processes can apply messages concurrently.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Table, case, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from regions.messages import (
    FINAL_STATUSES,
    Fetch,
    ItemBatch,
    Job,
    RunFinished,
    RunProgress,
    RunQueued,
    RunReleased,
    RunStarted,
    ScrapedItem,
    WorkerHeartbeat,
    dump,
    stored_job,
)
from regions.site import ResolvedSite
from storage.alerts import ALERTED_STATUSES, enqueue
from storage.content import content_hash
from storage.errors import UnsupportedDatabaseError
from storage.models import (
    bad_messages,
    bodies,
    contents,
    fetch_samples,
    fetches,
    item_samples,
    items,
    observations,
    runs,
    workers,
)
from storage.monitors import evaluate

# A status only moves to a higher rank. Statuses not listed (later: skipped,
# expired, dead) are final.
STATUS_RANK: dict[str, int] = {"queued": 0, "running": 1} | dict.fromkeys(FINAL_STATUSES, 2)
FINAL_RANK = 2

# Placeholder for a run first seen through a message other than RunQueued.
UNKNOWN_TRIGGER = "unknown"

RunMessage = RunQueued | RunStarted | ItemBatch | RunProgress | RunFinished
IngestMessage = RunMessage | WorkerHeartbeat


def status_rank(status: str) -> int:
    return STATUS_RANK.get(status, FINAL_RANK)


def _rank_of(column: ColumnElement[str]) -> ColumnElement[int]:
    return case(STATUS_RANK, value=column, else_=FINAL_RANK)


def insert(session: Session, table: Table) -> sqlite.Insert | postgresql.Insert:
    """An INSERT supporting ON CONFLICT for the session's database."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise UnsupportedDatabaseError(f"no upsert support for {dialect!r}")


_SURROGATES = re.compile("[\ud800-\udfff]")


def _clean(value: Any) -> Any:
    """Make scraped values storable everywhere.

    PostgreSQL rejects NUL characters in text and JSONB, and no database
    takes lone surrogates (not UTF-8 encodable). Both become U+FFFD on every
    backend, so SQLite and PostgreSQL hold the same data.
    """
    if isinstance(value, str):
        if "\x00" in value:
            value = value.replace("\x00", "\ufffd")
        return _SURROGATES.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _cleaned(msg: IngestMessage) -> IngestMessage:
    return type(msg).model_validate(_clean(msg.model_dump()))


# --- runs --------------------------------------------------------------------


def _ensure_run(session: Session, msg: RunMessage, status: str, **fields: Any) -> None:
    """Create the run row from ``msg`` unless it exists (any message may come first)."""
    row: dict[str, Any] = {
        "id": msg.run_id,
        "site": msg.site,
        "region": msg.region,
        "trigger": UNKNOWN_TRIGGER,
        "tick": None,
        "status": status,
        "queued_at": None,
        "started_at": None,
        "finished_at": None,
        "worker": None,
        "stats": {},
        "error": None,
        "job": None,
        "attempts": 0,
        "heartbeat_at": None,
    }
    row.update(fields)
    stmt = insert(session, runs).values(row)
    session.execute(stmt.on_conflict_do_nothing(index_elements=[runs.c.id]))


def _raise_status(session: Session, run_id: str, status: str) -> None:
    """Move the run's status up to ``status`` if it is below it."""
    session.execute(
        update(runs)
        .where(runs.c.id == run_id, _rank_of(runs.c.status) < status_rank(status))
        .values(status=status)
    )


def _renew_lease(session: Session, run_id: str, at: datetime | None, attempt: int = 0) -> None:
    """heartbeat_at = max(heartbeat_at, at), attempts = max(attempts, attempt).

    Monotonic, so redelivered or reordered heartbeats change nothing. Only
    `running` runs are reaped, so a heartbeat on another status is inert.
    """
    if at is not None:
        hb = runs.c.heartbeat_at
        session.execute(
            update(runs)
            .where(runs.c.id == run_id, or_(hb.is_(None), hb < at))
            .values(heartbeat_at=at)
        )
    if attempt:
        session.execute(
            update(runs)
            .where(runs.c.id == run_id, runs.c.attempts < attempt)
            .values(attempts=attempt)
        )


def _apply_queued(session: Session, msg: RunQueued) -> None:
    fields: dict[str, Any] = {"trigger": msg.trigger, "tick": msg.tick, "queued_at": msg.queued_at}
    if msg.job is not None:
        fields["job"] = dump(msg.job)
    if msg.code is not None:
        fields["code_version"] = msg.code.version
    _ensure_run(session, msg, "queued", **fields)
    session.execute(update(runs).where(runs.c.id == msg.run_id).values(fields))


def _apply_started(session: Session, msg: RunStarted) -> None:
    egress = msg.egress.model_dump(mode="json") if msg.egress is not None else None
    _ensure_run(
        session, msg, "running", started_at=msg.started_at, worker=msg.worker, egress=egress
    )
    _raise_status(session, msg.run_id, "running")
    # A job retried on another worker starts again: the latest attempt wins,
    # whatever order the two RunStarted arrive in.
    started = runs.c.started_at
    session.execute(
        update(runs)
        .where(runs.c.id == msg.run_id, or_(started.is_(None), started < msg.started_at))
        .values(started_at=msg.started_at, worker=msg.worker, egress=egress)
    )
    _renew_lease(session, msg.run_id, msg.started_at, msg.attempt)


def _apply_progress(session: Session, msg: RunProgress) -> None:
    stats = msg.stats.model_dump(mode="json")
    _ensure_run(session, msg, "running", stats=stats)
    _raise_status(session, msg.run_id, "running")
    session.execute(
        update(runs)
        .where(runs.c.id == msg.run_id, _rank_of(runs.c.status) < FINAL_RANK)
        .values(stats=stats)
    )
    _renew_lease(session, msg.run_id, msg.sent_at)


def _apply_finished(session: Session, msg: RunFinished) -> None:
    current = session.scalar(select(runs.c.status).where(runs.c.id == msg.run_id))
    if current == "cancelled" and msg.status == "cancelled":
        # The CLI's cancel comes first, the worker's abort (with what the crawl
        # did) after it: the later one's stats win, in whatever order they arrive.
        session.execute(
            update(runs)
            .where(runs.c.id == msg.run_id, runs.c.finished_at < msg.finished_at)
            .values(finished_at=msg.finished_at, stats=msg.stats.model_dump(mode="json"))
        )
        return
    if current is not None and status_rank(current) >= FINAL_RANK:
        return  # the first final status wins; a redelivery (or a late verdict) changes nothing
    site = _job_site(session, msg.run_id)
    status, reasons = msg.status, []
    if status == "succeeded" and site is not None and site.expect is not None:
        reasons = evaluate(session, msg.run_id, msg.site, msg.region, msg.stats, site.expect)
        if reasons:
            status = "degraded"
    # A degraded run says why in its error too, so every view of runs shows it.
    error = "; ".join([*(r.message for r in reasons), *([msg.error] if msg.error else [])])
    fields = {
        "finished_at": msg.finished_at,
        "stats": msg.stats.model_dump(mode="json"),
        "error": error or None,
        "reasons": [r.model_dump() for r in reasons] or None,
    }
    _ensure_run(session, msg, status, **fields)
    session.execute(
        update(runs)
        .where(runs.c.id == msg.run_id, _rank_of(runs.c.status) < FINAL_RANK)
        .values(status=status, **fields)
    )
    if status in ALERTED_STATUSES and site is not None and site.alerts is not None:
        told = [(r.check, r.message) for r in reasons] or [(status, msg.error or status)]
        enqueue(
            session,
            site=msg.site,
            region=msg.region,
            run_id=msg.run_id,
            status=status,
            reasons=told,
            config=site.alerts,
        )


def _job_site(session: Session, run_id: str) -> ResolvedSite | None:
    """The site config the run was dispatched with (None: unknown or unreadable)."""
    job = stored_job(session.scalar(select(runs.c.job).where(runs.c.id == run_id)))
    return job.config if job is not None else None


# --- item batches ------------------------------------------------------------


def _execute_many(session: Session, stmt: Any, rows: Iterable[Mapping[str, Any]]) -> None:
    params = list(rows)
    if params:
        session.execute(stmt, params)


def _apply_batch(session: Session, msg: ItemBatch) -> None:
    _ensure_run(session, msg, "running")
    _raise_status(session, msg.run_id, "running")
    observed_at: datetime = msg.observed_at
    _renew_lease(session, msg.run_id, observed_at)

    # One row per key: the first occurrence in the batch, as observations keep it.
    # Sample 0 is the run's observation; extra samples go to item_samples only.
    unique: dict[str, ScrapedItem] = {}
    extra: dict[tuple[int, str], ScrapedItem] = {}
    for item in msg.items:
        if item.sample == 0:
            unique.setdefault(item.key, item)
        else:
            extra.setdefault((item.sample, item.key), item)
    hashes = {key: content_hash(it.data) for key, it in unique.items()}
    extra_hashes = {sk: content_hash(it.data) for sk, it in extra.items()}

    # Sorted, so two ingests inserting overlapping contents lock rows in one order.
    by_hash = {hashes[key]: it.data for key, it in unique.items()}
    by_hash.update({extra_hashes[sk]: it.data for sk, it in extra.items()})
    _execute_many(
        session,
        insert(session, contents).on_conflict_do_nothing(index_elements=[contents.c.hash]),
        ({"hash": h, "data": by_hash[h]} for h in sorted(by_hash)),
    )
    _execute_many(
        session,
        insert(session, observations).on_conflict_do_nothing(
            index_elements=[observations.c.run_id, observations.c.key]
        ),
        (
            {
                "run_id": msg.run_id,
                "site": msg.site,
                "region": msg.region,
                "key": it.key,
                "url": it.url,
                "content_hash": hashes[it.key],
                "observed_at": observed_at,
            }
            for it in unique.values()
        ),
    )

    upsert = insert(session, items)
    new = upsert.excluded
    newer = new.last_seen_at >= items.c.last_seen_at
    earlier = new.first_seen_at < items.c.first_seen_at

    def latest(col: str) -> Any:
        return case((newer, new[col]), else_=items.c[col])

    def first(col: str) -> Any:
        return case((earlier, new[col]), else_=items.c[col])

    _execute_many(
        session,
        upsert.on_conflict_do_update(
            index_elements=[items.c.site, items.c.region, items.c.key],
            set_={
                "url": latest("url"),
                "data": latest("data"),
                "last_run_id": latest("last_run_id"),
                "last_seen_at": latest("last_seen_at"),
                "first_run_id": first("first_run_id"),
                "first_seen_at": first("first_seen_at"),
            },
            where=or_(newer, earlier),
        ),
        (
            {
                "site": msg.site,
                "region": msg.region,
                "key": it.key,
                "url": it.url,
                "data": it.data,
                "first_run_id": msg.run_id,
                "last_run_id": msg.run_id,
                "first_seen_at": observed_at,
                "last_seen_at": observed_at,
            }
            for it in unique.values()
        ),
    )

    _execute_many(
        session,
        insert(session, item_samples).on_conflict_do_nothing(
            index_elements=[item_samples.c.run_id, item_samples.c.sample, item_samples.c.key]
        ),
        (
            {
                "run_id": msg.run_id,
                "sample": sample,
                "key": key,
                "url": it.url,
                "content_hash": extra_hashes[sample, key],
                "observed_at": observed_at,
            }
            for (sample, key), it in extra.items()
        ),
    )

    def fetch_row(f: Fetch) -> dict[str, Any]:
        return {
            "run_id": msg.run_id,
            "url": f.url,
            "status": f.status,
            "bytes": f.bytes,
            "error": f.error,
            "final_url": f.final_url,
            "sha256": f.sha256,
            "block": f.block,
            "fetched_at": observed_at,
        }

    _execute_many(
        session,
        insert(session, fetches).on_conflict_do_nothing(
            index_elements=[fetches.c.run_id, fetches.c.url]
        ),
        (
            fetch_row(f) | {"region": msg.region, "exit_address": f.exit}
            for f in msg.fetches
            if f.sample == 0
        ),
    )
    _execute_many(
        session,
        insert(session, fetch_samples).on_conflict_do_nothing(
            index_elements=[fetch_samples.c.run_id, fetch_samples.c.sample, fetch_samples.c.url]
        ),
        (fetch_row(f) | {"sample": f.sample} for f in msg.fetches if f.sample > 0),
    )
    _execute_many(
        session,
        insert(session, bodies).on_conflict_do_nothing(
            index_elements=[bodies.c.run_id, bodies.c.sample, bodies.c.url]
        ),
        (
            {
                "run_id": msg.run_id,
                "sample": f.sample,
                "url": f.url,
                "final_url": f.final_url,
                "status": f.status,
                "headers": [list(h) for h in f.headers or []],
                "body": base64.b64decode(f.body),
                "sha256": f.sha256 or "",
                "fetched_at": observed_at,
            }
            for f in msg.fetches
            if f.body is not None and f.status is not None
        ),
    )


# --- worker heartbeats ---------------------------------------------------------


def _apply_heartbeat(session: Session, msg: WorkerHeartbeat) -> None:
    """Upsert the worker's row; any order of (re)delivered heartbeats gives the same row.

    A worker name (region@host:pid) can come back after a container restart, so a
    heartbeat with a later started_at is a new incarnation and replaces the row; one
    with an earlier started_at is stale and changes nothing.
    """
    row = {
        "name": msg.name,
        "region": msg.region,
        "host": msg.host,
        "pid": msg.pid,
        "egress": msg.egress,
        "exits": [e.model_dump(mode="json") for e in msg.exits] if msg.exits is not None else None,
        "started_at": msg.started_at,
        "last_seen_at": msg.sent_at,
        "stopped_at": msg.sent_at if msg.stopping else None,
    }
    stmt = insert(session, workers).values(row)
    new, old = stmt.excluded, workers.c
    newer = new.started_at > old.started_at
    same = new.started_at == old.started_at
    later = new.last_seen_at > old.last_seen_at

    def pick(col: str, same_value: Any) -> Any:
        return case((newer, new[col]), (same, same_value), else_=old[col])

    session.execute(
        stmt.on_conflict_do_update(
            index_elements=[old.name],
            set_={
                "region": pick("region", old.region),
                "host": pick("host", old.host),
                "pid": pick("pid", old.pid),
                "started_at": pick("started_at", old.started_at),
                "egress": pick("egress", case((later, new.egress), else_=old.egress)),
                "exits": pick("exits", case((later, new.exits), else_=old.exits)),
                "last_seen_at": pick(
                    "last_seen_at", case((later, new.last_seen_at), else_=old.last_seen_at)
                ),
                "stopped_at": pick("stopped_at", func.coalesce(old.stopped_at, new.stopped_at)),
            },
        )
    )


def apply_message(session: Session, msg: IngestMessage) -> None:
    """Apply one parsed ingest message; the caller commits (or rolls back)."""
    msg = _cleaned(msg)
    if isinstance(msg, ItemBatch):
        _apply_batch(session, msg)
    elif isinstance(msg, RunQueued):
        _apply_queued(session, msg)
    elif isinstance(msg, RunStarted):
        _apply_started(session, msg)
    elif isinstance(msg, RunProgress):
        _apply_progress(session, msg)
    elif isinstance(msg, RunFinished):
        _apply_finished(session, msg)
    elif isinstance(msg, WorkerHeartbeat):
        _apply_heartbeat(session, msg)
    else:  # pragma: no cover - parse_ingest only returns the kinds above
        raise TypeError(f"not an ingest message: {type(msg).__name__}")


def release_run(session: Session, msg: RunReleased) -> Job | None:
    """A worker handed its run back: `running` -> `queued`; returns the job to republish.

    Only if the run is still running on that worker (a redelivered RunReleased,
    or one arriving after another worker took the run, changes nothing and
    returns None). The lease is renewed so the reaper leaves the run alone.
    A stored job that no longer validates (an older schema) is not released:
    the run stays running and the reaper ends it.
    """
    job = stored_job(session.scalar(select(runs.c.job).where(runs.c.id == msg.run_id)))
    if job is None:
        return None
    claim = cast(
        CursorResult[Any],
        session.execute(
            update(runs)
            .where(
                runs.c.id == msg.run_id,
                runs.c.status == "running",
                runs.c.worker == msg.worker,
                runs.c.job.is_not(None),
            )
            .values(status="queued", heartbeat_at=msg.released_at)
        ),
    )
    if claim.rowcount != 1:
        return None
    return job


def record_bad_message(session: Session, body: str, error: str, received_at: datetime) -> None:
    """Keep a message that could not be applied; the caller commits."""
    session.execute(
        bad_messages.insert().values(
            received_at=received_at, body=_clean(body), error=_clean(error)
        )
    )
