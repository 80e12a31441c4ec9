"""Run leases in the writer and the reaper's decisions, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from regions.errors import SettingsError
from regions.messages import (
    Job,
    RunProgress,
    RunQueued,
    RunReleased,
    RunStarted,
    RunStats,
    dump,
)
from storage.db import make_engine, session_factory
from storage.migrate import ensure_schema
from storage.models import DeadJob, Run
from storage.reaper import Reaped, Reaper, lease_settings
from storage.runinfo import run_detail
from storage.writer import IngestMessage, apply_message, release_run
from tests.sites import resolved_site

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
LEASE = 60.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    ensure_schema(db_url)
    engine: Engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


WHERE = ("shop", "eu")  # the run's site and region


def job(run_id: str = "r1") -> Job:
    return Job(run_id=run_id, site="shop", region="eu", dispatched_at=T0, config=resolved_site())


def apply(sessions: sessionmaker[Session], *messages: IngestMessage) -> None:
    for msg in messages:
        with sessions.begin() as session:
            apply_message(session, msg)


def queued(run_id: str = "r1") -> RunQueued:
    j = job(run_id)
    return RunQueued(run_id=run_id, site="shop", region="eu", queued_at=T0, job=j)


def started(seconds: float, attempt: int = 1, run_id: str = "r1") -> RunStarted:
    return RunStarted(
        run_id=run_id, site="shop", region="eu", worker="w", started_at=at(seconds), attempt=attempt
    )


def progress(seconds: float, run_id: str = "r1") -> RunProgress:
    return RunProgress(
        run_id=run_id, site="shop", region="eu", stats=RunStats(), sent_at=at(seconds)
    )


def lease_of(sessions: sessionmaker[Session], run_id: str = "r1") -> tuple[str, int, datetime]:
    with sessions() as session:
        run = session.get(Run, run_id)
        assert run is not None and run.heartbeat_at is not None
        return run.status, run.attempts, run.heartbeat_at


def reaper(sessions: sessionmaker[Session], sent: list[Job]) -> Reaper:
    return Reaper(sessions, sent.append, lease=LEASE, max_attempts=3)


def test_lease_and_attempts_only_grow_whatever_the_order(sessions: sessionmaker[Session]) -> None:
    apply(sessions, queued(), started(0, attempt=2), progress(30), started(10, attempt=1))
    apply(sessions, progress(5), progress(30))
    assert lease_of(sessions) == ("running", 2, at(30))


def test_a_fresh_lease_is_left_alone(sessions: sessionmaker[Session]) -> None:
    apply(sessions, queued(), started(0), progress(50))
    sent: list[Job] = []
    assert reaper(sessions, sent).reap(now=at(50 + LEASE - 1)) == []
    assert sent == []


def test_a_lapsed_run_is_redelivered_once_with_the_next_attempt(
    sessions: sessionmaker[Session],
) -> None:
    apply(sessions, queued(), started(0), progress(10))
    sent: list[Job] = []
    now = at(10 + LEASE + 1)
    assert reaper(sessions, sent).reap(now=now) == [Reaped("r1", "redelivered", 1)]
    assert [(j.run_id, j.attempt, j.site, j.region) for j in sent] == [("r1", 2, "shop", "eu")]
    # Waiting for a worker again, with its lease bumped: not redelivered twice.
    assert lease_of(sessions) == ("queued", 1, now)
    assert reaper(sessions, sent).reap(now=now + timedelta(seconds=LEASE * 5)) == []
    assert len(sent) == 1
    # The second attempt starts: running again, attempts 2.
    apply(sessions, started(200, attempt=2))
    assert lease_of(sessions) == ("running", 2, at(200))


def test_two_reapers_racing_for_one_lapse_act_once(sessions: sessionmaker[Session]) -> None:
    apply(sessions, queued(), started(0))
    sent: list[Job] = []
    a, b = reaper(sessions, sent), reaper(sessions, sent)
    now = at(LEASE + 1)
    # Both read the same lapsed lease; only the first conditional UPDATE matches.
    assert a._reap_one("r1", at(0), 1, dump(job()), now, WHERE) == Reaped("r1", "redelivered", 1)
    assert b._reap_one("r1", at(0), 1, dump(job()), now, WHERE) is None
    assert len(sent) == 1


def test_a_stored_job_from_an_older_schema_ends_dead_and_reads_as_unknown(
    sessions: sessionmaker[Session],
) -> None:
    apply(sessions, queued(), started(0))
    # A job stored before its config was typed: it no longer validates as a Job.
    old = {**dump(job()), "config": {"name": "shop"}}
    with sessions.begin() as session:
        session.execute(update(Run).where(Run.id == "r1").values(job=old))
    with sessions.begin() as session:  # readers: unknown, not a crash
        assert run_detail(session, "r1").config is None
        released = RunReleased(run_id="r1", site="shop", region="eu", worker="w", released_at=at(1))
        assert release_run(session, released) is None
    sent: list[Job] = []
    assert reaper(sessions, sent).reap(now=at(LEASE + 1)) == [Reaped("r1", "dead", 1)]
    assert sent == []  # never redelivered
    with sessions() as session:
        run = session.get(Run, "r1")
        assert run is not None and run.status == "dead"
        assert run.error is not None and "older schema" in run.error


def test_a_failed_publish_leaves_the_claim_undone(sessions: sessionmaker[Session]) -> None:
    apply(sessions, queued(), started(0))

    def broken(_: Job) -> None:
        raise ConnectionError("broker away")

    with pytest.raises(ConnectionError):
        Reaper(sessions, broken, lease=LEASE).reap(now=at(LEASE + 1))
    assert lease_of(sessions) == ("running", 1, at(0))
    sent: list[Job] = []
    assert reaper(sessions, sent).reap(now=at(LEASE + 2)) == [Reaped("r1", "redelivered", 1)]


def test_the_last_attempt_lapsing_makes_the_run_dead_and_keeps_the_job(
    sessions: sessionmaker[Session],
) -> None:
    apply(sessions, queued(), started(0, attempt=3))
    sent: list[Job] = []
    now = at(LEASE + 1)
    assert reaper(sessions, sent).reap(now=now) == [Reaped("r1", "dead", 3)]
    assert sent == []
    with sessions() as session:
        run = session.get(Run, "r1")
        assert run is not None
        assert (run.status, run.finished_at, run.error) == (
            "dead",
            now,
            "dead after 3 attempts: each time its worker stopped sending heartbeats for 60s "
            "(the crawl killed its worker, or the worker died)",
        )
        dead = session.scalars(select(DeadJob)).one()
        assert (dead.run_id, dead.reason, dead.attempts, dead.dead_at) == ("r1", "lease", 3, now)
        assert (dead.job["run_id"], dead.job["attempt"]) == ("r1", 3)
    assert reaper(sessions, sent).reap(now=now + timedelta(seconds=LEASE * 5)) == []


def test_lease_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEOSCRAPE_RUN_LEASE", raising=False)
    monkeypatch.delenv("GEOSCRAPE_MAX_ATTEMPTS", raising=False)
    assert lease_settings() == (10.0, 3)
    monkeypatch.setenv("GEOSCRAPE_RUN_LEASE", "2.5")
    monkeypatch.setenv("GEOSCRAPE_MAX_ATTEMPTS", "5")
    assert lease_settings() == (2.5, 5)
    monkeypatch.setenv("GEOSCRAPE_MAX_ATTEMPTS", "two")
    with pytest.raises(SettingsError) as err:
        lease_settings()
    assert str(err.value) == (
        "environment variable GEOSCRAPE_MAX_ATTEMPTS='two': must be a whole number above 0"
    )
