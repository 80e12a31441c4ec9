"""`geoscrape dead` and `geoscrape dead requeue`: a rejected job is kept, shown, and run again.

A job is rejected from its region's queue (as a worker does with a job it must
not run), RabbitMQ dead-letters it to `scrape.dead`, ingest keeps it in
`dead_jobs` with the run `dead`; after the "fix" (a worker for the region is
started) `geoscrape dead requeue RUN` runs it under the same run id.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection

from geoscrape.testsite import ShopServer
from regions.bus import scrape_queue
from tests.faults.services import PgCluster, RabbitNode
from tests.faults.test_faults import (
    dispatch,
    expected_keys,
    run_row,
    shop_config,
    stored_items,
    wait_complete,
)
from tests.harness import Stack, stack, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def deployment(
    tmp_path: Path, rabbit: RabbitNode, pg: PgCluster, shop: ShopServer
) -> Iterator[Stack]:
    config = shop_config(shop)
    with stack(tmp_path, rabbit.url, pg.create_db(), config) as s:
        assert s.cli("db", "upgrade").returncode == 0
        yield s


def reject_one(url: str) -> None:
    """Take the job waiting in scrape.eu and reject it without requeue (a refusing worker)."""
    with Connection(url) as conn:
        queue = scrape_queue("eu")(conn.default_channel)
        message = wait_until(lambda: queue.get(no_ack=False), timeout=30, what="a job in scrape.eu")
        message.reject(requeue=False)


def test_a_dead_job_is_listed_and_requeued_under_its_run_id(
    deployment: Stack, shop: ShopServer, rabbit: RabbitNode
) -> None:
    s = deployment
    s.ingest()
    run_id = dispatch(s)
    reject_one(rabbit.url)
    wait_until(
        lambda: (r := run_row(s, run_id)) is not None and r.status == "dead",
        timeout=60,
        what="the run to be dead",
    )

    listed = s.cli("dead")
    assert listed.returncode == 0, listed.stderr
    assert run_id in listed.stdout and "rejected" in listed.stdout

    missing = s.cli("dead", "requeue", "no-such-run")
    assert missing.returncode == 2
    assert "error: no dead job with run id 'no-such-run'" in missing.stderr

    s.worker("eu")  # the fix: now there is a worker that runs it
    requeued = s.cli("dead", "requeue", run_id[:8])
    assert requeued.returncode == 0, requeued.stdout + requeued.stderr
    assert f"requeued run {run_id} for shop in eu" in requeued.stdout

    expected = expected_keys(shop)
    wait_complete(s, run_id, expected)
    final = run_row(s, run_id)
    assert final is not None and final.status == "succeeded", final and final.error
    assert stored_items(s, run_id) == len(expected)

    assert s.cli("dead").stdout.strip() == "no dead jobs"
    assert run_id in s.cli("dead", "--all").stdout
