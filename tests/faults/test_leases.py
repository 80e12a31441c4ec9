"""Leases (storage/reaper.py): a poison job is bounded, a long crawl outlives consumer_timeout.

Workers ack a job when its crawl starts; the run's heartbeats are its lease,
and ingest's reaper redelivers a run whose lease lapses, or declares it dead
after GEOSCRAPE_MAX_ATTEMPTS attempts.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from geoscrape.testsite import ShopServer
from storage.models import DeadJob, Observation
from tests.faults.conftest import Ledger
from tests.faults.poison import FLAG_ENV, URL_ENV
from tests.faults.services import PgCluster, RabbitNode, ServiceError
from tests.faults.test_faults import (
    count,
    dispatch,
    expected_keys,
    run_row,
    shop_config,
    wait_complete,
)
from tests.harness import stack, wait_until

pytestmark = pytest.mark.slow

LEASE = 3  # seconds, GEOSCRAPE_RUN_LEASE for these tests
MAX_ATTEMPTS = 3
CONSUMER_TIMEOUT_MS = 5000
# RabbitMQ checks consumer_timeout once a minute per channel by default; the strict
# node checks every second, so a delivery held unacked longer than
# CONSUMER_TIMEOUT_MS + TIMEOUT_CHECK is certain to have been caught
# (test_the_strict_node_closes_a_channel_that_holds_a_delivery_too_long shows it is).
TIMEOUT_CHECK = 1.0

POISON_CONFIG = """\
regions:
  eu: {{}}
defaults:
  allow_hosts: ["127.0.0.1:{port}"]
sites:
  - name: poison
    spider: tests.faults.poison:KillWorkerSpider
    regions: [eu]
