"""The central ingest consumer against a real RabbitMQ vhost and real databases."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from kombu import Connection

from regions.app import job_publisher
from regions.bus import INGEST_EXCHANGE, INGEST_QUEUE, INGEST_ROUTING_KEY, connect, publish_ingest
from regions.messages import (
    Fetch,
    ItemBatch,
    Job,
    RunFinished,
    RunQueued,
    RunStarted,
    RunStats,
    ScrapedItem,
    dump,
)
from scheduler.loader import parse_config
from storage.db import make_engine, session_factory
from storage.ingest import GC_THRESHOLDS, run_ingest, tune_gc
from storage.migrate import ensure_schema
from storage.models import BadMessage, Observation
from storage.queries import FetchRow, ItemRow, RunRow, get_runs, list_fetches, list_items

PG_ADMIN_DSN = os.environ.get(
    "GEOSCRAPE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
DEADLINE = 60.0


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def ingest_queue_depth(broker_url: str) -> int:
    with Connection(broker_url) as conn:
        declared = conn.default_channel.queue_declare(queue=INGEST_QUEUE.name, passive=True)
        return int(declared.message_count)


@pytest.fixture
def broker(broker_url: str) -> str:
    """The session's vhost, with an empty ingest queue."""
    with Connection(broker_url) as conn:
        queue = INGEST_QUEUE(conn.default_channel)
        queue.declare()
        queue.purge()
    return broker_url


class IngestThread:
    def __init__(self, broker_url: str, db_url: str) -> None:
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(broker_url, db_url), daemon=True)

    def _run(self, broker_url: str, db_url: str) -> None:
        try:
            run_ingest(
                broker_url,
                db_url,
                publish_job=job_publisher(broker_url),
                should_stop=self.stop.is_set,
                ready=self.ready,
            )
        except BaseException as exc:
            self.errors.append(exc)
            self.ready.set()

    def __enter__(self) -> IngestThread:
        self.thread.start()
        assert self.ready.wait(DEADLINE), "ingest never became ready"
        assert self.errors == []
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive(), "ingest did not stop"
        assert self.errors == []


def publish(broker_url: str, *bodies: dict[str, Any]) -> None:
    with connect(broker_url) as conn:
        for body in bodies:
            publish_ingest(conn, body)


def publish_raw(broker_url: str, body: str | bytes, content_type: str) -> None:
    with connect(broker_url) as conn:
        producer = conn.Producer()
        producer.publish(
            body,
            exchange=INGEST_EXCHANGE,
            routing_key=INGEST_ROUTING_KEY,
            content_type=content_type,
            content_encoding="utf-8" if isinstance(body, str) else "binary",
            delivery_mode=2,
            declare=[INGEST_QUEUE],
        )


class Store:
    def __init__(self, db_url: str) -> None:
        self.engine = make_engine(db_url)
        self.sessions = session_factory(self.engine)

    def run(self, run_id: str) -> RunRow | None:
        with self.sessions() as s:
            found = get_runs(s, [run_id])
            return found[0] if found else None

    def items(self, site: str) -> list[ItemRow]:
        with self.sessions() as s:
            return list_items(s, site)

    def fetches(self, run_id: str) -> list[FetchRow]:
        with self.sessions() as s:
            return list_fetches(s, run_id)

    def observations(self) -> list[tuple[str, str, dict[str, Any]]]:
        with self.sessions() as s:
            rows = s.query(Observation).order_by(Observation.run_id, Observation.key).all()
            return [(o.run_id, o.key, o.data) for o in rows]

    def bad(self) -> list[tuple[str, str]]:
        with self.sessions() as s:
            return [(b.body, b.error) for b in s.query(BadMessage).order_by(BadMessage.id)]


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    st = Store(db_url)
    yield st
    st.engine.dispose()


STATS = RunStats(pages=2, items=3, bytes=3000, duration=4.5, status_codes={"200": 2})


