"""Fault injection: kill what a deployment runs on, then count what reached the store.

Every test runs real `geoscrape worker` and `geoscrape ingest` processes
against the suite's own RabbitMQ node and PostgreSQL cluster (so they can be
killed without touching anyone else's), crawls the 150-product test shop,
injects its fault mid-crawl, repeats that TRIALS times, and asserts on the
final store: every expected item of every run present exactly once, every run
in a final state. Lost and duplicated counts and the time from the fault to a
complete store go to the ledger (`pytest tests/faults --report`).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from geoscrape.testsite import ShopServer
from geoscrape.testsite.config import shop_site_yaml
from regions.messages import FINAL_STATUSES
from storage.models import Item, Observation, Run
from tests.faults.conftest import Ledger
from tests.faults.services import PgCluster, RabbitNode
from tests.harness import Stack, stack, wait_until

pytestmark = pytest.mark.slow

TRIALS = int(os.environ.get("GEOSCRAPE_FAULT_TRIALS", "3"))
PG_OUTAGE_SECONDS = 30.0
MID_CRAWL_ITEMS = 20  # the fault strikes once this many items of the run are stored

CONFIG = """\
regions:
  eu: {{}}
  us: {{}}
defaults:
  politeness: {{delay: 0.05, concurrency: 2, robots: obey}}
  limits: {{max_pages: 1000, max_depth: 6, timeout: 10s}}
  allow_hosts: ["127.0.0.1:{port}"]
sites:
"""


def shop_config(shop: ShopServer) -> str:
    """sites.yaml crawling `shop` from eu, on loopback (allowed past the SSRF guard)."""
    return CONFIG.format(port=shop.port) + shop_site_yaml("shop", shop.url)


@pytest.fixture
def deployment(
    tmp_path: Path, rabbit: RabbitNode, pg: PgCluster, shop: ShopServer
) -> Iterator[Stack]:
    config = shop_config(shop)
    with stack(tmp_path, rabbit.url, pg.create_db(), config) as s:
        done = s.cli("db", "upgrade")
        assert done.returncode == 0, done.stderr
        yield s


def dispatch(s: Stack) -> str:
    done = s.cli("crawl", "shop", "--region", "eu", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"queued run (\S+) for shop in eu", done.stdout)
    assert match, done.stdout
    return match.group(1)


def run_row(s: Stack, run_id: str) -> Run | None:
    with s.sessions()() as session:
        return session.get(Run, run_id)


def stored_items(s: Stack, run_id: str) -> int:
    with s.sessions()() as session:
        return int(session.scalar(select(func.count()).where(Observation.run_id == run_id)) or 0)


def wait_mid_crawl(s: Stack, run_id: str) -> None:
    wait_until(
        lambda: stored_items(s, run_id) >= MID_CRAWL_ITEMS,
        timeout=120,
        what=f"{MID_CRAWL_ITEMS} items of run {run_id} in the store",
    )
    run = run_row(s, run_id)
    assert run is not None and run.status == "running", "the fault must strike mid-crawl"


def wait_complete(s: Stack, run_id: str, expected: set[str], timeout: float = 240) -> None:
    """Until the run is final and every expected item of it is stored."""

    def complete() -> bool:
        run = run_row(s, run_id)
        if run is None or run.status not in FINAL_STATUSES:
            return False
        with s.sessions()() as session:
            keys = set(session.scalars(select(Observation.key).where(Observation.run_id == run_id)))
        return keys >= expected

    wait_until(complete, timeout=timeout, interval=0.5, what=f"run {run_id} complete")


def count(s: Stack, run_id: str, expected: set[str]) -> tuple[int, int]:
    """(lost, duplicated) of one run, measured in the store."""
    with s.sessions()() as session:
        observed = Counter(
            session.scalars(select(Observation.key).where(Observation.run_id == run_id))
        )
        per_item = Counter(
            session.execute(
                select(Item.site, Item.region, Item.key).where(Item.site == "shop")
            ).all()
        )
    lost = len(expected - set(observed))
    duplicated = sum(n - 1 for n in observed.values()) + sum(n - 1 for n in per_item.values())
    return lost, duplicated


def expected_keys(shop: ShopServer) -> set[str]:
    return {str(p["sku"]) for p in shop.catalog.expected_items()}


def assert_all_final(s: Stack) -> None:
    with s.sessions()() as session:
        statuses = Counter(session.scalars(select(Run.status)))
    assert set(statuses) <= FINAL_STATUSES, statuses


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry))
    return kids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def record(
    ledger: Ledger,
    fault: str,
    s: Stack,
    run_id: str,
    expected: set[str],
    since: float,
    redelivery: float | None = None,
) -> None:
    recovery = time.monotonic() - since
    lost, duplicated = count(s, run_id, expected)
    ledger.trial(
        fault,
        expected=len(expected),
        lost=lost,
        duplicated=duplicated,
        recovery=recovery,
        redelivery=redelivery,
    )
    assert (lost, duplicated) == (0, 0), (
        f"{fault}: run {run_id} lost {lost}, duplicated {duplicated}"
    )


# -- the faults ------------------------------------------------------------------------


def test_kill_9_a_worker_mid_crawl(
    deployment: Stack, shop: ShopServer, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease lapses, ingest's reaper requeues the job and another eu worker completes it.

    With the default lease (GEOSCRAPE_RUN_LEASE unset: 10 s), as deployed."""
    monkeypatch.delenv("GEOSCRAPE_RUN_LEASE", raising=False)
    s = deployment
    expected = expected_keys(shop)
    s.ingest()
    s.worker("us", "worker-us")
    names = ["eu-1", "eu-2"]
    for name in names:
        s.worker("eu", name)
    for trial in range(TRIALS):
        run_id = dispatch(s)
        wait_mid_crawl(s, run_id)
        run = run_row(s, run_id)
        assert run is not None and run.worker is not None
        victim_pid = int(run.worker.rsplit(":", 1)[1])
        [victim] = [n for n in names if s.procs[n][0].pid == victim_pid]
        crawl_children = children_of(victim_pid)
        assert crawl_children, "the worker runs its crawl in a child process"
        killed_at = datetime.now(UTC)
        since = time.monotonic()
        os.kill(victim_pid, signal.SIGKILL)
        s.procs[victim][0].wait(timeout=10)
        # PR_SET_PDEATHSIG: the crawl dies with its worker, so it cannot run on beside a retry.
        wait_until(
            lambda kids=crawl_children: not any(alive(p) for p in kids),  # type: ignore[misc]
            timeout=10,
            what="the killed worker's crawl process to die",
        )
        wait_until(
            lambda run_id=run_id, killed_at=killed_at: (  # type: ignore[misc]
                (r := run_row(s, run_id)) and r.started_at and r.started_at > killed_at
            ),
            timeout=90,
            interval=0.1,
            what="another worker to start the run again",
        )
        redelivery = time.monotonic() - since
        # The default lease is 10 s: redelivery well past it means the lease is not working.
        assert redelivery < 45, f"redelivered {redelivery:.1f}s after the kill"
        wait_complete(s, run_id, expected)
        record(
            ledger,
            "kill -9 a worker (and its crawl) mid-crawl",
            s,
            run_id,
            expected,
            since,
            redelivery,
        )
        final = run_row(s, run_id)
        assert final is not None and final.status == "succeeded", final and final.error
        survivor = next(n for n in names if n != victim)
        assert final.worker == f"eu@{os.uname().nodename}:{s.procs[survivor][0].pid}"
        assert final.started_at is not None and final.started_at > killed_at, "ran twice at once"
        assert run_id not in s.log("worker-us"), "redelivered outside its region"
        # Replace the dead worker for the next trial.
        names[names.index(victim)] = f"eu-{trial + 3}"
        s.worker("eu", names[names.index(f"eu-{trial + 3}")])
    assert_all_final(s)


