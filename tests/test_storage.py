"""The store: schema, migrations, idempotent writer and queries.

Every test taking ``db_url`` runs on SQLite and on a fresh PostgreSQL database.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from regions.messages import (
    Fetch,
    ItemBatch,
    MessageError,
    RunFinished,
    RunProgress,
    RunQueued,
    RunStarted,
    RunStats,
    ScrapedItem,
    cancelled_run,
    parse_ingest,
)
from regions.messages import dump as dump_message
from storage.db import database_url, make_engine, normalize_url, session_factory
from storage.errors import SchemaError, StorageError, UnsupportedDatabaseError
from storage.migrate import current_revision, downgrade, ensure_schema, head_revision, upgrade
from storage.models import Base, bad_messages, contents, fetches, items, observations, runs
from storage.queries import (
    FetchRow,
    ItemRow,
    RunRow,
    get_runs,
    list_fetches,
    list_items,
    list_runs,
)
from storage.writer import (
    IngestMessage,
    apply_message,
    apply_messages,
    cleaned,
    record_bad_message,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
TABLES = (runs, items, observations, contents, fetches, bad_messages)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    ensure_schema(db_url)
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


def apply(sessions: sessionmaker[Session], *messages: IngestMessage) -> None:
    """Each message in its own transaction, as ingest does."""
    for msg in messages:
        with sessions.begin() as session:
            apply_message(session, msg)


def dump(sessions: sessionmaker[Session]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in primary-key order."""
    with sessions() as session:
        return {
            t.name: [tuple(r) for r in session.execute(select(t).order_by(*t.primary_key))]
            for t in TABLES
        }


def count(sessions: sessionmaker[Session], table: Any) -> int:
    with sessions() as session:
        return len(session.execute(select(table)).all())


# --- message builders ---------------------------------------------------------


def queued(run: str, site: str = "shop", region: str = "eu", minute: float = 0) -> RunQueued:
    return RunQueued(
        run_id=run, site=site, region=region, trigger="schedule", tick="t1", queued_at=at(minute)
    )


def started(
    run: str, site: str = "shop", region: str = "eu", minute: float = 1, worker: str = "w-eu-1"
) -> RunStarted:
    return RunStarted(run_id=run, site=site, region=region, worker=worker, started_at=at(minute))


def batch(
    run: str,
    prices: dict[str, int],
    *,
    site: str = "shop",
    region: str = "eu",
    seq: int = 0,
    minute: float = 2,
    urls: tuple[str, ...] = ("https://shop.example/prices",),
) -> ItemBatch:
    return ItemBatch(
        run_id=run,
        site=site,
        region=region,
        seq=seq,
        observed_at=at(minute),
        items=[
            ScrapedItem(key=k, url=f"https://shop.example/p/{k}", data={"sku": k, "price": p})
            for k, p in prices.items()
        ],
        fetches=[Fetch(url=u, status=200, bytes=1000 + i) for i, u in enumerate(urls)],
    )


def progress(run: str, pages: int, site: str = "shop", region: str = "eu") -> RunProgress:
    return RunProgress(run_id=run, site=site, region=region, stats=RunStats(pages=pages))


def finished(
    run: str,
    status: Literal["succeeded", "failed"] = "succeeded",
    site: str = "shop",
    region: str = "eu",
    minute: float = 3,
    pages: int = 3,
    error: str | None = None,
) -> RunFinished:
    return RunFinished(
        run_id=run,
        site=site,
        region=region,
        status=status,
        finished_at=at(minute),
        stats=RunStats(pages=pages, items=2, bytes=3000, duration=61.5, status_codes={"200": 3}),
        error=error,
    )


FINAL_STATS = {
    "pages": 3,
    "items": 2,
    "errors": 0,
    "bytes": 3000,
    "duration": 61.5,
    "status_codes": {"200": 3},
    "peak_rss": 0,
    "dropped": 0,
    "rate_wait": 0.0,
    "rate_pauses": 0,
    "rate_strikes": 0,
}


def run_row(sessions: sessionmaker[Session], run_id: str) -> RunRow:
    with sessions() as session:
        (row,) = get_runs(session, [run_id])
        return row


