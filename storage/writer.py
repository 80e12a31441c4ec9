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
processes can apply messages concurrently. ``apply_messages`` writes the rows
of consecutive item batches together, one statement per table and 1,000 rows
(on PostgreSQL the rows travel as one JSON parameter), to the same final
state as applying the batches one by one.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import Any, cast

from pydantic_core import PydanticSerializationError, to_json
from sqlalchemy import (
    JSON,
    Column,
    ColumnElement,
    CursorResult,
    Table,
    Text,
    bindparam,
    case,
    func,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from regions.messages import (
    FINAL_STATUSES,
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


# What a JSON text holding a NUL or a lone surrogate has in it: the escape of one
# (a surrogate pair's, or a literal backslash before u0000, only costs the slow
# path), or the raw character or bytes of one (not valid JSON or UTF-8).
_UNCLEAN_JSON = re.compile(r"\\u(?:0000|[dD][89a-fA-F])|\x00|[\ud800-\udfff]")
_UNCLEAN_JSON_BYTES = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])|\x00|\xed[\xa0-\xbf]")


def cleaned(msg: IngestMessage, body: str | bytes | None = None) -> IngestMessage:
    """``msg`` made storable (_clean); ``body``: the JSON text it was parsed from.

    A body says whether the message needs cleaning without serialising the
    message again (5-10% of ingest's consumer thread, in cProfile and py-spy).
    """
    if isinstance(body, str) and _UNCLEAN_JSON.search(body) is None:
        return msg
    if isinstance(body, bytes) and _UNCLEAN_JSON_BYTES.search(body) is None:
        return msg
    return _cleaned(msg)


def _cleaned(msg: IngestMessage) -> IngestMessage:
    # Most messages need no cleaning, and pydantic's JSON serialisation says so
    # cheaply: it fails on a lone surrogate and escapes NUL as \u0000 (a literal
    # backslash-u0000 in the text only costs the slow path).
    try:
        text = msg.model_dump_json()
    except PydanticSerializationError:
        text = "\\u0000"
    if "\\u0000" not in text:
        return msg
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

# Rows per INSERT statement on PostgreSQL (one JSON parameter each).
BULK_ROWS = 1000


def _keep_first(*key: Any) -> Callable[[Any], Any]:
    """For _Rows.insert: a row whose `key` is already stored is skipped (redelivery)."""
    return lambda ins: ins.on_conflict_do_nothing(index_elements=list(key))


class _Rows:
    """Rows of one table (all with the same keys, no bytes), ready to INSERT.

    On PostgreSQL they are JSON text, BULK_ROWS rows per statement, each row an
    array of its values (in ``names`` order), unpacked by jsonb_array_elements:
    one statement and one round trip, where an executemany costs a Bind/Execute
    per row (most of ingest's time, client and server side). Arrays in jsonb,
    not objects through json_to_recordset: no key names to send and parse, no
    per-row lookup of them, and a JSON column's value is taken from the parsed
    jsonb as it is (json_to_recordset parses it again): the items upsert takes
    a third less time in PostgreSQL. SQLite runs in-process and keeps the
    executemany. Built without a session, so ingest can build the next group's
    rows while the previous group commits (storage/ingest.py).
    """

    def __init__(self, table: Table, rows: Iterable[Mapping[str, Any]], dialect: str) -> None:
        params = list(rows)
        self.table = table
        self.names = list(params[0]) if params else []
        self.chunks: list[Any] = params
        if dialect == "postgresql" and params:
            # A tuple per row (itemgetter of one name gives the bare value).
            values = (
                itemgetter(*self.names) if len(self.names) > 1 else lambda r: (r[self.names[0]],)
            )
            # pydantic-core's serialiser: a quarter of json.dumps' time for these rows
            # (most of the consumer's share of a group). Its timestamps are ISO 8601
            # with their offset: every one here comes from an AwareDatetime field.
            self.chunks = [
                {"rows": to_json([values(r) for r in params[start : start + BULK_ROWS]]).decode()}
                for start in range(0, len(params), BULK_ROWS)
            ]

    def insert(self, session: Session, on_conflict: Callable[[Any], Any]) -> None:
        """INSERT the rows with ``on_conflict(insert)``."""
        if not self.chunks:
            return
        if session.get_bind().dialect.name != "postgresql":
            session.execute(on_conflict(insert(session, self.table)), self.chunks)
            return
        row = (
            func.jsonb_array_elements(sql_cast(bindparam("rows", type_=Text), postgresql.JSONB))
            .table_valued("value")
            .render_derived(name="r")
            .c.value
        )

        def value(n: int, col: Column[Any]) -> ColumnElement[Any]:
            at: ColumnElement[Any] = literal_column(str(n))
            if isinstance(col.type, JSON):  # only item data here: never null
                return row.op("->")(at)
            return sql_cast(row.op("->>")(at), col.type)  # JSON null: NULL

        cols = [self.table.c[name] for name in self.names]
        stmt = on_conflict(
            postgresql.insert(self.table).from_select(
                self.names, select(*(value(n, c) for n, c in enumerate(cols)))
            )
        )
        for chunk in self.chunks:
            session.execute(stmt, chunk)