def test_kill_9_ingest_mid_batch(deployment: Stack, shop: ShopServer, ledger: Ledger) -> None:
    """Unacked batches come back to the restarted ingest; writing them again changes nothing."""
    s = deployment
    expected = expected_keys(shop)
    s.ingest()
    s.worker("eu")
    for _ in range(TRIALS):
        run_id = dispatch(s)
        wait_mid_crawl(s, run_id)
        since = time.monotonic()
        os.kill(s.procs["ingest"][0].pid, signal.SIGKILL)
        s.procs["ingest"][0].wait(timeout=10)
        time.sleep(2)  # results pile up on the queue meanwhile
        s.ingest()
        wait_complete(s, run_id, expected)
        record(ledger, "kill -9 ingest mid-batch", s, run_id, expected, since)
    assert_all_final(s)


def test_restart_rabbitmq_mid_crawl(
    deployment: Stack, shop: ShopServer, ledger: Ledger, rabbit: RabbitNode
) -> None:
    """Worker, crawl publisher and ingest reconnect; no result message is dropped, no re-crawl."""
    s = deployment
    expected = expected_keys(shop)
    s.ingest()
    worker = s.worker("eu")
    for _ in range(TRIALS):
        run_id = dispatch(s)
        wait_mid_crawl(s, run_id)
        since = time.monotonic()
        rabbit.restart()
        wait_complete(s, run_id, expected)
        record(ledger, "restart RabbitMQ mid-crawl", s, run_id, expected, since)
        assert worker.poll() is None and s.procs["ingest"][0].poll() is None
        # Acked at crawl start, the job is not requeued by the restart: crawled once.
        assert s.log("worker-eu").count(f"run {run_id}: crawling site") == 1
        wait_until(
            lambda: rabbit.queue_counts("scrape.eu") == (0, 0),
            timeout=180,
            what="scrape.eu to drain",
        )
    assert_all_final(s)


def test_stop_postgresql_30s_during_ingest(
    deployment: Stack, shop: ShopServer, ledger: Ledger, pg: PgCluster, rabbit: RabbitNode
) -> None:
    """Ingest keeps every message unacked while the database is down, then commits them."""
    s = deployment
    expected = expected_keys(shop)
    s.ingest()
    s.worker("eu")
    for _ in range(TRIALS):
        run_id = dispatch(s)
        wait_mid_crawl(s, run_id)
        since = time.monotonic()
        pg.stop()
        try:
            time.sleep(5)
            ready, unacked = rabbit.queue_counts("ingest")
            # Nothing is acked before it is committed: the results wait on the queue.
            assert ready + unacked > 0, (ready, unacked)
            time.sleep(max(0.0, PG_OUTAGE_SECONDS - (time.monotonic() - since)))
        finally:
            pg.start()
        wait_complete(s, run_id, expected)
        record(ledger, "stop PostgreSQL for 30 s during ingest", s, run_id, expected, since)
        assert s.procs["ingest"][0].poll() is None, "ingest must wait, not die"
    assert_all_final(s)
