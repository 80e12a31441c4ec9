"""The whole pipeline through real processes: sites.yaml -> RabbitMQ -> worker -> ingest -> store.

Every test gets a fresh RabbitMQ vhost and store, real `geoscrape worker` and
`geoscrape ingest` processes, and the bundled shop served on loopback.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection

from geoscrape.testsite import Catalog, serve
from geoscrape.testsite.config import shop_site_yaml
from regions.bus import scrape_queue
from tests.harness import Stack, stack, wait_until

pytestmark = pytest.mark.slow

HEADER = """\
regions:
  eu: {}
  us: {}
defaults:
  politeness: {delay: 0, concurrency: 8, robots: obey}
  limits: {max_pages: 1000, max_depth: 6, timeout: 5s}
  allow_hosts: ["127.0.0.1"]
sites:
"""


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def shop() -> Iterator[tuple[str, Catalog]]:
    catalog = Catalog(products=60)
    with serve(catalog=catalog) as server:
        yield server.url, catalog


def runs_of(s: Stack, site: str) -> list:
    from storage.queries import list_runs

    with s.sessions()() as session:
        return list_runs(session, site=site, limit=100)


def items_of(s: Stack, site: str, region: str | None = None) -> set[tuple]:
    from storage.queries import list_items

    with s.sessions()() as session:
        rows = list_items(session, site, region=region)
    return {
        (r.region, r.data["sku"], r.data["name"], r.data["price"], r.data["currency"]) for r in rows
    }


def expected(catalog: Catalog, region: str) -> set[tuple]:
    return {
        (region, p["sku"], p["name"], p["price"], p["currency"]) for p in catalog.expected_items()
    }


def crawl_and_wait(s: Stack, site: str, *regions: str) -> str:
    args = ["crawl", site, "--wait", "--timeout", "120"]
    for region in regions:
        args += ["--region", region]
    done = s.cli(*args, timeout=180)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return done.stdout


def test_crawl_of_the_shop_stores_exactly_the_catalog(
    tmp_path: Path, vhost_url: str, db_url: str, shop: tuple[str, Catalog]
) -> None:
    base, catalog = shop
    with stack(tmp_path, vhost_url, db_url, HEADER + shop_site_yaml("shop", base)) as s:
        s.ingest()
        s.worker("eu")
        started = time.monotonic()
        out = crawl_and_wait(s, "shop")
        took = time.monotonic() - started
        [run] = runs_of(s, "shop")
        assert run.status == "succeeded", (run.error, out)
        assert run.stats["pages"] >= 50
        assert run.stats["items"] == 60
        assert items_of(s, "shop") == expected(catalog, "eu")
        print(f"\n60-product shop, {run.stats['pages']} pages: {took:.1f}s end to end")


def test_job_for_a_region_without_workers_waits_in_its_queue(
    tmp_path: Path, vhost_url: str, sqlite_url: str, shop: tuple[str, Catalog]
) -> None:
    base, catalog = shop
    config = HEADER + shop_site_yaml("shop", base, regions="eu, us")
    with stack(tmp_path, vhost_url, sqlite_url, config) as s:
        s.ingest()
        s.worker("eu")
        assert s.cli("crawl", "shop").returncode == 0

        def eu_done() -> bool:
            return any(r.region == "eu" and r.status == "succeeded" for r in runs_of(s, "shop"))

        wait_until(eu_done, timeout=120, what="the eu run to succeed")
        time.sleep(1)  # give a wrongly routed job time to be picked up
        us = [r for r in runs_of(s, "shop") if r.region == "us"]
        assert [r.status for r in us] == ["queued"]
        assert items_of(s, "shop") == expected(catalog, "eu")
        with Connection(vhost_url) as conn:
            _, waiting, consumers = scrape_queue("us")(conn.default_channel).queue_declare(
                passive=True
            )
        assert (waiting, consumers) == (1, 0)


def test_one_worker_runs_consecutive_crawls_and_survives_a_dead_site(
    tmp_path: Path, vhost_url: str, sqlite_url: str
) -> None:
    catalog = Catalog(products=12)
    dead = f"http://127.0.0.1:{closed_port()}"
    with serve(catalog=catalog) as server:
        config = (
            HEADER
            + shop_site_yaml("small", server.url)
            + f"""\
  - name: dead
    engine: requests
    start_urls: ["{dead}/index.html"]
    regions: [eu]
    extract:
      fields:
        title: {{css: "title::text"}}
"""
        )
        with stack(tmp_path, vhost_url, sqlite_url, config) as s:
            s.ingest()
            worker = s.worker("eu")

            crawl_and_wait(s, "dead")
            [failed] = runs_of(s, "dead")
            assert failed.status == "failed"
            assert re.search(r"refused", failed.error or "", re.IGNORECASE), failed.error

            for _ in range(5):
                crawl_and_wait(s, "small")
            runs = runs_of(s, "small")
            assert [r.status for r in runs] == ["succeeded"] * 5
            assert all(r.stats["items"] == 12 for r in runs)
            assert worker.poll() is None, "the worker process must still be serving"
            assert items_of(s, "small") == expected(catalog, "eu")
            assert "ReactorNotRestartable" not in s.log("worker-eu")


def test_worker_refuses_an_undeclared_region(
    tmp_path: Path, vhost_url: str, sqlite_url: str
) -> None:
    with stack(tmp_path, vhost_url, sqlite_url, HEADER + "  []\n") as s:
        done = s.cli("worker", "--region", "mars", timeout=30)
    assert done.returncode == 2
    assert "region 'mars' is not declared" in done.stderr
    assert "Traceback" not in done.stderr


def test_unreachable_broker_is_one_clear_line(tmp_path: Path, sqlite_url: str) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{closed_port()}//"
    with stack(tmp_path, url, sqlite_url, HEADER + "  []\n") as s:
        done = s.cli("worker", "--region", "eu", timeout=60)
    assert done.returncode == 2
    assert "cannot reach RabbitMQ" in done.stderr
    assert "rabbitmq-server" in done.stderr
    assert "Traceback" not in done.stderr
