"""The store's tables (SQLAlchemy 2.x typed declarative).

- ``runs``: one row per run (one crawl of one site from one region), keyed by
  the run id fixed at dispatch.
- ``items``: the latest data per (site, region, key).
- ``observations``: what each run saw, per key (history); the data by content
  hash, so an unchanged item costs one narrow row per run, not a copy.
- ``contents``: each distinct item data once, keyed by its content hash.
- ``fetches``: every URL a run fetched, with its HTTP status.
- ``bad_messages``: ingest messages that did not parse, kept for inspection.
- ``dead_jobs``: dead-lettered jobs, kept for `geoscrape dead` and requeue.
- ``workers``: regional workers as last heard from (heartbeats).
- ``code_bundles``: Scrapy projects shipped by `geoscrape deploy`, by sha256.
- ``item_samples`` / ``fetch_samples``: the extra samples of a page
  (compare.samples > 1); sample 0 is in observations / fetches.
- ``bodies``: response bodies of sites with keep_bodies (WARC export), kept out
  of the hot tables.
- ``alerts``: alerts to deliver (one row per sink), and delivered ones.

Every timestamp is stored and returned as an aware UTC datetime.
Schema changes go through an Alembic revision in storage/migrations/versions.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    ColumnElement,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Deterministic constraint names on every backend (SQLite batch migrations need names).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSON everywhere, JSONB on PostgreSQL.
JSONType = JSON().with_variant(JSONB(), "postgresql")
# 64-bit surrogate keys; on SQLite only INTEGER PRIMARY KEY autoincrements.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp, always UTC.

    PostgreSQL stores ``timestamptz``. SQLite has no time zones, so values are
    stored as naive UTC text in one fixed-width format (which keeps SQL
    comparisons correct) and come back with tzinfo=UTC. A naive input is
    taken as UTC.
    """

    impl = DateTime
    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if dialect.name == "sqlite":
            value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
    }


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        Index(None, "site", "region", "queued_at"),
        # each region's latest succeeded run (compare, changes); a tick's runs
        Index(None, "site", "status", "finished_at"),
        Index(None, "site", "tick"),
        Index(None, "status", "heartbeat_at"),  # the reaper's scan
    )

    id: Mapped[str] = mapped_column(String, primary_key=True)
    site: Mapped[str] = mapped_column(String)
    region: Mapped[str] = mapped_column(String)
    trigger: Mapped[str] = mapped_column(String)
    tick: Mapped[str | None] = mapped_column(String)
    # queued | running | succeeded | failed | skipped | expired | dead | degraded.
    # A plain string, not a DB enum, so new statuses need no migration.
    status: Mapped[str] = mapped_column(String)
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    worker: Mapped[str | None] = mapped_column(String)
    stats: Mapped[dict[str, Any]]
    error: Mapped[str | None] = mapped_column(Text)
    # The job as dispatched (from RunQueued), so the centre can redeliver it.
    job: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # Deliveries of the job that started a crawl (poison-job accounting).
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The run's lease: the newest heartbeat (RunStarted, ItemBatch, RunProgress),
    # by the worker's clock; the reaper bumps it when it redelivers (storage/reaper.py).
    heartbeat_at: Mapped[datetime | None]
    # The deployed code bundle the run's job pinned (name@sha256 prefix), if any.
    code_version: Mapped[str | None] = mapped_column(String)
    # Where the run's traffic left from (regions.messages.EgressAttestation);
    # None: a worker from before attestation.
    egress: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # Why a run is `degraded`: the failed `expect:` checks (storage/monitors.py).
    reasons: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)


