"""`geoscrape cancel`: a queued run is dropped when delivered, a running one aborted.

Real `geoscrape worker`, `geoscrape ingest` and CLI processes, a fresh vhost,
store and Redis prefix, the bundled shop crawled slowly (delay 0.25 s, one
request at a time) so that the cancel arrives mid-crawl.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from geoscrape.testsite import Catalog, serve
from geoscrape.testsite.config import shop_site_yaml
from tests.harness import Stack, stack, wait_until
from tests.test_worker_stop import HEADER, PRODUCTS, stored, the_run

pytestmark = pytest.mark.slow


@pytest.fixture
def shop() -> Iterator[str]:
    with serve(catalog=Catalog(products=PRODUCTS)) as server:
        yield server.url


def queued_run(s: Stack) -> str:
    done = s.cli("crawl", "shop")
    assert done.returncode == 0, done.stderr
    run = wait_until(lambda: the_run(s), timeout=60, what="the queued run in the store")
    return str(run["id"])


def test_a_queued_run_is_dropped_when_delivered(
    tmp_path: Path, vhost_url: str, sqlite_url: str, redis_prefix: str, shop: str
) -> None:
    with stack(tmp_path, vhost_url, sqlite_url, HEADER + shop_site_yaml("shop", shop)) as s:
        s.ingest()
        run_id = queued_run(s)
        done = s.cli("cancel", run_id[:8])  # a unique prefix names the run
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"cancelled run {run_id} (queued)" in done.stdout
        assert the_run(s)["status"] == "cancelled"

        s.worker("eu")
        wait_until(
            lambda: f"run {run_id}: cancelled before it started" in s.log("worker-eu"),
            timeout=120,
            what="the worker to drop the job",
        )
        run = the_run(s)
        assert run["status"] == "cancelled" and run["started_at"] is None
        assert "while it was queued" in run["error"]
        assert stored(s, run_id) == (0, 0, 0, 0)  # nothing was fetched

        again = s.cli("cancel", run_id)
        assert again.returncode == 2
        assert again.stderr.strip() == f"error: run {run_id} already cancelled: nothing to cancel"


def test_a_running_crawl_is_aborted_and_its_items_kept(
    tmp_path: Path, vhost_url: str, sqlite_url: str, redis_prefix: str, shop: str
) -> None:
    with stack(tmp_path, vhost_url, sqlite_url, HEADER + shop_site_yaml("shop", shop)) as s:
        s.ingest()
        worker = s.worker("eu")
        run_id = queued_run(s)
        wait_until(lambda: stored(s, run_id)[0] >= 3, timeout=120, what="the first items")
        done = s.cli("cancel", run_id)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "(running on " in done.stdout and "items stored so far are kept" in done.stdout
        wait_until(
            lambda: f"run {run_id}: cancelled;" in s.log("worker-eu"),
            timeout=30,
            what="the worker to abort the crawl",
        )
        # The worker's verdict carries what the crawl did: its stats replace the CLI's.
        run = wait_until(
            lambda: (r := the_run(s))["stats"].get("items", 0) >= 3 and r,
            timeout=30,
            what="the aborted crawl's stats",
        )
        assert run["status"] == "cancelled"
        obs, keys, fetch_rows, urls = stored(s, run_id)
        assert 3 <= obs == keys < PRODUCTS  # cut short, what was stored is kept, once each
        assert fetch_rows == urls
        assert worker.poll() is None  # the worker goes on serving its region


def test_cancel_names_what_it_cannot_cancel(
    tmp_path: Path, vhost_url: str, sqlite_url: str, redis_prefix: str, shop: str
) -> None:
    with stack(tmp_path, vhost_url, sqlite_url, HEADER + shop_site_yaml("shop", shop)) as s:
        s.ingest()
        run_id = queued_run(s)
        done = s.cli("cancel", "nosuchrun")
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and "nosuchrun" in done.stderr

        # Without Redis no worker could be told: nothing is recorded, one line.
        done = subprocess.run(
            [sys.executable, "-m", "geoscrape.cli", "cancel", run_id],
            env={**s.env, "GEOSCRAPE_REDIS_URL": "redis://127.0.0.1:1/0"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("error: cannot reach Redis at redis://127.0.0.1:1/0")
        assert the_run(s)["status"] == "queued"