"""


@pytest.fixture
def lease_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOSCRAPE_RUN_LEASE", str(LEASE))
    monkeypatch.setenv("GEOSCRAPE_MAX_ATTEMPTS", str(MAX_ATTEMPTS))
    # Fresh crawl processes: the poison spider kills its parent, which must be the
    # worker itself, not the warm fork server a crawl would otherwise fork from.
    monkeypatch.setenv("GEOSCRAPE_WARM_CHILDREN", "0")


def test_a_poison_job_is_dead_after_exactly_max_attempts_then_requeued(
    tmp_path: Path,
    rabbit: RabbitNode,
    pg: PgCluster,
    shop: ShopServer,
    ledger: Ledger,
    lease_env: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flag = tmp_path / "poison.flag"
    flag.write_text("kill the worker\n")
    monkeypatch.setenv(FLAG_ENV, str(flag))
    monkeypatch.setenv(URL_ENV, f"{shop.url}/index.html")
    config = POISON_CONFIG.format(port=shop.port)
    with stack(tmp_path, rabbit.url, pg.create_db(), config) as s:
        assert s.cli("db", "upgrade").returncode == 0
        s.ingest()
        s.worker("eu", "eu-1")
        done = s.cli("crawl", "poison", timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        match = re.search(r"queued run (\S+) for poison in eu", done.stdout)
        assert match, done.stdout
        run_id = match.group(1)

        # A supervisor: restart the eu worker whenever the poison kills it.
        deaths: list[str] = []
        first_death = 0.0

        def supervise() -> bool:
            nonlocal first_death
            current = f"eu-{len(deaths) + 1}"
            if s.procs[current][0].poll() is not None:
                deaths.append(current)
                first_death = first_death or time.monotonic()
                s.worker("eu", f"eu-{len(deaths) + 1}")
            run = run_row(s, run_id)
            return run is not None and run.status == "dead"

        wait_until(supervise, timeout=240, interval=0.2, what=f"run {run_id} to be dead")
        dead_after = time.monotonic() - first_death
        # Bounded: no further attempt kills the next worker.
        time.sleep(LEASE * 3)
        assert s.procs[f"eu-{len(deaths) + 1}"][0].poll() is None, "a 4th attempt ran"
        assert deaths == ["eu-1", "eu-2", "eu-3"]
        for n, name in enumerate(deaths, start=1):
            assert f"run {run_id}: crawling site 'poison' in region eu (attempt {n})" in s.log(name)
        assert rabbit.queue_counts("scrape.eu") == (0, 0)

        run = run_row(s, run_id)
        assert run is not None and run.attempts == MAX_ATTEMPTS
        assert run.error == (
            f"dead after {MAX_ATTEMPTS} attempts: each time its worker stopped sending "
            f"heartbeats for {LEASE}s (the crawl killed its worker, or the worker died)"
        )
        with s.sessions()() as session:
            dead = session.get(DeadJob, run_id)
            assert dead is not None
            assert (dead.reason, dead.attempts, dead.requeued_at) == ("lease", 3, None)
        listed = s.cli("dead")
        assert listed.returncode == 0, listed.stderr
        assert run_id in listed.stdout and "lease" in listed.stdout

        # The fix, then a human requeues it: it gets fresh attempts and completes.
        flag.unlink()
        since = time.monotonic()
        requeued = s.cli("dead", "requeue", run_id)
        assert requeued.returncode == 0, requeued.stdout + requeued.stderr
        wait_until(
            lambda: (r := run_row(s, run_id)) is not None and r.status == "succeeded",
            timeout=120,
            what="the requeued run to succeed",
        )
        fixed = run_row(s, run_id)
        assert fixed is not None and (fixed.attempts, fixed.error) == (1, None)
        assert f"run {run_id}: crawling site 'poison' in region eu (attempt 1)" in s.log("eu-4")
        with s.sessions()() as session:
            keys = list(
                session.scalars(select(Observation.key).where(Observation.run_id == run_id))
            )
        lost, duplicated = int(not keys), max(0, len(keys) - 1)
        ledger.trial(
            f"poison job (kills its worker every time): dead after {MAX_ATTEMPTS} attempts, "
            "then requeued",
            expected=1,
            lost=lost,
            duplicated=duplicated,
            recovery=dead_after,
        )
        assert (lost, duplicated) == (0, 0)
        assert time.monotonic() - since < 120
        assert s.procs["eu-4"][0].poll() is None


@pytest.fixture(scope="module")
def strict_rabbit() -> Iterator[RabbitNode]:
    """A private RabbitMQ node whose consumer_timeout is 5 s, checked every second."""
    node = RabbitNode(
        consumer_timeout_ms=CONSUMER_TIMEOUT_MS, timeout_check_ms=int(TIMEOUT_CHECK * 1000)
    )
    try:
        node.start()
    except ServiceError as exc:
        node.destroy()
        pytest.fail(str(exc))
    try:
        yield node
    finally:
        node.destroy()


def test_the_strict_node_closes_a_channel_that_holds_a_delivery_too_long(
    strict_rabbit: RabbitNode,
) -> None:
    """The control: on this node a job held unacked as long as the crawl below is lost."""
    from amqp.exceptions import PreconditionFailed
    from kombu import Connection, Queue

    queue = Queue(f"held-{uuid.uuid4().hex[:8]}", auto_delete=True)
    held: list[object] = []
    closed: list[str] = []
    with Connection(strict_rabbit.url) as conn:
        with conn.Producer() as producer:
            producer.publish({"job": 1}, routing_key=queue.name, declare=[queue])
        since = time.monotonic()
        with conn.Consumer([queue], callbacks=[lambda _body, message: held.append(message)]):
            while not closed and time.monotonic() - since < 60:
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    continue
                except PreconditionFailed as exc:  # the broker closed the channel
                    closed.append(str(exc))
        closed_after = time.monotonic() - since
    assert held, "the message was never delivered"
    assert closed and "timed out" in closed[0], "the channel was never closed"
    print(f"\nchannel closed {closed_after:.1f}s after a delivery was held unacked")
    assert closed_after < CONSUMER_TIMEOUT_MS / 1000 + 3 * TIMEOUT_CHECK + 2


def test_a_crawl_longer_than_consumer_timeout_runs_once(
    tmp_path: Path,
    strict_rabbit: RabbitNode,
    pg: PgCluster,
    shop: ShopServer,
    ledger: Ledger,
    lease_env: None,
) -> None:
    # One request at a time, 0.1 s apart: ~170 pages take well over consumer_timeout.
    config = shop_config(shop).replace("delay: 0.05, concurrency: 2", "delay: 0.1, concurrency: 1")
    with stack(tmp_path, strict_rabbit.url, pg.create_db(), config) as s:
        assert s.cli("db", "upgrade").returncode == 0
        expected = expected_keys(shop)
        s.ingest()
        s.worker("eu")
        shop.clear_log()
        # The node's log also holds the control test's timeout: count only new ones.
        timeouts_before = strict_rabbit.log_tail(lines=10_000).count("timed out")
        run_id = dispatch(s)
        wait_complete(s, run_id, expected, timeout=400)

        run = run_row(s, run_id)
        assert run is not None and run.status == "succeeded", run and run.error
        assert run.started_at is not None and run.finished_at is not None
        duration = (run.finished_at - run.started_at).total_seconds()
        # Long enough that RabbitMQ would have closed the channel of an unacked job.
        assert duration > 2 * (TIMEOUT_CHECK + CONSUMER_TIMEOUT_MS / 1000), duration
        assert run.attempts == 1
        # Started once, on one channel that was never closed.
        assert s.log("worker-eu").count(f"run {run_id}: crawling site") == 1
        assert strict_rabbit.log_tail(lines=10_000).count("timed out") == timeouts_before
        assert "Connection to broker lost" not in s.log("worker-eu")
        # Each URL fetched exactly once, by the one crawl.
        fetched = Counter(path for _client, path in shop.access_log)
        assert fetched and max(fetched.values()) == 1, fetched.most_common(3)
        lost, duplicated = count(s, run_id, expected)
        ledger.trial(
            f"a crawl (> {2 * (TIMEOUT_CHECK + CONSUMER_TIMEOUT_MS / 1000):.0f} s) longer than "
            f"consumer_timeout ({CONSUMER_TIMEOUT_MS // 1000} s)",
            expected=len(expected),
            lost=lost,
            duplicated=duplicated,
            recovery=None,
        )
        assert (lost, duplicated) == (0, 0)