class Worker(Base):
    """A regional worker as last heard from (its heartbeats travel over ingest)."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String, primary_key=True)  # region@host:pid
    region: Mapped[str] = mapped_column(String)
    host: Mapped[str] = mapped_column(String)
    pid: Mapped[int] = mapped_column(Integer)
    egress: Mapped[str | None] = mapped_column(String)  # source address, when known
    # Its egress exits' verification state (regions.messages.ExitReport list);
    # None: a direct, unverified region.
    exits: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    started_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    stopped_at: Mapped[datetime | None]


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("site", "region", "key"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    site: Mapped[str] = mapped_column(String)
    region: Mapped[str] = mapped_column(String)
    key: Mapped[str] = mapped_column(Text)
    url: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]]
    first_run_id: Mapped[str] = mapped_column(String)
    last_run_id: Mapped[str] = mapped_column(String)
    first_seen_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]


class Content(Base):
    """One distinct item data, stored once whatever the number of runs that saw it."""

    __tablename__ = "contents"

    hash: Mapped[str] = mapped_column(String, primary_key=True)  # storage.content.content_hash
    data: Mapped[dict[str, Any]]


class Observation(Base):
    __tablename__ = "observations"
    # Few indexes, for ingest's sake (migration 0010): (run_id, key) for a run and
    # redeliveries; history of one key, in one region or all; exports and changes
    # by time.
    __table_args__ = (
        UniqueConstraint("run_id", "key"),
        Index(None, "site", "key"),
        Index(None, "site", "observed_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    run_id: Mapped[str] = mapped_column(String, ForeignKey("runs.id", ondelete="CASCADE"))
    site: Mapped[str] = mapped_column(String)
    region: Mapped[str] = mapped_column(String)
    key: Mapped[str] = mapped_column(Text)
    url: Mapped[str] = mapped_column(Text)
    # No foreign key (a row lock per insert): the writer stores the content first,
    # in the same transaction, and contents are never deleted.
    content_hash: Mapped[str] = mapped_column(String)
    observed_at: Mapped[datetime]

    content: Mapped[Content] = relationship(
        lazy="joined",
        viewonly=True,
        primaryjoin="foreign(Observation.content_hash) == Content.hash",
    )

    @property
    def data(self) -> dict[str, Any]:
        return self.content.data


class FetchRecord(Base):
    __tablename__ = "fetches"
    __table_args__ = (UniqueConstraint("run_id", "url"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    run_id: Mapped[str] = mapped_column(String, ForeignKey("runs.id", ondelete="CASCADE"))
    region: Mapped[str] = mapped_column(String)
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[int | None] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    final_url: Mapped[str | None] = mapped_column(Text)
    exit_address: Mapped[str | None] = mapped_column(String)  # the egress exit, when known
    fetched_at: Mapped[datetime]
    sha256: Mapped[str | None] = mapped_column(String)  # of the body as received
    block: Mapped[str | None] = mapped_column(String)  # block signature matched


class ItemSample(Base):
    """An item as an extra sample (1..) of its page saw it (sample 0: observations)."""

    __tablename__ = "item_samples"
    __table_args__ = (UniqueConstraint("run_id", "sample", "key"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    run_id: Mapped[str] = mapped_column(String, ForeignKey("runs.id", ondelete="CASCADE"))
    sample: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(Text)
    url: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String, ForeignKey("contents.hash"))
    observed_at: Mapped[datetime]


class FetchSample(Base):
    """A fetch of an extra sample (1..) of a page (sample 0: fetches)."""

    __tablename__ = "fetch_samples"
    __table_args__ = (UniqueConstraint("run_id", "sample", "url"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    run_id: Mapped[str] = mapped_column(String, ForeignKey("runs.id", ondelete="CASCADE"))
    sample: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[int | None] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    final_url: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String)
    block: Mapped[str | None] = mapped_column(String)
    fetched_at: Mapped[datetime]


class Body(Base):
    """A response body kept for evidence (keep_bodies), bounded by limits.max_bytes."""

    __tablename__ = "bodies"
    __table_args__ = (UniqueConstraint("run_id", "sample", "url"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    run_id: Mapped[str] = mapped_column(String, ForeignKey("runs.id", ondelete="CASCADE"))
    sample: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(Text)
    final_url: Mapped[str | None] = mapped_column(Text)
    status: Mapped[int] = mapped_column(Integer)
    headers: Mapped[list[list[str]]] = mapped_column(JSONType)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String)
    fetched_at: Mapped[datetime]


class Alert(Base):
    """One alert for one sink: pending until delivered (storage/alerts.py)."""

    __tablename__ = "alerts"
    __table_args__ = (
        Index(None, "site", "region", "reason", "created_at"),  # the `every` window
        Index(None, "status", "next_attempt_at"),  # the sender's scan
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    site: Mapped[str] = mapped_column(String)
    region: Mapped[str] = mapped_column(String)
    reason: Mapped[str] = mapped_column(String)  # drop, items, coverage:price, failed...
    run_id: Mapped[str | None] = mapped_column(String)
    sink: Mapped[dict[str, Any]] = mapped_column(JSONType)  # {"webhook": {...}} | {"email": ..}
    message: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String)  # pending | sent | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime]
    next_attempt_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)


class BadMessage(Base):
    __tablename__ = "bad_messages"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    received_at: Mapped[datetime]
    body: Mapped[str] = mapped_column(Text)
    error: Mapped[str] = mapped_column(Text)


class DeadJob(Base):
    """A job RabbitMQ dead-lettered into `scrape.dead` for a reason other than expiry
    (a poison job rejected after repeated failures), kept so a human can requeue it."""

    __tablename__ = "dead_jobs"

    run_id: Mapped[str] = mapped_column(String, primary_key=True)
    site: Mapped[str] = mapped_column(String)
    region: Mapped[str] = mapped_column(String)
    reason: Mapped[str] = mapped_column(String)  # x-death reason: rejected, maxlen...
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)
    job: Mapped[dict[str, Any]] = mapped_column(JSONType)  # the Job body, to republish
    dead_at: Mapped[datetime]
    requeued_at: Mapped[datetime | None]


class CodeBundle(Base):
    """A Scrapy project zipped by `geoscrape deploy`; workers fetch it by sha256."""

    __tablename__ = "code_bundles"
    __table_args__ = (Index(None, "name", "deployed_at"),)

    sha256: Mapped[str] = mapped_column(String, primary_key=True)
    name: Mapped[str] = mapped_column(String, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    content: Mapped[bytes] = mapped_column(LargeBinary)
    deployed_at: Mapped[datetime]  # a redeploy of the same bytes bumps it


# The Core tables, for set-based statements.
runs = cast(Table, Run.__table__)
items = cast(Table, Item.__table__)
observations = cast(Table, Observation.__table__)
contents = cast(Table, Content.__table__)
fetches = cast(Table, FetchRecord.__table__)
bad_messages = cast(Table, BadMessage.__table__)
dead_jobs = cast(Table, DeadJob.__table__)
workers = cast(Table, Worker.__table__)
code_bundles = cast(Table, CodeBundle.__table__)
item_samples = cast(Table, ItemSample.__table__)
fetch_samples = cast(Table, FetchSample.__table__)
bodies = cast(Table, Body.__table__)
alerts = cast(Table, Alert.__table__)


def run_time() -> ColumnElement[Any]:
    """A run's time for "newest" and time windows everywhere: finished, else
    started, else queued (a run known only from a late message may lack any one)."""
    return func.coalesce(runs.c.finished_at, runs.c.started_at, runs.c.queued_at)


def newest_first() -> tuple[ColumnElement[Any], ...]:
    """The one ORDER BY for runs, newest first (ties by id, so pages are stable)."""
    return (run_time().desc().nulls_last(), runs.c.id.desc())


def oldest_first() -> tuple[ColumnElement[Any], ...]:
    """newest_first() reversed: the chains that history, changes and access walk."""
    return (run_time().nulls_first(), runs.c.id)
