"""The `scrape.dead` consumer inside `geoscrape ingest`, with real RabbitMQ dead-lettering."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from kombu import Connection
from sqlalchemy import select

from regions.app import CRAWL_TASK, make_app
from regions.bus import connect, declare_topology, scrape_queue
from regions.messages import Job, dump, utcnow
from scheduler.dispatch import publish_jobs
from scheduler.loader import parse_config
from storage.deadletter import DeadLetter, apply_dead_letter
from storage.models import BadMessage, DeadJob, Run
from tests.harness import Stack, stack, wait_until

CONFIG = """\
regions:
  eu: {}
  us: {}
sites:
  - name: shop
    start_urls: ["http://127.0.0.1:9/"]
    regions: [eu, us]
    extract: {fields: {title: {css: "title::text"}}}
"""


def job(region: str, **fields: object) -> Job:
    return Job(
        run_id=f"run-{region}-{time.monotonic_ns()}",
        site="shop",
        region=region,
        trigger="schedule",
        tick="shop@2024-01-01T00:00:00Z",
        config=parse_config(CONFIG).resolved_site("shop"),
        **fields,
    )


def run_of(s: Stack, run_id: str) -> Run | None:
    with s.sessions()() as session:
        return session.get(Run, run_id)


def dead_of(s: Stack, run_id: str) -> DeadJob | None:
    with s.sessions()() as session:
        return session.get(DeadJob, run_id)


@pytest.mark.slow
def test_an_expired_job_becomes_an_expired_run_and_is_not_kept(
    tmp_path: Path, vhost_url: str, sqlite_url: str
) -> None:
    with stack(tmp_path, vhost_url, sqlite_url, CONFIG) as s:
        s.ingest()
        wait_until(lambda: "consuming" in s.log("ingest"), what="ingest to start")
        expiring = job("us", expires_at=utcnow() + timedelta(seconds=1))
        publish_jobs([expiring], vhost_url)
        run = wait_until(
            lambda: (r := run_of(s, expiring.run_id)) is not None and r.status == "expired" and r,
            timeout=30,
            what="the run to expire",
        )
        assert run.error == (
            "expired: no worker in region 'us' started it before "
            f"{expiring.expires_at.isoformat().replace('+00:00', 'Z')}"  # type: ignore[union-attr]
        )
        assert run.tick == "shop@2024-01-01T00:00:00Z"
        assert run.trigger == "schedule"
        assert dead_of(s, expiring.run_id) is None
        with Connection(vhost_url) as conn:
            channel = conn.default_channel
            assert channel.queue_declare("scrape.us", passive=True).message_count == 0
            assert channel.queue_declare("scrape.dead", passive=True).message_count == 0


@pytest.mark.slow
def test_a_rejected_job_is_kept_in_dead_jobs_and_its_run_marked_dead(
    tmp_path: Path, vhost_url: str, sqlite_url: str
) -> None:
    with stack(tmp_path, vhost_url, sqlite_url, CONFIG) as s:
        poison = job("eu")
        publish_jobs([poison], vhost_url)
        with Connection(vhost_url) as conn:
            message = conn.default_channel.basic_get("scrape.eu")
            assert message is not None
            conn.default_channel.basic_reject(message.delivery_tag, requeue=False)
        s.ingest()
        wait_until(lambda: "consuming" in s.log("ingest"), what="ingest to start")
        run = wait_until(
            lambda: (r := run_of(s, poison.run_id)) is not None and r.status == "dead" and r,
            timeout=30,
            what="the run to be marked dead",
        )
        assert run.error == "dead-lettered from scrape.eu (rejected, 1 time)"
        dead = dead_of(s, poison.run_id)
        assert dead is not None
        assert (dead.site, dead.region, dead.reason, dead.attempts) == ("shop", "eu", "rejected", 1)
        assert dead.job == dump(poison)
        assert dead.requeued_at is None


@pytest.mark.slow
def test_a_worker_does_not_run_a_job_past_its_deadline(
    tmp_path: Path, vhost_url: str, sqlite_url: str
) -> None:
    with stack(tmp_path, vhost_url, sqlite_url, CONFIG) as s:
        s.ingest()
        wait_until(lambda: "consuming" in s.log("ingest"), what="ingest to start")
        late = job("eu", expires_at=utcnow() - timedelta(seconds=5))
        # Published without a message TTL, as if RabbitMQ had delivered it late.
        app = make_app(vhost_url, regions=["eu"])
        with connect(vhost_url) as conn:
            declare_topology(conn, ["eu"])
        app.send_task(CRAWL_TASK, args=[dump(late)], task_id=late.run_id, queue=scrape_queue("eu"))
        s.worker("eu")
        run = wait_until(
            lambda: (r := run_of(s, late.run_id)) is not None and r.status == "expired" and r,
            timeout=60,
            what="the worker to record the job as expired",
        )
        assert run.started_at is None
        assert "no worker in region 'eu' started it before" in (run.error or "")
        assert "expired at" in s.log("worker-eu")
        assert "crawling site" not in s.log("worker-eu")


@pytest.mark.slow
def test_a_worker_rejects_a_job_whose_config_does_not_validate_to_bad_messages(
    tmp_path: Path, vhost_url: str, sqlite_url: str
) -> None:
    with stack(tmp_path, vhost_url, sqlite_url, CONFIG) as s:
        s.ingest()
        wait_until(lambda: "consuming" in s.log("ingest"), what="ingest to start")
        # A job from another schema: its config is not a resolved site.
        body = {**dump(job("eu")), "config": {"name": "shop"}}
        app = make_app(vhost_url, regions=["eu"])
        with connect(vhost_url) as conn:
            declare_topology(conn, ["eu"])
        app.send_task(CRAWL_TASK, args=[body], task_id=body["run_id"], queue=scrape_queue("eu"))
        s.worker("eu")

        def kept() -> list[tuple[str, str]]:
            with s.sessions()() as session:
                return [(b.body, b.error) for b in session.scalars(select(BadMessage))]

        [(kept_body, error)] = wait_until(kept, timeout=60, what="the job in bad_messages")
        assert error.startswith("dead letter: not a valid job:") and "config" in error
        assert body["run_id"] in kept_body
        assert run_of(s, body["run_id"]) is None  # never run, never recorded as a run
        assert "crawling site" not in s.log("worker-eu")


def test_a_redelivered_dead_letter_changes_nothing(db_url: str) -> None:
    from storage.db import make_engine, session_factory
    from storage.migrate import ensure_schema

    ensure_schema(db_url)
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    poison = job("eu")
    dead_at = utcnow().replace(microsecond=0)
    letter = DeadLetter(
        job=poison, reason="rejected", queue="scrape.eu", attempts=3, dead_at=dead_at
    )
    try:
        for _ in range(2):
            with sessions.begin() as session:
                apply_dead_letter(session, letter)
        with sessions() as session:
            runs = session.execute(select(Run.id, Run.status, Run.error, Run.finished_at)).all()
            dead = session.execute(select(DeadJob.run_id, DeadJob.attempts, DeadJob.dead_at)).all()
        assert runs == [
            (poison.run_id, "dead", "dead-lettered from scrape.eu (rejected, 3 times)", dead_at)
        ]
        assert dead == [(poison.run_id, 3, dead_at)]
    finally:
        engine.dispose()
