"""Regions for real: three network namespaces, three least-privilege broker users.

Each region is a Linux network namespace with its own /24 on a bridge. Its
`geoscrape worker --region R` runs inside the namespace under R's own broker
user and reaches RabbitMQ over the bridge (a forwarder on the host's service
address, since the shared broker listens on loopback only). The geo-aware shop
on the same service address prices by source subnet and answers 451 on
/product/ pages to asia, so the network itself proves where each job ran.

Needs root to create namespaces (CI runs as root): without it the tests fail
with the reason, they never skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection

from geoscrape import netns
from geoscrape.forwarder import Forwarder
from geoscrape.testsite import GeoCatalog, Locale, serve
from regions.bus import scrape_queue
from tests.harness import Stack, stack, wait_until
from tests.namespaces import in_namespace, region_network

pytestmark = pytest.mark.slow

REGIONS = ["eu", "us", "asia"]
CURRENCY = {"eu": ("EUR", 1.0), "us": ("USD", 1.1), "asia": ("JPY", 160.0)}
PASSWORDS = {r: f"{r}-{uuid.uuid4().hex[:12]}" for r in REGIONS}

CONFIG = """\
regions:
  eu: {{}}
  us: {{}}
  asia: {{}}
defaults:
  politeness: {{delay: 0, concurrency: 4, robots: ignore}}
  limits: {{timeout: 10s}}
  allow_networks: ["{service_subnet}"]
sites:
  - name: geo
    engine: requests
    start_urls: ["{base}/prices.html", "{base}/product/SKU-0001.html"]
    regions: [eu, us, asia]
    extract:
      items: "div.product"
      key: sku
      fields:
        sku: {{css: "::attr(data-sku)"}}
        name: {{css: ".name::text"}}
        price: {{css: ".price::text", type: price}}
        currency: {{css: ".price::attr(data-currency)"}}