def item_rows(sessions: sessionmaker[Session], site: str = "shop") -> list[ItemRow]:
    with sessions() as session:
        return list_items(session, site)


# --- db.py ------------------------------------------------------------------


def test_database_url_from_env_and_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEOSCRAPE_DATABASE_URL", raising=False)
    monkeypatch.setenv("GEOSCRAPE_HOME", "/srv/geo")  # relative SQLite paths resolve here
    assert database_url() == "sqlite:////srv/geo/geoscrape.db"
    monkeypatch.setenv("GEOSCRAPE_DATABASE_URL", "postgresql://u:p@db:5432/geo")
    assert database_url() == "postgresql+psycopg://u:p@db:5432/geo"
    monkeypatch.setenv("GEOSCRAPE_DATABASE_URL", "postgres://u@db/geo")
    assert database_url() == "postgresql+psycopg://u@db/geo"
    assert normalize_url("postgresql+psycopg://x/y") == "postgresql+psycopg://x/y"
    assert normalize_url("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"


def test_unsupported_database_is_a_storage_error() -> None:
    with pytest.raises(UnsupportedDatabaseError, match="mysql") as info:
        make_engine("mysql://root@localhost/geo")
    assert isinstance(info.value, StorageError)


def test_sqlite_engine_settings(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        engine.dispose()


# --- migrations ----------------------------------------------------------------


def test_migration_creates_exactly_the_models_schema(db_url: str) -> None:
    assert current_revision(db_url) is None
    assert ensure_schema(db_url) == head_revision()
    assert current_revision(db_url) == head_revision()
    assert ensure_schema(db_url) == head_revision()  # again: a no-op
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_foreign_keys_enforced(sessions: sessionmaker[Session]) -> None:
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.execute(
            observations.insert().values(
                run_id="nope",
                site="s",
                region="eu",
                key="k",
                url="u",
                content_hash="h",
                observed_at=T0,
            )
        )


def test_ensure_schema_from_two_threads_at_once(db_url: str) -> None:
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            barrier.wait()
            ensure_schema(db_url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert current_revision(db_url) == head_revision()


def test_downgrade_then_upgrade(db_url: str) -> None:
    ensure_schema(db_url)
    downgrade(db_url, "base")
    assert current_revision(db_url) is None
    upgrade(db_url)
    assert current_revision(db_url) == head_revision()


def test_unknown_revision_is_refused(db_url: str) -> None:
    ensure_schema(db_url)
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    finally:
        engine.dispose()
    with pytest.raises(SchemaError, match="9999_future"):
        ensure_schema(db_url)


# --- writer: idempotency -------------------------------------------------------------


def test_item_batch_applied_twice_changes_nothing(sessions: sessionmaker[Session]) -> None:
    b = batch("r1", {"a": 10, "b": 20}, urls=("https://shop.example/1", "https://shop.example/2"))
    apply(sessions, queued("r1"), started("r1"), b)
    before = dump(sessions)
    apply(sessions, b)
    assert dump(sessions) == before
    apply(sessions, b, b)
    assert dump(sessions) == before

    assert [(r[1], r[2], r[3], r[4], r[5], r[7]) for r in before["observations"]] == [
        ("r1", "shop", "eu", "a", "https://shop.example/p/a", at(2)),
        ("r1", "shop", "eu", "b", "https://shop.example/p/b", at(2)),
    ]
    # The data is stored once per distinct value, by content hash.
    stored = dict(before["contents"])
    assert [stored[r[6]] for r in before["observations"]] == [
        {"sku": "a", "price": 10},
        {"sku": "b", "price": 20},
    ]
    assert item_rows(sessions) == [
        ItemRow(
            site="shop",
            region="eu",
            key="a",
            url="https://shop.example/p/a",
            data={"sku": "a", "price": 10},
            first_run_id="r1",
            last_run_id="r1",
            first_seen_at=at(2),
            last_seen_at=at(2),
        ),
        ItemRow(
            site="shop",
            region="eu",
            key="b",
            url="https://shop.example/p/b",
            data={"sku": "b", "price": 20},
            first_run_id="r1",
            last_run_id="r1",
            first_seen_at=at(2),
            last_seen_at=at(2),
        ),
    ]
    with sessions() as session:
        assert list_fetches(session, "r1") == [
            FetchRow(
                run_id="r1",
                region="eu",
                url="https://shop.example/1",
                status=200,
                bytes=1000,
                error=None,
                final_url=None,
                fetched_at=at(2),
            ),
            FetchRow(
                run_id="r1",
                region="eu",
                url="https://shop.example/2",
                status=200,
                bytes=1001,
                error=None,
                final_url=None,
                fetched_at=at(2),
            ),
        ]
    assert run_row(sessions, "r1").status == "running"


def test_run_finished_applied_twice_changes_nothing(sessions: sessionmaker[Session]) -> None:
    apply(sessions, queued("r1"), started("r1"), batch("r1", {"a": 1}), finished("r1"))
    before = dump(sessions)
    apply(sessions, finished("r1"))
    assert dump(sessions) == before
    assert run_row(sessions, "r1") == RunRow(
        id="r1",
        site="shop",
        region="eu",
        trigger="schedule",
        tick="t1",
        status="succeeded",
        queued_at=at(0),
        started_at=at(1),
        finished_at=at(3),
        worker="w-eu-1",
        stats=FINAL_STATS,
        error=None,
    )


def test_every_message_kind_is_idempotent(sessions: sessionmaker[Session]) -> None:
    messages: list[IngestMessage] = [
        queued("r1"),
        started("r1"),
        progress("r1", 1),
        batch("r1", {"a": 1}),
        finished("r1", "failed", error="boom"),
    ]
    for msg in messages:
        apply(sessions, msg)
        before = dump(sessions)
        apply(sessions, msg)
        assert dump(sessions) == before, msg.kind


def _mixed_messages(rng: random.Random) -> list[IngestMessage]:
    """Item batches of three runs over shared keys and URLs, out of time order,
    with duplicates, samples, bodies, NULs to clean and run messages between them."""
    messages: list[IngestMessage] = []
    for n in range(60):
        run = rng.choice(["r1", "r2", "r3"])
        roll = rng.random()
        if roll < 0.08:
            messages.append(started(run, minute=rng.randint(0, 9)))
            continue
        if roll < 0.12:
            messages.append(finished(run, minute=rng.randint(5, 9)))
            continue
        keys = rng.choices("abcdefg", k=rng.randint(1, 6))
        urls = rng.choices(["https://s.example/1", "https://s.example/2", "https://s.example/3"])
        messages.append(
            ItemBatch(
                run_id=run,
                site="shop",
                region=rng.choice(["eu", "us"]),
                seq=n,
                observed_at=at(rng.randint(0, 5)),
                items=[
                    ScrapedItem(
                        key=k,
                        url=f"https://s.example/p/{k}?{n}",
                        data={"k": k, "n\x00": rng.randint(0, 2)},
                        sample=rng.choice([0, 0, 1]),
                    )
                    for k in keys
                ],
                fetches=[
                    Fetch(
                        url=u,
                        status=200,
                        bytes=n,
                        sample=rng.choice([0, 1]),
                        body=rng.choice([None, "aGk="]),
                        headers=[("x", str(n))],
                    )
                    for u in urls
                ],
            )
        )
    return messages


def _rows_without_ids(sessions: sessionmaker[Session]) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows without surrogate ids, in id order where it is the crawl's
    order (fetches, observations...), else sorted (items: the writer sorts them)."""
    out = {}
    with sessions() as session:
        for t in Base.metadata.sorted_tables:
            stmt = select(*(c for c in t.c if c.name != "id"))
            if "id" in t.c and t.name != "items":
                out[t.name] = [tuple(r) for r in session.execute(stmt.order_by(t.c.id))]
            else:
                out[t.name] = sorted((tuple(r) for r in session.execute(stmt)), key=repr)
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_messages_applied_together_equal_one_by_one(
    sessions: sessionmaker[Session], seed: int
) -> None:
    """Ingest writes a group of messages in one go (item batches merged): the store
    must end exactly as with each message applied on its own."""
    messages = _mixed_messages(random.Random(seed))
    assert sum(isinstance(m, ItemBatch) for m in messages) > 40
    apply(sessions, *messages)
    one_by_one = _rows_without_ids(sessions)
    assert one_by_one["observations"] and one_by_one["item_samples"] and one_by_one["bodies"]
    with sessions.begin() as session:
        for table in reversed(Base.metadata.sorted_tables):
            session.execute(table.delete())
    with sessions.begin() as session:
        apply_messages(session, messages)
    assert _rows_without_ids(sessions) == one_by_one


# --- writer: ordering -------------------------------------------------------------


def test_status_never_goes_backwards(sessions: sessionmaker[Session]) -> None:
    apply(sessions, queued("r1"), started("r1"), finished("r1", "failed", error="HTTP 451"))
    # Late, out-of-order deliveries after the verdict.
    apply(sessions, started("r1"), progress("r1", 99), queued("r1"), batch("r1", {"a": 1}))
    # A second verdict does not replace the first.
    apply(sessions, finished("r1", "succeeded", minute=9, pages=7))
    row = run_row(sessions, "r1")
    assert (row.status, row.finished_at, row.error) == ("failed", at(3), "HTTP 451")
    assert row.stats == FINAL_STATS
    assert (row.queued_at, row.started_at, row.worker) == (at(0), at(1), "w-eu-1")


def test_statuses_added_later_count_as_final(sessions: sessionmaker[Session]) -> None:
    apply(sessions, queued("r1"))
    with sessions.begin() as session:  # e.g. a later "expired" / "dead" verdict
        session.execute(runs.update().where(runs.c.id == "r1").values(status="dead"))
    apply(sessions, started("r1"), progress("r1", 4), finished("r1"))
    row = run_row(sessions, "r1")
    assert (row.status, row.stats, row.finished_at) == ("dead", {}, None)


def test_progress_replaces_stats_while_running(sessions: sessionmaker[Session]) -> None:
    apply(sessions, queued("r1"))
    assert run_row(sessions, "r1").status == "queued"
    apply(sessions, progress("r1", 5))
    row = run_row(sessions, "r1")
    assert (row.status, row.stats["pages"]) == ("running", 5)
    apply(sessions, progress("r1", 8))
    assert run_row(sessions, "r1").stats == {
        "pages": 8,
        "items": 0,
        "errors": 0,
        "bytes": 0,
        "duration": 0.0,
        "status_codes": {},
        "peak_rss": 0,
        "dropped": 0,
        "rate_wait": 0.0,
        "rate_pauses": 0,
        "rate_strikes": 0,
    }


def test_finished_before_anything_else(sessions: sessionmaker[Session]) -> None:
    apply(sessions, finished("r1"))
    row = run_row(sessions, "r1")
    assert (row.status, row.trigger, row.queued_at, row.started_at) == (
        "succeeded",
        "unknown",
        None,
        None,
    )
    apply(sessions, started("r1"), queued("r1"))
    row = run_row(sessions, "r1")
    assert (row.status, row.trigger, row.tick, row.queued_at, row.started_at, row.worker) == (
        "succeeded",
        "schedule",
        "t1",
        at(0),
        at(1),
        "w-eu-1",
    )


def test_retried_job_keeps_the_latest_start(sessions: sessionmaker[Session]) -> None:
    first = started("r1", minute=1, worker="w-eu-1")
    retry = started("r1", minute=5, worker="w-eu-2")
    apply(sessions, retry, first)
    row = run_row(sessions, "r1")
    assert (row.started_at, row.worker) == (at(5), "w-eu-2")


def test_batch_before_run_queued(sessions: sessionmaker[Session]) -> None:
    apply(sessions, batch("r1", {"a": 1}))
    row = run_row(sessions, "r1")
    assert (row.status, row.site, row.region, row.trigger, row.queued_at, row.stats) == (
        "running",
        "shop",
        "eu",
        "unknown",
        None,
        {},
    )
    assert count(sessions, observations) == 1
    apply(sessions, queued("r1"), started("r1"), finished("r1"))
    assert run_row(sessions, "r1") == RunRow(
        id="r1",
        site="shop",
        region="eu",
        trigger="schedule",
        tick="t1",
        status="succeeded",
        queued_at=at(0),
        started_at=at(1),
        finished_at=at(3),
        worker="w-eu-1",
        stats=FINAL_STATS,
        error=None,
    )
    assert [(i.key, i.data, i.first_run_id) for i in item_rows(sessions)] == [
        ("a", {"sku": "a", "price": 1}, "r1")
    ]


def test_old_batch_redelivered_does_not_overwrite_newer_data(
    sessions: sessionmaker[Session],
) -> None:
    old = batch("r1", {"a": 10, "b": 20}, minute=2)
    new = batch("r2", {"a": 12}, minute=62)
    apply(sessions, old, new)
    expected = [
        ItemRow(
            site="shop",
            region="eu",
            key="a",
            url="https://shop.example/p/a",
            data={"sku": "a", "price": 12},
            first_run_id="r1",
            last_run_id="r2",
            first_seen_at=at(2),
            last_seen_at=at(62),
        ),
        ItemRow(
            site="shop",
            region="eu",
            key="b",
            url="https://shop.example/p/b",
            data={"sku": "b", "price": 20},
            first_run_id="r1",
            last_run_id="r1",
            first_seen_at=at(2),
            last_seen_at=at(2),
        ),
    ]
    assert item_rows(sessions) == expected
    before = dump(sessions)
    apply(sessions, old)
    assert dump(sessions) == before
    assert item_rows(sessions) == expected


def test_runs_applied_out_of_order_give_the_same_items(sessions: sessionmaker[Session]) -> None:
    # The newer run's batch lands first, then the older run's.
    apply(sessions, batch("r2", {"a": 12}, minute=62), batch("r1", {"a": 10, "b": 20}, minute=2))
    assert [(i.key, i.data["price"], i.first_run_id, i.last_run_id, i.first_seen_at,
             i.last_seen_at) for i in item_rows(sessions)] == [
        ("a", 12, "r1", "r2", at(2), at(62)),
        ("b", 20, "r1", "r1", at(2), at(2)),
    ]  # fmt: skip
    with sessions() as session:
        history = session.execute(
            select(observations.c.run_id, contents.c.data)
            .join(contents, contents.c.hash == observations.c.content_hash)
            .where(observations.c.key == "a")
            .order_by(observations.c.observed_at)
        ).all()
    assert [tuple(h) for h in history] == [
        ("r1", {"sku": "a", "price": 10}),
        ("r2", {"sku": "a", "price": 12}),
    ]


def _normalised_state(sessions: sessionmaker[Session], site: str) -> Any:
    """What a site's messages produced, without surrogate ids."""
    with sessions() as session:
        run_list = [
            (r.status, r.trigger, r.tick, r.queued_at, r.started_at, r.finished_at, r.worker,
             r.stats, r.error)
            for r in list_runs(session, site=site)
        ]  # fmt: skip
        item_list = [
            (i.region, i.key, i.data, i.first_run_id[-2:], i.last_run_id[-2:], i.first_seen_at,
             i.last_seen_at)
            for i in list_items(session, site)
        ]  # fmt: skip
        obs = sorted(
            (r.run_id[-2:], r.key, r.observed_at, r.data["price"])
            for r in session.execute(
                select(observations, contents.c.data)
                .join(contents, contents.c.hash == observations.c.content_hash)
                .where(observations.c.site == site)
            )
        )
        fetch_list = sorted(
            (r.run_id[-2:], r.url, r.status, r.bytes)
            for r in session.execute(
                select(fetches).join(runs, runs.c.id == fetches.c.run_id).where(runs.c.site == site)
            )
        )
    return run_list, item_list, obs, fetch_list


def test_final_state_does_not_depend_on_arrival_order(sessions: sessionmaker[Session]) -> None:
    def messages(site: str) -> list[IngestMessage]:
        r1, r2 = f"{site}-r1", f"{site}-r2"
        return [
            queued(r1, site),
            started(r1, site),
            progress(r1, 1, site),
            batch(r1, {"a": 10, "b": 20}, site=site, seq=0, minute=2, urls=("u1",)),
            batch(r1, {"c": 30}, site=site, seq=1, minute=2.5, urls=("u2", "u3")),
            finished(r1, site=site),
            queued(r2, site, minute=60),
            started(r2, site, minute=61, worker="w-eu-2"),
            batch(r2, {"a": 11, "c": 31}, site=site, minute=62, urls=("u1",)),
            finished(r2, "failed", site=site, minute=63, error="timeout"),
        ]

    orders = [messages("s0"), list(reversed(messages("s1")))]
    rng = random.Random(1234)
    for i in range(2, 6):
        shuffled = messages(f"s{i}")
        rng.shuffle(shuffled)
        orders.append(shuffled + shuffled[:3])  # with some duplicates too
    for msgs in orders:
        apply(sessions, *msgs)

    reference = _normalised_state(sessions, "s0")
    assert [r[0] for r in reference[0]] == ["failed", "succeeded"]
    assert [(i[1], i[2]["price"], i[3], i[4]) for i in reference[1]] == [
        ("a", 11, "r1", "r2"),
        ("b", 20, "r1", "r1"),
        ("c", 31, "r1", "r2"),
    ]
    assert len(reference[2]) == 5 and len(reference[3]) == 4
    for i in range(1, 6):
        assert _normalised_state(sessions, f"s{i}") == reference, f"order {i}"


def r1_batch(items: list[ScrapedItem], fetches: list[Fetch]) -> ItemBatch:
    """Run r1's first batch of shop in eu, at T0."""
    return ItemBatch(
        run_id="r1", site="shop", region="eu", seq=0, observed_at=T0, items=items, fetches=fetches
    )


def test_duplicate_keys_in_one_batch_keep_the_first(sessions: sessionmaker[Session]) -> None:
    msg = r1_batch(
        [
            ScrapedItem(key="a", url="https://x/1", data={"n": 1}),
            ScrapedItem(key="a", url="https://x/2", data={"n": 2}),
        ],
        [Fetch(url="https://x/1", status=200), Fetch(url="https://x/1", status=500)],
    )
    apply(sessions, msg)
    assert [(i.url, i.data) for i in item_rows(sessions)] == [("https://x/1", {"n": 1})]
    assert count(sessions, observations) == 1
    with sessions() as session:
        assert [f.status for f in list_fetches(session, "r1")] == [200]


def test_nul_and_lone_surrogates_are_stored_as_replacement_chars(
    sessions: sessionmaker[Session],
) -> None:
    msg = r1_batch(
        [ScrapedItem(key="k\x00", url="https://x/", data={"t\x00": ["a\x00b", "c\ud800"]})],
        [Fetch(url="https://x/", status=None, error="reset\x00")],
    )
    apply(sessions, msg)
    apply(sessions, msg)
    (item,) = item_rows(sessions)
    assert (item.key, item.data) == ("k\ufffd", {"t\ufffd": ["a\ufffdb", "c\ufffd"]})
    with sessions() as session:
        assert [f.error for f in list_fetches(session, "r1")] == ["reset\ufffd"]


@pytest.mark.parametrize(
    "value", ["plain", "a\x00b", "c\ud800", "\U0001f600 pair", "a literal \\u0000", "\u00e9"]
)
@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_cleaned_from_the_body_equals_cleaning_the_message(value: str, ensure_ascii: bool) -> None:
    # Ingest passes the JSON a message was parsed from, which says more cheaply
    # whether it needs cleaning; the result must be the same either way.
    msg = r1_batch(
        [ScrapedItem(key=f"k{value}", url="https://x/", data={value: [value]})],
        [Fetch(url="https://x/", status=None, error=value)],
    )
    as_json = json.dumps(dump_message(msg), ensure_ascii=ensure_ascii)
    body = as_json.encode("utf-8", "surrogatepass")  # a lone surrogate's raw bytes, too
    try:
        parsed = parse_ingest(body)
    except MessageError:
        parsed = msg  # not JSON that parses (a lone surrogate): ingest decodes it first
    assert isinstance(parsed, ItemBatch)
    expected = cleaned(parsed).model_dump()
    assert cleaned(parsed, body).model_dump() == expected
    # py-amqp hands ingest a UTF-8 body as text
    assert cleaned(parsed, as_json).model_dump() == expected
    if "\x00" in value or "\ud800" in value:
        assert "\ufffd" in repr(expected)


def test_timestamps_come_back_aware_utc(sessions: sessionmaker[Session]) -> None:
    berlin = datetime(2024, 5, 1, 14, 0, tzinfo=UTC).astimezone(
        __import__("zoneinfo").ZoneInfo("Europe/Berlin")
    )
    apply(sessions, RunStarted(run_id="r1", site="s", region="eu", worker="w", started_at=berlin))
    started_at = run_row(sessions, "r1").started_at
    assert started_at == datetime(2024, 5, 1, 14, 0, tzinfo=UTC)
    assert started_at is not None and started_at.utcoffset() == timedelta(0)


def test_record_bad_message(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        record_bad_message(session, '{"kind": "nope"\x00}', "not valid", T0)
    assert [r[1:] for r in dump(sessions)["bad_messages"]] == [
        (T0, '{"kind": "nope"\ufffd}', "not valid")
    ]


# --- queries ------------------------------------------------------------------


def test_queries(sessions: sessionmaker[Session]) -> None:
    apply(
        sessions,
        queued("r1", "shop", "eu", minute=0),
        started("r1", "shop", "eu"),
        batch(
            "r1", {"b": 2, "a": 1}, site="shop", region="eu", urls=("https://s/2", "https://s/1")
        ),
        finished("r1", site="shop", region="eu"),
        queued("r2", "shop", "us", minute=10),
        batch("r2", {"a": 5}, site="shop", region="us", minute=12, urls=("https://s/1",)),
        queued("r3", "docs", "eu", minute=20),
        finished("r4", "failed", "shop", "asia", minute=30, error="HTTP 451"),
    )
    with sessions() as session:
        assert [r.id for r in list_runs(session)] == ["r4", "r3", "r2", "r1"]
        assert [r.id for r in list_runs(session, limit=2)] == ["r4", "r3"]
        assert [r.id for r in list_runs(session, site="shop")] == ["r4", "r2", "r1"]
        assert [r.id for r in list_runs(session, site="shop", region="eu")] == ["r1"]
        assert [r.id for r in list_runs(session, status="running")] == ["r2"]
        assert [r.id for r in list_runs(session, status="queued")] == ["r3"]
        assert list_runs(session, site="nope") == []
        (r4,) = list_runs(session, status="failed")
        assert (r4.id, r4.error, r4.stats, r4.region) == ("r4", "HTTP 451", FINAL_STATS, "asia")

        assert [r.id for r in get_runs(session, ["r3", "missing", "r1", "r3"])] == ["r3", "r1"]
        assert get_runs(session, []) == []

        assert [(i.region, i.key, i.data["price"]) for i in list_items(session, "shop")] == [
            ("eu", "a", 1),
            ("eu", "b", 2),
            ("us", "a", 5),
        ]
        assert [i.key for i in list_items(session, "shop", region="us")] == ["a"]
        assert list_items(session, "docs") == []

        assert [(f.url, f.bytes) for f in list_fetches(session, "r1")] == [
            ("https://s/2", 1000),
            ("https://s/1", 1001),
        ]
        assert list_fetches(session, "r3") == []


def test_a_cancelled_run_keeps_the_later_cancel_verdicts_stats(
    sessions: sessionmaker[Session],
) -> None:
    """The CLI's cancel and the worker's abort may reach ingest in either order:
    the run is cancelled once, with the stats of the later verdict."""
    cli = cancelled_run("r1", "shop", "eu", "by the CLI", at=at(3))
    worker = cancelled_run(
        "r1", "shop", "eu", "aborted", stats=RunStats(pages=7, items=5), at=at(4)
    )
    for order in ((cli, worker), (worker, cli)):
        with sessions.begin() as session:
            session.execute(runs.delete())
        apply(sessions, queued("r1"), started("r1"), *order, finished("r1", minute=5))
        with sessions() as session:
            row = session.execute(select(runs).where(runs.c.id == "r1")).mappings().one()
        assert row["status"] == "cancelled"
        assert row["stats"]["pages"] == 7 and row["stats"]["items"] == 5
        assert row["error"] == order[0].error  # the first verdict's reason stays
