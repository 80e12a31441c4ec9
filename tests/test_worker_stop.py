"""A worker told to stop: one signal finishes the crawl, two hand the run back.

Real `geoscrape worker` and `geoscrape ingest` processes, a fresh vhost and
store, the bundled shop crawled slowly enough (delay 0.25 s, one request at a
time) that the signals arrive mid-crawl.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from geoscrape.testsite import Catalog, serve
from geoscrape.testsite.config import shop_site_yaml
from storage.models import fetches, observations, runs
from tests.harness import Stack, stack, wait_until

pytestmark = pytest.mark.slow

PRODUCTS = 40
HEADER = """\
regions:
  eu: {}
defaults:
  politeness: {delay: 0.25, concurrency: 1, robots: ignore}
  limits: {max_pages: 1000, max_depth: 6, timeout: 5s}
  allow_hosts: ["127.0.0.1"]
sites:
"""


@pytest.fixture
def shop() -> Iterator[tuple[str, Catalog]]:
    catalog = Catalog(products=PRODUCTS)
    with serve(catalog=catalog) as server:
        yield server.url, catalog


def the_run(s: Stack) -> dict:
    try:
        with s.sessions()() as session:
            rows = session.execute(select(runs)).mappings().all()
    except OperationalError:  # ingest has not created the schema yet
        return {}
    assert len(rows) <= 1, rows
    return dict(rows[0]) if rows else {}


def stored(s: Stack, run_id: str) -> tuple[int, int, int, int]:
    """(observations, distinct keys, fetches, distinct URLs) of the run."""
    with s.sessions()() as session:
        obs = session.execute(
            select(func.count(), func.count(observations.c.key.distinct())).where(
                observations.c.run_id == run_id
            )
        ).one()
        fet = session.execute(
            select(func.count(), func.count(fetches.c.url.distinct())).where(
                fetches.c.run_id == run_id
            )
        ).one()
    return obs[0], obs[1], fet[0], fet[1]


def start_mid_crawl(s: Stack) -> tuple[subprocess.Popen[bytes], str]:
    """Ingest and worker A up, one crawl dispatched and some items of it stored."""
    s.ingest()
    worker = s.worker("eu", "worker-a")
    done = s.cli("crawl", "shop")
    assert done.returncode == 0, done.stderr
    run = wait_until(
        lambda: (r := the_run(s)) and r["status"] == "running" and r["worker"] and r,
        timeout=120,
        what="the crawl to start",
    )
    wait_until(lambda: stored(s, run["id"])[0] >= 3, timeout=60, what="the first items")
    return worker, run["id"]


def test_one_signal_finishes_the_crawl_then_exits(
    tmp_path: Path, vhost_url: str, sqlite_url: str, shop: tuple[str, Catalog]
) -> None:
    base, _ = shop
    with stack(tmp_path, vhost_url, sqlite_url, HEADER + shop_site_yaml("shop", base)) as s:
        worker, run_id = start_mid_crawl(s)
        worker.send_signal(signal.SIGINT)
        wait_until(
            lambda: "stopping: no new jobs; finishing site 'shop'" in s.log("worker-a"),
            timeout=30,
            what="the stopping line",
        )
        assert worker.wait(timeout=180) == 0, s.log("worker-a")
        run = the_run(s)
        wait_until(
            lambda: the_run(s)["status"] == "succeeded", timeout=60, what="ingest to record the end"
        )
        run = the_run(s)
        assert run["worker"].endswith(f":{worker.pid}")
        assert stored(s, run_id)[:2] == (PRODUCTS, PRODUCTS)
        assert "handed back" not in s.log("worker-a")


def test_two_signals_hand_the_run_back_to_another_worker(
    tmp_path: Path, vhost_url: str, sqlite_url: str, shop: tuple[str, Catalog]
) -> None:
    base, _ = shop
    with stack(tmp_path, vhost_url, sqlite_url, HEADER + shop_site_yaml("shop", base)) as s:
        worker_a, run_id = start_mid_crawl(s)
        worker_a.send_signal(signal.SIGINT)
        wait_until(
            lambda: "stopping: no new jobs" in s.log("worker-a"),
            timeout=30,
            what="the first signal",
        )
        worker_a.send_signal(signal.SIGINT)
        second = time.monotonic()
        worker_a.wait(timeout=60)
        exit_seconds = time.monotonic() - second
        print(f"\nworker exited {exit_seconds:.1f}s after the second SIGINT")
        assert exit_seconds < 5, s.log("worker-a")  # the bound (measured 0.2-0.3 s)
        assert "handed back to eu" in s.log("worker-a")
        partial = stored(s, run_id)[0]
        assert partial < PRODUCTS  # it really was cut short

        worker_b = s.worker("eu", "worker-b")
        wait_until(
            lambda: the_run(s)["status"] == "succeeded",
            timeout=180,
            what="worker B to finish the run",
        )
        run = the_run(s)
        assert run["id"] == run_id
        assert run["worker"].endswith(f":{worker_b.pid}")
        obs, keys, fetch_rows, urls = stored(s, run_id)
        assert (obs, keys) == (PRODUCTS, PRODUCTS)  # 0 lost, 0 duplicated
        assert fetch_rows == urls
        assert run["stats"]["items"] == PRODUCTS