def run_messages(run_id: str) -> tuple[dict[str, Any], ...]:
    return (
        dump(
            RunQueued(
                run_id=run_id, site="shop", region="eu", trigger="manual", tick=None,
                queued_at=at(0),
            )
        ),
        dump(
            RunStarted(run_id=run_id, site="shop", region="eu", worker="w-eu-1", started_at=at(1))
        ),
        dump(
            ItemBatch(
                run_id=run_id, site="shop", region="eu", seq=0, observed_at=at(2),
                items=[
                    ScrapedItem(key="a", url="https://shop.example/a", data={"price": 10}),
                    ScrapedItem(key="b", url="https://shop.example/b", data={"price": 20}),
                ],
                fetches=[Fetch(url="https://shop.example/", status=200, bytes=1200)],
            )
        ),
        dump(
            ItemBatch(
                run_id=run_id, site="shop", region="eu", seq=1, observed_at=at(3),
                items=[ScrapedItem(key="c", url="https://shop.example/c", data={"price": 30})],
                fetches=[
                    Fetch(url="https://shop.example/2", status=200, bytes=1800),
                    Fetch(url="https://shop.example/gone", status=None, error="refused"),
                ],
            )
        ),
        dump(
            RunFinished(
                run_id=run_id, site="shop", region="eu", status="succeeded",
                finished_at=at(4), stats=STATS,
            )
        ),
    )  # fmt: skip


def assert_run_stored(store: Store, run_id: str) -> None:
    assert store.run(run_id) == RunRow(
        id=run_id,
        site="shop",
        region="eu",
        trigger="manual",
        tick=None,
        status="succeeded",
        queued_at=at(0),
        started_at=at(1),
        finished_at=at(4),
        worker="w-eu-1",
        stats=STATS.model_dump(mode="json"),
        error=None,
    )
    assert [
        (i.key, i.url, i.data, i.first_run_id, i.last_seen_at) for i in store.items("shop")
    ] == [
        ("a", "https://shop.example/a", {"price": 10}, run_id, at(2)),
        ("b", "https://shop.example/b", {"price": 20}, run_id, at(2)),
        ("c", "https://shop.example/c", {"price": 30}, run_id, at(3)),
    ]
    assert store.observations() == [
        (run_id, "a", {"price": 10}),
        (run_id, "b", {"price": 20}),
        (run_id, "c", {"price": 30}),
    ]
    assert store.fetches(run_id) == [
        FetchRow(
            run_id=run_id,
            region="eu",
            url="https://shop.example/",
            status=200,
            bytes=1200,
            error=None,
            final_url=None,
            fetched_at=at(2),
        ),
        FetchRow(
            run_id=run_id,
            region="eu",
            url="https://shop.example/2",
            status=200,
            bytes=1800,
            error=None,
            final_url=None,
            fetched_at=at(3),
        ),
        FetchRow(
            run_id=run_id,
            region="eu",
            url="https://shop.example/gone",
            status=None,
            bytes=0,
            error="refused",
            final_url=None,
            fetched_at=at(3),
        ),
    ]


def test_ingest_stores_messages_once_and_keeps_bad_ones(
    broker: str, db_url: str, store: Store
) -> None:
    queued, started, batch0, batch1, finished = run_messages("r1")
    # Some messages wait on the queue before ingest starts (batch before RunQueued).
    publish(broker, batch0, queued)
    publish_raw(broker, "{not json", "application/json")
    with IngestThread(broker, db_url):
        publish(broker, started, batch0, batch1)  # batch0 a second time
        publish_raw(broker, '{"kind": "items", "run_id": "r1"}', "application/json")
        publish_raw(broker, b"\x80\x04K\x01.", "application/x-python-serialize")
        publish(broker, finished, batch1)  # batch1 a second time, after the verdict

        def done() -> bool:
            run = store.run("r1")
            return run is not None and run.status == "succeeded" and len(store.bad()) == 3

        wait_for("the run to be stored", done)
        wait_for("the ingest queue to drain", lambda: ingest_queue_depth(broker) == 0)

    assert_run_stored(store, "r1")
    bad = store.bad()
    assert [body for body, _ in bad] == [
        "{not json",
        '{"kind": "items", "run_id": "r1"}',
        "\\x80\x04K\x01.",  # invalid UTF-8 escaped, the rest kept
    ]
    assert bad[0][1].startswith("cannot decode (content-type 'application/json')")
    assert bad[1][1].startswith("not a valid ingest message:")
    assert "site" in bad[1][1] and "observed_at" in bad[1][1]
    assert bad[2][1].startswith("cannot decode (content-type 'application/x-python-serialize')")
    # Nothing left unacked: once the consumer is gone, the queue is still empty.
    assert ingest_queue_depth(broker) == 0