"""


@pytest.fixture(scope="module")
def net() -> Iterator[netns.RegionNet]:
    with region_network(REGIONS) as created:
        yield created


@pytest.fixture
def users(vhost_url: str, tmp_path: Path) -> Iterator[str]:
    """Per-region users (prefix returned) provisioned into the test's vhost, removed after."""
    prefix = f"gst{uuid.uuid4().hex[:8]}-"
    config = tmp_path / "provision.yaml"
    config.write_text(
        "regions: {eu: {}, us: {}, asia: {}}\nsites:\n  - name: x\n"
        '    start_urls: ["http://127.0.0.1:9/"]\n    regions: [eu]\n'
        '    extract: {fields: {t: {css: "title::text"}}}\n'
    )
    env = {
        **os.environ,
        "GEOSCRAPE_BROKER_URL": vhost_url,
        **{f"GEOSCRAPE_BROKER_PASSWORD_{r.upper()}": p for r, p in PASSWORDS.items()},
    }
    done = subprocess.run(
        [sys.executable, "-m", "geoscrape.cli", "broker", "provision", "--apply",
         "--config", str(config), "--user-prefix", prefix],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    try:
        yield prefix
    finally:
        for region in REGIONS:
            subprocess.run(["rabbitmqctl", "delete_user", prefix + region], capture_output=True)


def start_worker(s: Stack, net: netns.RegionNet, region: str, url: str) -> None:
    """`geoscrape worker --region R` inside R's namespace, with R's user and no database."""
    env = {k: v for k, v in s.env.items() if k != "GEOSCRAPE_DATABASE_URL"}
    env["GEOSCRAPE_BROKER_URL"] = url
    log = s.workdir / f"worker-{region}.log"
    argv = [sys.executable, "-m", "geoscrape.cli", "worker", "--region", region]
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            in_namespace(net.hosts[region], *argv),
            env=env, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    s.procs[f"worker-{region}"] = (proc, log)


def workers_table(s: Stack) -> dict[str, tuple[str | None, bool]]:
    """region -> (egress, stopped) of the workers the store heard from."""
    from sqlalchemy import select

    from storage.models import Worker

    with s.sessions()() as session:
        rows = session.scalars(select(Worker)).all()
        return {w.region: (w.egress, w.stopped_at is not None) for w in rows}


def runs_of(s: Stack) -> list:
    from storage.queries import list_runs

    with s.sessions()() as session:
        return list_runs(session, site="geo", limit=100)


def test_three_namespace_regions_each_fetch_from_their_own_subnet(
    net: netns.RegionNet, users: str, vhost_url: str, sqlite_url: str, tmp_path: Path
) -> None:
    from storage.queries import list_fetches, list_items

    catalog = GeoCatalog(
        {r: Locale(net.hosts[r].subnet, *CURRENCY[r]) for r in REGIONS},
        blocked={"asia": ["/product/"]},
        products=12,
    )
    vhost = vhost_url.rsplit("/", 1)[1]
    with (
        serve(host=net.service_address, catalog=catalog) as shop,
        Forwarder((net.service_address, 0), ("127.0.0.1", 5672)) as broker,
    ):
        config = CONFIG.format(service_subnet=net.service_subnet, base=shop.url)
        with stack(tmp_path, vhost_url, sqlite_url, config) as s:
            from storage.migrate import ensure_schema

            ensure_schema(sqlite_url)
            s.ingest()
            for region in REGIONS:
                url = f"amqp://{users}{region}:{PASSWORDS[region]}@{net.service_address}:{broker.port}/{vhost}"
                start_worker(s, net, region, url)

            # Heartbeats: every worker is known centrally, with its namespace's address.
            egress = {r: (net.hosts[r].address, False) for r in REGIONS}
            wait_until(lambda: workers_table(s) == egress, timeout=90, what="3 worker heartbeats")

            crawl = s.cli("crawl", "geo", "--wait", "--timeout", "120", timeout=180)
            assert crawl.returncode == 0, crawl.stdout + crawl.stderr
            runs = {r.region: r for r in runs_of(s)}
            assert sorted(runs) == sorted(REGIONS)
            assert {r: run.status for r, run in runs.items()} == dict.fromkeys(REGIONS, "succeeded")
            with s.sessions()() as session:
                for region in REGIONS:
                    items = list_items(session, "geo", region=region)
                    got = sorted((i.key, i.data["price"], i.data["currency"]) for i in items)
                    want = sorted(
                        (p["sku"], p["price"], p["currency"])
                        for p in catalog.expected_items_in(region)
                    )
                    assert got == want, region
                statuses = {
                    r: {
                        f.url.rsplit("/", 1)[1]: f.status for f in list_fetches(session, runs[r].id)
                    }
                    for r in REGIONS
                }
            assert statuses == {
                "eu": {"prices.html": 200, "SKU-0001.html": 200},
                "us": {"prices.html": 200, "SKU-0001.html": 200},
                "asia": {"prices.html": 200, "SKU-0001.html": 451},
            }
            assert runs["asia"].stats["status_codes"] == {"200": 1, "451": 1}
            assert runs["eu"].stats["status_codes"] == {"200": 2}
            assert runs["eu"].worker is not None and runs["eu"].worker.startswith("eu@")

            # The network's own record: each region's requests came from its address only.
            log = sorted(shop.access_log)
            assert log == sorted(
                (net.hosts[r].address, path)
                for r in REGIONS
                for path in ("/prices.html", "/product/SKU-0001.html")
            )
            # The broker saw the workers over the bridge, never over loopback.
            assert broker.connections >= 3

            status = s.cli("status")
            assert status.returncode == 0, status.stderr
            for region in REGIONS:
                assert net.hosts[region].address in status.stdout
            assert "succeeded" in status.stdout

            # One region's worker stops: the others complete, its job waits, nothing runs elsewhere.
            s.stop("worker-us")
            egress["us"] = (net.hosts["us"].address, True)
            wait_until(lambda: workers_table(s) == egress, timeout=60, what="us worker stopped")
            shop.clear_log()
            assert s.cli("crawl", "geo").returncode == 0

            def others_done() -> bool:
                done = [r for r in runs_of(s) if r.status == "succeeded"]
                return len(done) == 5

            wait_until(others_done, timeout=120, what="the eu and asia runs of the 2nd crawl")
            time.sleep(2)  # give a wrongly routed job the chance to run
            latest = {}
            for run in runs_of(s):
                latest.setdefault(run.region, run)
            assert {r: latest[r].status for r in REGIONS} == {
                "eu": "succeeded", "us": "queued", "asia": "succeeded"
            }  # fmt: skip
            assert {catalog.region_of(addr) for addr, _ in shop.access_log} == {"eu", "asia"}
            with Connection(vhost_url) as conn:
                _, waiting, consumers = scrape_queue("us")(conn.default_channel).queue_declare(
                    passive=True
                )
            assert (waiting, consumers) == (1, 0)
            status = s.cli("status")
            us_row = next(line for line in status.stdout.splitlines() if line.startswith("│ us "))
            # live workers, waiting jobs, consumers
            assert [c.strip() for c in us_row.split("│")[2:5]] == ["0", "1", "0"], status.stdout


def test_namespaces_are_gone_after_destroy() -> None:
    net = netns.create(["eu"])
    names = [net.hosts["eu"].netns]
    assert (
        net.hosts["eu"].netns
        in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )
    netns.destroy(net)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert [n for n in names if n in listed] == []
    assert net.bridge not in links and not any(link in links for link in net.links)
    assert netns.find(net.tag) is None


def test_a_dead_owners_network_is_removed_as_stale() -> None:
    # A child creates a network and dies without cleaning up (as a killed test run would).
    code = (
        "from geoscrape import netns; import json, os; "
        "net = netns.create(['eu']); print(net.tag, flush=True); os._exit(0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    tag = done.stdout.strip()
    leftover = netns.find(tag)
    assert leftover is not None and json.loads(leftover.to_json())["owner_pid"] > 0
    assert tag in netns.remove_stale()
    assert netns.find(tag) is None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert leftover.hosts["eu"].netns not in listed


def test_region_namespace_has_no_route_but_to_the_service_subnet(net: netns.RegionNet) -> None:
    routes = subprocess.run(
        in_namespace(net.hosts["eu"], "ip", "-4", "route"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    eu = net.hosts["eu"]
    assert sorted(line.split()[0] for line in routes) == sorted([eu.subnet, net.service_subnet])
    assert not any(line.startswith("default") for line in routes)