def _item_upsert(upsert: Any) -> Any:
    """An item keeps its newest observation's data and its earliest first sighting."""
    new = upsert.excluded
    newer = new.last_seen_at >= items.c.last_seen_at
    earlier = new.first_seen_at < items.c.first_seen_at

    def latest(col: str) -> Any:
        return case((newer, new[col]), else_=items.c[col])

    def first(col: str) -> Any:
        return case((earlier, new[col]), else_=items.c[col])

    return upsert.on_conflict_do_update(
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
    )


_LATEST = ("url", "data", "last_run_id", "last_seen_at")
_FIRST = ("first_run_id", "first_seen_at")


def _merge_item(old: dict[str, Any], new: dict[str, Any]) -> None:
    """Fold ``new`` into ``old`` as _item_upsert would apply it after ``old``."""
    if new["last_seen_at"] >= old["last_seen_at"]:
        old.update((c, new[c]) for c in _LATEST)
    if new["first_seen_at"] < old["first_seen_at"]:
        old.update((c, new[c]) for c in _FIRST)


class _Batches:
    """The rows of consecutive ItemBatches, written with one statement per table.

    Writing the merged rows leaves the tables exactly as applying the batches
    one after the other would: the first row per conflict key wins where the
    insert does nothing on conflict, items are folded as _item_upsert folds
    them, and a run's lease only grows, so one renewal to the newest time does.
    """

    def __init__(self) -> None:
        self.runs: dict[str, ItemBatch] = {}  # run_id -> its first batch here
        self.leases: dict[str, datetime] = {}
        self.contents: dict[str, Any] = {}
        self.observations: dict[tuple[str, str], dict[str, Any]] = {}
        self.items: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.item_samples: dict[tuple[str, int, str], dict[str, Any]] = {}
        self.fetches: dict[tuple[str, str], dict[str, Any]] = {}
        self.fetch_samples: dict[tuple[str, int, str], dict[str, Any]] = {}
        self.bodies: dict[tuple[str, int, str], dict[str, Any]] = {}

    def __bool__(self) -> bool:
        return bool(self.runs)

    def add(self, msg: ItemBatch) -> None:
        run_id, observed_at = msg.run_id, msg.observed_at
        self.runs.setdefault(run_id, msg)
        lease = self.leases.get(run_id)
        self.leases[run_id] = observed_at if lease is None else max(lease, observed_at)
        # Sample 0 is the run's observation; extra samples go to item_samples only.
        # One row per key and message: its first occurrence (an observation keeps
        # the first message's, an item folds every message's).
        unique: dict[str, ScrapedItem] = {}
        for it in msg.items:
            if it.sample == 0:
                unique.setdefault(it.key, it)
            elif (run_id, it.sample, it.key) not in self.item_samples:
                digest = content_hash(it.data)
                self.contents.setdefault(digest, it.data)
                self.item_samples[run_id, it.sample, it.key] = {
                    "run_id": run_id,
                    "sample": it.sample,
                    "key": it.key,
                    "url": it.url,
                    "content_hash": digest,
                    "observed_at": observed_at,
                }
        for it in unique.values():
            digest = content_hash(it.data)
            self.contents.setdefault(digest, it.data)
            self.observations.setdefault(
                (run_id, it.key),
                {
                    "run_id": run_id,
                    "site": msg.site,
                    "region": msg.region,
                    "key": it.key,
                    "url": it.url,
                    "content_hash": digest,
                    "observed_at": observed_at,
                },
            )
            row = {
                "site": msg.site,
                "region": msg.region,
                "key": it.key,
                "url": it.url,
                "data": it.data,
                "first_run_id": run_id,
                "last_run_id": run_id,
                "first_seen_at": observed_at,
                "last_seen_at": observed_at,
            }
            old = self.items.get((msg.site, msg.region, it.key))
            if old is None:
                self.items[msg.site, msg.region, it.key] = row
            else:
                _merge_item(old, row)

        for f in msg.fetches:
            fetch = {
                "run_id": run_id,
                "url": f.url,
                "status": f.status,
                "bytes": f.bytes,
                "error": f.error,
                "final_url": f.final_url,
                "sha256": f.sha256,
                "block": f.block,
                "fetched_at": observed_at,
            }
            if f.sample == 0:
                fetch |= {"region": msg.region, "exit_address": f.exit}
                self.fetches.setdefault((run_id, f.url), fetch)
            else:
                self.fetch_samples.setdefault(
                    (run_id, f.sample, f.url), fetch | {"sample": f.sample}
                )
            if (
                f.body is not None
                and f.status is not None
                and ((run_id, f.sample, f.url) not in self.bodies)
            ):
                self.bodies[run_id, f.sample, f.url] = {
                    "run_id": run_id,
                    "sample": f.sample,
                    "url": f.url,
                    "final_url": f.final_url,
                    "status": f.status,
                    "headers": [list(h) for h in f.headers or []],
                    "body": base64.b64decode(f.body),
                    "sha256": f.sha256 or "",
                    "fetched_at": observed_at,
                }

    def seal(self, dialect: str) -> _SealedBatches:
        """The rows to write, per table, as statement parameters for ``dialect``."""
        # Contents and items sorted by key, so two ingests writing overlapping rows
        # lock them in one order; the others keep the batches' order (their ids are
        # the crawl's order: fetches by id, observations by observed_at, id).
        return _SealedBatches(
            runs=self.runs,
            leases=self.leases,
            contents=_Rows(
                contents,
                ({"hash": h, "data": self.contents[h]} for h in sorted(self.contents)),
                dialect,
            ),
            observations=_Rows(observations, self.observations.values(), dialect),
            items=_Rows(items, (self.items[k] for k in sorted(self.items)), dialect),
            item_samples=_Rows(item_samples, self.item_samples.values(), dialect),
            fetches=_Rows(fetches, self.fetches.values(), dialect),
            fetch_samples=_Rows(fetch_samples, self.fetch_samples.values(), dialect),
            bodies=list(self.bodies.values()),
        )