def reject_url_in_database(db_url: str, url: str) -> None:
    """Install a trigger that makes the database itself refuse fetches of `url`."""
    ensure_schema(db_url)
    engine = make_engine(db_url)
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER poison BEFORE INSERT ON fetches "
                f"WHEN NEW.url = '{url}' BEGIN SELECT RAISE(ABORT, 'poison row'); END"
            )
        else:
            conn.exec_driver_sql(
                "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN "
                f"IF NEW.url = '{url}' THEN RAISE EXCEPTION 'poison row'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER poison BEFORE INSERT ON fetches "
                "FOR EACH ROW EXECUTE FUNCTION poison()"
            )
    engine.dispose()


def test_message_the_database_rejects_does_not_block_the_others(
    broker: str, db_url: str, store: Store
) -> None:
    # Valid JSON and a valid message, but the database refuses to store it.
    reject_url_in_database(db_url, "https://x/poison")
    poison = dump(
        ItemBatch(
            run_id="p1", site="poison", region="eu", seq=0, observed_at=at(0),
            fetches=[Fetch(url="https://x/poison", status=200, bytes=1)],
        )
    )  # fmt: skip
    publish(broker, poison, *run_messages("r2"))
    with IngestThread(broker, db_url):
        wait_for(
            "the good run and the quarantined poison message",
            lambda: (
                (run := store.run("r2")) is not None
                and run.status == "succeeded"
                and len(store.bad()) == 1
            ),
        )
        wait_for("the ingest queue to drain", lambda: ingest_queue_depth(broker) == 0)
    assert_run_stored(store, "r2")
    ((body, error),) = store.bad()
    assert '"run_id":"p1"' in body.replace(" ", "")
    assert error.startswith("rejected by the database:")
    assert ingest_queue_depth(broker) == 0


@pytest.fixture
def pg_db(pg_url: str) -> Iterator[tuple[str, str]]:
    """A fresh PostgreSQL database: (sqlalchemy url, name)."""
    name = f"{pg_url.rsplit('/', 1)[1]}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{pg_url.rsplit('/', 1)[0]}/{name}", name
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def set_db_available(name: str, available: bool) -> None:
    """Open or close a database to every connection (closing kills the existing ones)."""
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(available).lower()}')
        if not available:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )


