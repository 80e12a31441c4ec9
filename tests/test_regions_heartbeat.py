"""Worker heartbeats in the store: idempotent, order-independent; the status queries."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select

from regions.heartbeat import egress_address, worker_name
from regions.messages import RunFinished, RunQueued, RunStats, WorkerHeartbeat, parse_ingest
from storage.db import make_engine, session_factory
from storage.migrate import ensure_schema
from storage.models import Worker, workers
from storage.queries import last_runs, live_workers
from storage.writer import apply_message

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def beat(sent: float, *, started: float = 0, stopping: bool = False, egress: str = "10.0.0.2"):
    return WorkerHeartbeat(
        name="eu@h:7", region="eu", host="h", pid=7, egress=egress,
        started_at=at(started), sent_at=at(sent), stopping=stopping,
    )  # fmt: skip


def row(db_url: str) -> tuple:
    with session_factory(make_engine(db_url))() as session:
        w = session.scalars(select(Worker)).one()
        return (w.started_at, w.last_seen_at, w.stopped_at, w.egress)


def test_heartbeats_give_the_same_row_in_any_order_and_any_number_of_times(db_url: str) -> None:
    ensure_schema(db_url)
    factory = session_factory(make_engine(db_url))
    # Incarnation 1 beats, changes egress, stops; incarnation 2 (same name after a
    # container restart) starts later. Stale heartbeats of 1 must not resurrect it.
    messages = [
        beat(10),
        beat(20, egress="10.0.0.9"),
        beat(25, stopping=True, egress="10.0.0.9"),
        beat(100, started=90),
    ]
    want = (at(90), at(100), None, "10.0.0.2")
    for order in itertools.permutations(messages):
        with factory.begin() as session:
            session.execute(delete(workers))
        for message in [*order, order[0]]:  # and one redelivery
            with factory.begin() as session:
                apply_message(session, message)
        assert row(db_url) == want, order
    # Within one incarnation: the latest egress, the stop time once stopped.
    with factory.begin() as session:
        session.execute(delete(workers))
    for message in reversed(messages[:3]):
        with factory.begin() as session:
            apply_message(session, message)
    assert row(db_url) == (at(0), at(25), at(25), "10.0.0.9")


def test_live_workers_and_last_runs(db_url: str) -> None:
    ensure_schema(db_url)
    factory = session_factory(make_engine(db_url))
    with factory.begin() as session:
        apply_message(session, beat(100))
        apply_message(session, beat(100, stopping=True).model_copy(update={"name": "eu@h:8"}))
        apply_message(session, beat(10).model_copy(update={"name": "us@old:1", "region": "us"}))
        for n, (site, region, status) in enumerate(
            [
                ("a", "eu", "failed"),
                ("a", "eu", "succeeded"),
                ("a", "us", "queued"),
                ("b", "eu", "succeeded"),
            ]
        ):
            run = f"r{n}"
            apply_message(session, RunQueued(run_id=run, site=site, region=region, queued_at=at(n)))
            if status != "queued":
                apply_message(session, RunFinished(
                    run_id=run, site=site, region=region, status=status,
                    finished_at=at(n + 1), stats=RunStats(),
                ))  # fmt: skip
    with factory() as session:
        live = live_workers(session, seen_since=at(70))
        latest = last_runs(session)
    assert [w.name for w in live] == ["eu@h:7"]  # not the stopped one, not the silent one
    assert [(r.region, r.site, r.id, r.status) for r in latest] == [
        ("eu", "a", "r1", "succeeded"),
        ("eu", "b", "r3", "succeeded"),
        ("us", "a", "r2", "queued"),
    ]


def test_heartbeat_message_round_trip_and_helpers() -> None:
    message = beat(5, stopping=True)
    assert parse_ingest(message.model_dump_json()) == message
    assert worker_name("eu", "host", 42) == "eu@host:42"
    assert egress_address("amqp://u:p@127.0.0.1:5672//") == "127.0.0.1"
    assert egress_address("amqp://u:p@no-such-host.invalid//") is None