def _noop() -> None:
    pass


@dataclass(frozen=True)
class _SealedBatches:
    """What _Batches.seal built: written in one go by ``write``."""

    runs: dict[str, ItemBatch]
    leases: dict[str, datetime]
    contents: _Rows
    observations: _Rows
    items: _Rows
    item_samples: _Rows
    fetches: _Rows
    fetch_samples: _Rows
    bodies: list[dict[str, Any]]

    def write_side_rows(self, session: Session) -> None:
        """The contents and items rows, which ingest may write on a second connection."""
        self.contents.insert(session, _keep_first(contents.c.hash))
        self.items.insert(session, _item_upsert)

    def write(
        self, session: Session, side_rows: bool = True, side_committed: Callable[[], None] = _noop
    ) -> None:
        for run_id, msg in self.runs.items():
            _ensure_run(session, msg, "running")
            _raise_status(session, run_id, "running")
            _renew_lease(session, run_id, self.leases[run_id])
        if side_rows:
            self.write_side_rows(session)
        elif self.item_samples.chunks:
            side_committed()  # an extra sample names its content by a foreign key
        self.observations.insert(session, _keep_first(observations.c.run_id, observations.c.key))
        self.item_samples.insert(
            session, _keep_first(item_samples.c.run_id, item_samples.c.sample, item_samples.c.key)
        )
        self.fetches.insert(session, _keep_first(fetches.c.run_id, fetches.c.url))
        self.fetch_samples.insert(
            session,
            _keep_first(fetch_samples.c.run_id, fetch_samples.c.sample, fetch_samples.c.url),
        )
        if self.bodies:  # bytes: not JSON, so an executemany on every backend
            session.execute(
                insert(session, bodies).on_conflict_do_nothing(
                    index_elements=[bodies.c.run_id, bodies.c.sample, bodies.c.url]
                ),
                self.bodies,
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
    apply_messages(session, [msg])


def apply_messages(session: Session, msgs: Iterable[IngestMessage]) -> None:
    """Apply parsed ingest messages in order, as apply_message one by one would;
    consecutive ItemBatches are written together. The caller commits."""
    apply_prepared(session, prepare(msgs, session.get_bind().dialect.name))


# What apply_prepared writes: the rows of consecutive item batches, or one
# other message.
Prepared = list[_SealedBatches | IngestMessage]


def prepare(msgs: Iterable[IngestMessage], dialect: str, clean: bool = False) -> Prepared:
    """The Python half of apply_messages (cleaning, hashing, rows, JSON), without
    a session: ingest runs it for the next group while the last one commits.
    clean: the messages went through ``cleaned`` already."""
    out: Prepared = []
    batches = _Batches()
    for msg in msgs:
        if not clean:
            msg = _cleaned(msg)
        if isinstance(msg, ItemBatch):
            batches.add(msg)
            continue
        if batches:
            out.append(batches.seal(dialect))
            batches = _Batches()
        out.append(msg)
    if batches:
        out.append(batches.seal(dialect))
    return out


def apply_prepared(
    session: Session,
    prepared: Prepared,
    side_rows: bool = True,
    side_committed: Callable[[], None] = _noop,
) -> None:
    """Write what prepare() built, in order; the caller commits.

    side_rows=False leaves out the item batches' ``contents`` and ``items`` rows,
    for apply_side_rows to write in another transaction: no write here references
    them but an extra sample (an observation names its content by hash, without a
    foreign key), the contents insert keeps the first row and the items upsert
    gives the same rows in any order and any number of times. A RunFinished reads
    them (an `expect: coverage` check joins the run's observations with their
    contents) and an extra sample's row references its content:
    ``side_committed`` is called before either is written, to make them visible.
    """
    for step in prepared:
        if isinstance(step, _SealedBatches):
            step.write(session, side_rows, side_committed)
        else:
            if isinstance(step, RunFinished):
                side_committed()
            _apply_one(session, step)


def has_side_rows(prepared: Prepared) -> bool:
    """Whether apply_side_rows has anything to write for ``prepared``."""
    return any(
        isinstance(step, _SealedBatches) and (step.items.chunks or step.contents.chunks)
        for step in prepared
    )


def apply_side_rows(session: Session, prepared: Prepared) -> None:
    """The ``contents`` and ``items`` rows that apply_prepared(side_rows=False) left
    out; the caller commits."""
    for step in prepared:
        if isinstance(step, _SealedBatches):
            step.write_side_rows(session)


def _apply_one(session: Session, msg: IngestMessage) -> None:
    if isinstance(msg, RunQueued):
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