def test_database_outage_loses_nothing(
    broker: str, pg_db: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    url, name = pg_db
    caplog.set_level(logging.WARNING, logger="geoscrape.ingest")
    with IngestThread(broker, url):
        set_db_available(name, False)
        try:
            publish(broker, *run_messages("r3"))
            wait_for(
                "ingest to report the outage",
                lambda: any("database unavailable" in r.getMessage() for r in caplog.records),
            )
            # Held unacked by ingest, not dropped: nothing is ready on the queue...
            assert ingest_queue_depth(broker) == 0
            time.sleep(1.0)  # ...and it keeps retrying through the outage.
        finally:
            set_db_available(name, True)
        store = Store(url)
        try:
            wait_for(
                "the run after the outage",
                lambda: (run := store.run("r3")) is not None and run.status == "succeeded",
            )
            assert_run_stored(store, "r3")
            assert store.bad() == []
        finally:
            store.engine.dispose()
    assert ingest_queue_depth(broker) == 0
    warnings = [r.getMessage() for r in caplog.records if "database unavailable" in r.getMessage()]
    assert all("\n" not in w for w in warnings)


def test_ingest_reconnects_after_broker_connection_loss(
    broker: str, sqlite_url: str, session_id: str
) -> None:
    import subprocess

    queued, started, batch0, batch1, finished = run_messages("r4")
    store = Store(sqlite_url)
    try:
        with IngestThread(broker, sqlite_url):
            publish(broker, queued, started, batch0)
            wait_for("the first batch", lambda: len(store.observations()) == 2)
            vhost = broker.rsplit("/", 1)[1]
            done = subprocess.run(
                ["rabbitmqctl", "close_all_connections", "-p", vhost, "test: broker loss"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            publish(broker, batch1, finished)
            wait_for(
                "the rest of the run after reconnecting",
                lambda: (run := store.run("r4")) is not None and run.status == "succeeded",
            )
        assert_run_stored(store, "r4")
        assert store.bad() == []
    finally:
        store.engine.dispose()
    assert ingest_queue_depth(broker) == 0


def queue_counts(broker_url: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages of the ingest queue, as the broker counts them."""
    import subprocess

    vhost = broker_url.rsplit("/", 1)[1]
    columns = ["name", "messages_ready", "messages_unacknowledged"]
    done = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "-p", vhost, *columns],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == INGEST_QUEUE.name:
            return int(parts[1]), int(parts[2])
    return 0, 0


@contextlib.contextmanager
def gated(name: str, table: str) -> Iterator[tuple[psycopg.Connection[Any], Callable[[], bool]]]:
    """Make every insert into `table` of database `name` wait while the gate is closed.

    Yields the gate's connection (``SELECT pg_advisory_unlock(4242)`` opens it)
    and a predicate: an insert is waiting at the gate.
    """
    with psycopg.connect(f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}", autocommit=True) as gate:
        gate.execute(
            "CREATE OR REPLACE FUNCTION gate() RETURNS trigger AS $$ BEGIN "
            "PERFORM pg_advisory_xact_lock_shared(4242); RETURN NULL; END $$ LANGUAGE plpgsql"
        )
        gate.execute(
            f"CREATE TRIGGER gate BEFORE INSERT ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION gate()"
        )
        gate.execute("SELECT pg_advisory_lock(4242)")

        def waiting() -> bool:
            return one_backend(name, "wait_event_type = 'Lock' AND wait_event = 'advisory'")

        yield gate, waiting


def one_backend(name: str, condition: str) -> bool:
    """Exactly one connection to database `name` is in the state `condition` says."""
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        row = admin.execute(
            f"SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND {condition}",
            (name,),
        ).fetchone()
        return row is not None and row[0] == 1


@pytest.fixture
def pg_store(pg_db: tuple[str, str]) -> Iterator[tuple[str, str, Store]]:
    """A fresh PostgreSQL database at the schema's head: (url, name, Store)."""
    url, name = pg_db
    ensure_schema(url)
    store = Store(url)
    yield url, name, store
    store.engine.dispose()


def test_writer_thread_acks_only_after_commit_and_a_stop_leaves_the_rest_unacked(
    broker: str, pg_db: tuple[str, str]
) -> None:
    url, name = pg_db
    ensure_schema(url)
    # The writer thread's transaction stays open, uncommitted, for as long as we like.
    with gated(name, "observations") as (gate, writer_waits):
        queued, started, batch0, _, _ = run_messages("a1")
        # A full group (GROUP_SIZE messages) of another run, behind the blocked one.
        later = [
            dump(
                ItemBatch(
                    run_id="b1", site="shop", region="eu", seq=n, observed_at=at(5),
                    items=[ScrapedItem(key=f"k{n}", url="https://shop.example/k", data={"n": n})],
                )
            )
            for n in range(100)
        ]  # fmt: skip
        store = Store(url)
        ingest = IngestThread(broker, url)
        try:
            with ingest:
                # The run first (no observations, so past the gate), however it is grouped.
                publish(broker, queued, started)
                wait_for("the run", lambda: getattr(store.run("a1"), "status", None) == "running")
                wait_for("its acks", lambda: queue_counts(broker) == (0, 0))
                publish(broker, batch0)
                wait_for("the writer to wait inside its transaction", writer_waits)
                # Received, not committed: held unacked.
                assert queue_counts(broker) == (0, 1)
                publish(broker, *later)
                wait_for("ingest to receive the rest", lambda: queue_counts(broker) == (0, 101))
                ingest.stop.set()
                gate.execute("SELECT pg_advisory_unlock(4242)")
            # The first group committed (and was acked); the one handed to the writer
            # behind it was not written, and is back on the queue.
            assert [o[1] for o in store.observations()] == ["a", "b"]
            run = store.run("a1")
            assert run is not None and run.status == "running"
            wait_for("the rest to be back on the queue", lambda: queue_counts(broker) == (100, 0))
        finally:
            store.engine.dispose()


def test_items_commit_on_their_own_connection_first_and_the_group_is_acked_after_both(
    broker: str, pg_store: tuple[str, str, Store]
) -> None:
    url, name, store = pg_store
    queued, started, batch0, batch1, finished = run_messages("i1")

    def rest_waits_for_items() -> bool:
        # The rest of a group is written and its transaction waits, uncommitted.
        return one_backend(name, "state = 'idle in transaction'")

    with IngestThread(broker, url):
        publish(broker, queued, started, batch0)
        wait_for("the first batch", lambda: len(store.items("shop")) == 2)
        with gated(name, "items") as (gate, items_wait):
            # However the broker groups these two, the run's end waits for c's item.
            publish(broker, batch1, finished)
            wait_for("the items insert to wait", items_wait)
            wait_for("the rest of its group to wait for the items", rest_waits_for_items)
            assert [o[1] for o in store.observations()] == ["a", "b"]
            run = store.run("i1")
            assert run is not None and run.status == "running"
            ready, unacked = queue_counts(broker)
            assert ready + unacked == 2 and unacked >= 1
            gate.execute("SELECT pg_advisory_unlock(4242)")
            wait_for("the items", lambda: len(store.items("shop")) == 3)
            wait_for("the acks", lambda: queue_counts(broker) == (0, 0))
    assert [o[1] for o in store.observations()] == ["a", "b", "c"]
    run = store.run("i1")
    assert run is not None and run.status == "succeeded"
    assert store.bad() == []


COVERED_SITE = """\
regions:
  eu: {}
sites:
  - name: shop
    start_urls: ["https://shop.example/"]
    regions: [eu]
    extract:
      fields:
        price: {css: ".price::text", type: price}
    expect: {coverage: {price: 90%}}
"""


def test_a_verdict_waits_for_the_contents_committed_on_the_other_connection(
    broker: str, pg_store: tuple[str, str, Store]
) -> None:
    # The contents go with the items, on the second connection; a RunFinished
    # checking `expect: coverage` joins the run's observations with their contents,
    # so it must see them: had it been applied first, it would find 0 of 0 items
    # with a price and degrade the run.
    url, name, store = pg_store
    site = parse_config(COVERED_SITE, "sites.yaml", env={}).resolved_site("shop")
    queued, started, batch0, batch1, finished = run_messages("v1")
    queued = dump(
        RunQueued(
            run_id="v1", site="shop", region="eu", trigger="manual", tick=None,
            queued_at=at(0), job=Job(run_id="v1", site="shop", region="eu", config=site),
        )
    )  # fmt: skip

    def main_waits_for_the_side() -> bool:
        return one_backend(name, "state = 'idle in transaction'")

    with IngestThread(broker, url):
        publish(broker, queued, started)
        wait_for("the run", lambda: getattr(store.run("v1"), "status", None) == "running")
        with gated(name, "contents") as (gate, contents_wait):
            # However the broker groups these, the verdict waits for the contents.
            publish(broker, batch0, batch1, finished)
            wait_for("the contents insert to wait", contents_wait)
            wait_for("the rest of the group to wait for it", main_waits_for_the_side)
            assert store.observations() == []
            run = store.run("v1")
            assert run is not None and run.status == "running"
            gate.execute("SELECT pg_advisory_unlock(4242)")
            wait_for("the acks", lambda: queue_counts(broker) == (0, 0))
    run = store.run("v1")
    assert run is not None
    assert run.status == "succeeded", run.error
    assert [o[1] for o in store.observations()] == ["a", "b", "c"]
    assert len(store.items("shop")) == 3
    assert store.bad() == []


def test_nul_characters_from_the_broker_are_stored_as_replacement_chars(
    broker: str, pg_store: tuple[str, str, Store]
) -> None:
    # Ingest decides from the body's JSON text whether a message needs cleaning
    # (storage.writer.cleaned); PostgreSQL refuses a NUL it would let through.
    url, _, store = pg_store
    batch = dump(
        ItemBatch(
            run_id="n1", site="shop", region="eu", seq=0, observed_at=at(2),
            items=[ScrapedItem(key="k\x00", url="https://shop.example/", data={"t\x00": "a\x00b"})],
            fetches=[Fetch(url="https://shop.example/", status=None, error="reset\x00")],
        )
    )  # fmt: skip
    with IngestThread(broker, url):
        publish(broker, batch)
        wait_for("the batch", lambda: len(store.observations()) == 1)
    assert store.observations() == [("n1", "k\ufffd", {"t\ufffd": "a\ufffdb"})]
    assert [f.error for f in store.fetches("n1")] == ["reset\ufffd"]
    assert store.bad() == []


def test_tune_gc_makes_the_ingest_process_collect_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > before[0]  # fewer young collections than the default
    finally:
        gc.set_threshold(*before)


def test_extra_samples_name_contents_the_other_connection_commits(
    broker: str, pg_store: tuple[str, str, Store]
) -> None:
    """An extra sample's row names its content by a foreign key (an observation's
    does not): its insert must not run ahead of the contents on the other
    connection, even when that connection is slow."""
    from storage.models import Content, ItemSample

    url, name, store = pg_store
    queued, started, _, _, _ = run_messages("s1")
    sampled = dump(
        ItemBatch(
            run_id="s1", site="shop", region="eu", seq=0, observed_at=at(2),
            items=[
                ScrapedItem(key="a", url="https://shop.example/a", data={"price": 10}),
                ScrapedItem(key="a", url="https://shop.example/a", data={"price": 12}, sample=1),
            ],
        )
    )  # fmt: skip
    finished = dump(
        RunFinished(
            run_id="s1", site="shop", region="eu", status="succeeded", finished_at=at(4),
            stats=STATS,
        )
    )  # fmt: skip
    with IngestThread(broker, url):
        publish(broker, queued, started)
        wait_for("the run", lambda: getattr(store.run("s1"), "status", None) == "running")
        with gated(name, "contents") as (gate, contents_wait):
            publish(broker, sampled, finished)
            wait_for("the contents insert to wait", contents_wait)
            wait_for(
                "the rest of the group to wait for it",
                lambda: one_backend(name, "state = 'idle in transaction'"),
            )
            gate.execute("SELECT pg_advisory_unlock(4242)")
            wait_for("the acks", lambda: queue_counts(broker) == (0, 0))
    assert store.bad() == []
    run = store.run("s1")
    assert run is not None and run.status == "succeeded", run
    with store.sessions() as s:
        samples = [
            (row.sample, row.key, content.data)
            for row, content in s.query(ItemSample, Content).join(
                Content, Content.hash == ItemSample.content_hash
            )
        ]
    assert samples == [(1, "a", {"price": 12})]
