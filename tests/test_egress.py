"""Regions through proxy exits: verified egress that fails closed, attested in the store.

Each region is a network namespace (10.79.0.0/16, names gs9...) holding real
proxies from Debian: tinyproxy (HTTP, with a password from ${EU_PROXY_PASS})
in eu, dante (SOCKS5) in us. The workers run on the host, one process per
region, and reach their region only through its proxies. The geo-aware shop
and an IP echo service listen on the bridge's service address, outside every
namespace: the shop's access log shows where each request really came from,
and a geoip database written by the test (mmdb-writer) maps the namespaces'
subnets to countries.

Needs root (network namespaces): without it the tests fail, they never skip.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from kombu import Connection, Queue

from geoscrape import netns
from geoscrape.testsite import GeoCatalog, Locale, serve
from regions.bus import INGEST_EXCHANGE, INGEST_ROUTING_KEY, declare_topology, scrape_queue
from tests.harness import Stack, stack, wait_until
from tests.namespaces import region_network
from tests.proxies import Proxy, echo_server, start_dante, start_tinyproxy, write_geoip
from tests.query_store import api_server

pytestmark = pytest.mark.slow

REGIONS = ["eu", "us"]
CURRENCY = {"eu": ("EUR", 1.0), "us": ("USD", 1.1)}
PASSWORD = "pw-" + secrets.token_hex(12)  # the proxy password the test must never find
PRODUCTS = 8

SITE = """\
  - name: {name}
    engine: {engine}
    start_urls: [{urls}]
    regions: [{regions}]
    extract:
      items: "{items}"
      key: sku
      fields:
        sku: {{css: "::attr(data-sku)"}}
        price: {{css: ".price::text", type: price}}
        currency: {{css: ".price::attr(data-currency)"}}
"""


def config_text(
    net: netns.RegionNet,
    echo: str,
    geoip: Path,
    regions: dict[str, str],
    sites: list[str],
    delay: str = "0",
) -> str:
    region_lines = "\n".join(f"  {name}: {body}" for name, body in regions.items())
    return (
        f'geoip:\n  databases: ["{geoip}"]\n'
        f"regions:\n{region_lines}\n"
        "defaults:\n"
        f"  politeness: {{delay: {delay}, concurrency: 2, robots: ignore}}\n"
        "  limits: {timeout: 10s}\n"
        f'  allow_networks: ["{net.service_subnet}"]\n'
        "sites:\n" + "".join(sites)
    )


def egress(
    proxies: list[str], country: str, echo: str, subnet: str, rotate: str = "per-run"
) -> str:
    listed = ", ".join(f'"{p}"' for p in proxies)
    return (
        f"{{egress: {{proxies: [{listed}], rotate: {rotate}, verify: "
        f'{{echo_url: "{echo}", country: {country}, networks: ["{subnet}"], every: 1s}}}}}}'
    )


def site(name: str, base: str, regions: list[str], engine: str = "requests", pages: int = 1) -> str:
    if pages == 1:
        urls, items = f'"{base}/prices.html"', "div.product"
    else:
        urls = ", ".join(f'"{base}/product/SKU-{i:04d}.html"' for i in range(1, pages + 1))
        items = "div.product-detail"
    return SITE.format(name=name, engine=engine, urls=urls, regions=", ".join(regions), items=items)


@pytest.fixture(scope="module")
def net() -> Iterator[netns.RegionNet]:
    with region_network(REGIONS, tag="9" + secrets.token_hex(3), base="10.79") as created:
        yield created


@pytest.fixture
def proxies(net: netns.RegionNet, tmp_path: Path) -> Iterator[dict[str, Proxy]]:
    """eu: two tinyproxy exits (with a password); us: one dante SOCKS5 exit."""
    started: dict[str, Proxy] = {}
    try:
        started["eu1"] = start_tinyproxy(net.hosts["eu"], tmp_path, 18410, ("geo", PASSWORD))
        started["eu2"] = start_tinyproxy(net.hosts["eu"], tmp_path, 18411, ("geo", PASSWORD))
        started["us"] = start_dante(net.hosts["us"], tmp_path, 18420)
        yield started
    finally:
        for proxy in started.values():
            proxy.stop()


@pytest.fixture
def catalog(net: netns.RegionNet) -> GeoCatalog:
    return GeoCatalog(
        {r: Locale(net.hosts[r].subnet, *CURRENCY[r]) for r in REGIONS}, products=PRODUCTS
    )


@pytest.fixture
def geoip(net: netns.RegionNet, tmp_path: Path) -> Path:
    path = tmp_path / "GeoTest-Country.mmdb"
    write_geoip(path, {net.hosts["eu"].subnet: "DE", net.hosts["us"].subnet: "US"})
    return path


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EU_PROXY_PASS", PASSWORD)
    monkeypatch.setenv("COLUMNS", "250")  # rich tables of `status` unwrapped


def eu_proxy(p: Proxy) -> str:
    return f"http://geo:${{EU_PROXY_PASS}}@{p.host}:{p.port}"


def declare(vhost_url: str) -> None:
    """The queues, as central components declare them (workers may not)."""
    with Connection(vhost_url) as conn:
        declare_topology(conn, ["eu", "us", "asia"])


def exits_of(s: Stack) -> dict[str, list[dict[str, Any]]]:
    """region -> the exits its live worker reported."""
    from sqlalchemy import select

    from storage.models import Worker

    with s.sessions()() as session:
        rows = session.scalars(select(Worker).where(Worker.stopped_at.is_(None))).all()
        return {w.region: list(w.exits or []) for w in rows}


def verified(s: Stack, region: str, count: int = 1) -> bool:
    exits = exits_of(s).get(region, [])
    return sum(1 for e in exits if e["verified"]) >= count


def runs(s: Stack, site_name: str) -> list[Any]:
    from storage.queries import list_runs

    with s.sessions()() as session:
        return list_runs(session, site=site_name, limit=100)


def capture_queue(vhost_url: str) -> Queue:
    """A second queue on the ingest exchange: a copy of every message body for the test."""
    queue = Queue(
        f"capture-{uuid.uuid4().hex[:8]}",
        exchange=INGEST_EXCHANGE,
        routing_key=INGEST_ROUTING_KEY,
        durable=False,
    )
    with Connection(vhost_url) as conn:
        queue(conn.default_channel).declare()
    return queue


def drain(vhost_url: str, queue: Queue) -> list[str]:
    bodies: list[str] = []
    with Connection(vhost_url) as conn:
        bound = queue(conn.default_channel)
        while (message := bound.get(no_ack=True)) is not None:
            bodies.append(message.body if isinstance(message.body, str) else message.body.decode())
    return bodies


def store_dump(s: Stack) -> str:
    """Every row of every table, as text."""
    from sqlalchemy import text

    from storage.models import Base

    with s.sessions()() as session:
        return "\n".join(
            repr(row)
            for table in Base.metadata.sorted_tables
            for row in session.execute(text(f"SELECT * FROM {table.name}"))
        )


def test_regions_through_verified_proxy_exits(
    net: netns.RegionNet,
    proxies: dict[str, Proxy],
    catalog: GeoCatalog,
    geoip: Path,
    env: None,
    vhost_url: str,
    sqlite_url: str,
    tmp_path: Path,
) -> None:
    from storage.queries import list_fetches, list_items

    eu, us = net.hosts["eu"], net.hosts["us"]
    with (
        serve(host=net.service_address, catalog=catalog) as shop,
        echo_server(net.service_address) as (echo, _),
    ):
        config = config_text(
            net,
            echo,
            geoip,
            {
                "eu": egress([eu_proxy(proxies["eu1"])], "DE", echo, eu.subnet),
                "us": egress([proxies["us"].url()], "US", echo, us.subnet),
                "asia": "{}",  # direct and unverified
            },
            [
                site("geo", shop.url, ["eu", "us", "asia"]),
                site("geo-scrapy", shop.url, ["eu"], engine="scrapy"),
            ],
        )
        capture = capture_queue(vhost_url)
        with stack(tmp_path, vhost_url, sqlite_url, config) as s:
            from storage.migrate import ensure_schema

            ensure_schema(sqlite_url)
            declare(vhost_url)
            s.ingest()
            for region in ["eu", "us", "asia"]:
                s.worker(region)
            wait_until(lambda: verified(s, "eu") and verified(s, "us"), timeout=90,
                       what="eu and us exits verified")  # fmt: skip
            assert "asia" not in {r for r, e in exits_of(s).items() if e}

            for name in ("geo", "geo-scrapy"):
                crawl = s.cli("crawl", name)
                assert crawl.returncode == 0, crawl.stdout + crawl.stderr
            wait_until(
                lambda: (
                    [r.status for r in runs(s, "geo") + runs(s, "geo-scrapy")] == ["succeeded"] * 4
                ),
                timeout=120,
                what="4 runs succeeded",
            )

            # The shop saw the proxies' addresses for eu and us; asia came direct.
            seen = Counter(catalog.region_of(addr) or addr for addr, _ in shop.access_log)
            print("access log per region:", dict(seen))
            assert seen == {"eu": 2, "us": 1, net.service_address: 1}, seen
            with s.sessions()() as session:
                for region in REGIONS:
                    items = list_items(session, "geo", region=region)
                    got = sorted((i.key, i.data["price"], i.data["currency"]) for i in items)
                    want = sorted(
                        (p["sku"], p["price"], p["currency"])
                        for p in catalog.expected_items_in(region)
                    )
                    assert got == want, region

            # Attestation: runs and fetches carry the egress.
            listed = s.cli("runs", "--site", "geo", "--format", "json")
            assert listed.returncode == 0, listed.stderr
            by_region = {r["region"]: r for r in json.loads(listed.stdout)}
            for region in REGIONS:
                att = by_region[region]["egress"]
                assert att["verified"] is True and by_region[region]["verified"] is True
                assert [e["address"] for e in att["exits"]] == [net.hosts[region].address]
                assert att["exits"][0]["country"] == {"eu": "DE", "us": "US"}[region]
                assert att["exits"][0]["verified_at"]
            assert by_region["eu"]["egress"]["exits"][0]["proxy"] == (
                f"http://geo:***@{eu.address}:18410"
            )
            assert by_region["asia"]["egress"]["verified"] is False
            with s.sessions()() as session:
                for region in ["eu", "us", "asia"]:
                    run_id = by_region[region]["id"]
                    exits = {f.exit_address for f in list_fetches(session, run_id)}
                    want = {net.hosts[region].address} if region in REGIONS else {None}
                    assert exits == want, region
                scrapy_run = runs(s, "geo-scrapy")[0]
                assert scrapy_run.status == "succeeded", scrapy_run.error
                assert {f.exit_address for f in list_fetches(session, scrapy_run.id)} == {
                    eu.address
                }

            # compare: the regional prices; --verified-only leaves asia out.
            every = json.loads(s.cli("compare", "geo", "--format", "json").stdout)
            assert every["unverified"] == ["asia"]
            row = every["rows"][0]
            assert set(row["values"]["currency"].values()) == {"EUR", "USD"}
            assert row["values"]["currency"]["us"] == "USD"
            table = s.cli("compare", "geo")
            assert "unverified egress: the rows of asia" in table.stdout, table.stdout
            only = json.loads(s.cli("compare", "geo", "--verified-only", "--format", "json").stdout)
            assert only["unverified"] == [] and only["verified_only"] is True
            assert {r["region"]: r["run_id"] is not None for r in only["runs"]} == {
                "asia": False, "eu": True, "us": True
            }  # fmt: skip
            assert all(r["values"]["currency"]["asia"] is None for r in only["rows"])
            acc = json.loads(s.cli("access", "geo", "--verified-only", "--format", "json").stdout)
            assert acc["regions"] == ["eu", "us"] and acc["unverified"] == []

            status = s.cli("status")
            assert status.returncode == 0, status.stderr
            assert f"http://geo:***@{eu.address}:18410" in status.stdout
            assert "GeoTest-Country.mmdb=DE" in status.stdout
            assert "GeoTest-Country.mmdb=US" in status.stdout

            with api_server(sqlite_url) as base:
                api_runs = requests.get(f"{base}/runs", params={"site": "geo"}, timeout=30)
                api_compare = requests.get(
                    f"{base}/sites/geo/compare", params={"verified_only": "true"}, timeout=30
                )
            assert api_runs.status_code == 200 and api_compare.status_code == 200
            api_egress = {r["region"]: r["egress"] for r in api_runs.json()["data"]}
            assert api_egress["eu"]["exits"][0]["address"] == eu.address
            assert api_compare.json()["verified_only"] is True

            # The password: in no log line, message body, store row or API response.
            s.stop_all()
            texts = {
                "logs": s.logs() + "".join(p.requests_log() for p in proxies.values()),
                "messages": "\n".join(drain(vhost_url, capture)),
                "store": store_dump(s),
                "api": api_runs.text + api_compare.text,
                "cli": listed.stdout + status.stdout + table.stdout,
            }
            assert texts["messages"].count('"run_started"') >= 4  # the capture did capture
            for where, text in texts.items():
                assert PASSWORD not in text, f"the proxy password leaked into {where}"


def test_an_exit_in_the_wrong_country_takes_no_job_until_fixed(
    net: netns.RegionNet,
    proxies: dict[str, Proxy],
    catalog: GeoCatalog,
    env: None,
    vhost_url: str,
    sqlite_url: str,
    tmp_path: Path,
) -> None:
    eu = net.hosts["eu"]
    geoip = tmp_path / "GeoTest-Country.mmdb"
    write_geoip(geoip, {eu.subnet: "FR"})  # eu's exit geolocates to France, not Germany
    with (
        serve(host=net.service_address, catalog=catalog) as shop,
        echo_server(net.service_address) as (echo, _),
    ):
        config = config_text(
            net,
            echo,
            geoip,
            {"eu": egress([eu_proxy(proxies["eu1"])], "DE", echo, eu.subnet)},
            [site("geo", shop.url, ["eu"])],
        )
        with stack(tmp_path, vhost_url, sqlite_url, config) as s:
            from storage.migrate import ensure_schema

            ensure_schema(sqlite_url)
            declare(vhost_url)
            s.ingest()
            worker = s.worker("eu")
            why = f"address {eu.address} is in FR per GeoTest-Country.mmdb, not DE"
            wait_until(
                lambda: any(e["reason"] == why for e in exits_of(s).get("eu", [])),
                timeout=90,
                what="the eu exit reported as failed",
            )
            assert s.cli("crawl", "geo").returncode == 0
            status = s.cli("status")
            assert why in status.stdout and "NO" in status.stdout, status.stdout

            # The job waits in the queue: nobody consumes it, the region takes 0 jobs.
            def queue_state() -> tuple[int, int]:
                with Connection(vhost_url) as conn:
                    _, waiting, consumers = scrape_queue("eu")(conn.default_channel).queue_declare(
                        passive=True
                    )
                return waiting, consumers

            wait_until(lambda: queue_state() == (1, 0), timeout=30, what="job queued, 0 consumers")
            assert [r.status for r in runs(s, "geo")] == ["queued"]
            assert shop.access_log == []

            # Fix the database: the same worker process verifies the exit and takes the job.
            write_geoip(geoip, {eu.subnet: "DE"})
            wait_until(
                lambda: [r.status for r in runs(s, "geo")] == ["succeeded"],
                timeout=90,
                what="the eu run to succeed after the fix",
            )
            assert worker.poll() is None  # no restart
            assert {addr for addr, _ in shop.access_log} == {eu.address}


@pytest.mark.parametrize("rotate", ["per-request", "per-run"])
def test_a_proxy_killed_mid_crawl(
    rotate: str,
    net: netns.RegionNet,
    proxies: dict[str, Proxy],
    catalog: GeoCatalog,
    geoip: Path,
    env: None,
    vhost_url: str,
    sqlite_url: str,
    tmp_path: Path,
) -> None:
    eu = net.hosts["eu"]
    exits = [eu_proxy(proxies["eu1"]), eu_proxy(proxies["eu2"])]
    with (
        serve(host=net.service_address, catalog=catalog) as shop,
        echo_server(net.service_address) as (echo, _),
    ):
        config = config_text(
            net,
            echo,
            geoip,
            {"eu": egress(exits if rotate == "per-request" else exits[:1], "DE", echo, eu.subnet,
                          rotate=rotate)},
            [site("geo", shop.url, ["eu"], pages=PRODUCTS)],
            delay="0.5s",
        )  # fmt: skip
        with stack(tmp_path, vhost_url, sqlite_url, config) as s:
            from storage.migrate import ensure_schema

            ensure_schema(sqlite_url)
            declare(vhost_url)
            s.ingest()
            s.worker("eu")
            wanted = 2 if rotate == "per-request" else 1
            wait_until(lambda: verified(s, "eu", wanted), timeout=90, what="eu exits verified")
            assert s.cli("crawl", "geo").returncode == 0
            # Mid-crawl: some product pages fetched, not all; then the first exit dies.
            wait_until(lambda: len(shop.access_log) >= 2, timeout=90, what="crawl under way")
            proxies["eu1"].stop()
            wait_until(
                lambda: [r.status for r in runs(s, "geo")] in (["succeeded"], ["failed"]),
                timeout=120,
                what="the run to finish",
            )
            run = runs(s, "geo")[0]
            # Nothing ever left through the direct network (the host's service address).
            assert {addr for addr, _ in shop.access_log} == {eu.address}
            from storage.queries import list_items

            with s.sessions()() as session:
                items = list_items(session, "geo", region="eu")
            if rotate == "per-request":
                assert run.status == "succeeded", run.error
                assert len(items) == PRODUCTS  # 0 items lost
                assert run.egress is not None and len(run.egress["exits"]) == 2
            else:
                assert run.status == "failed"
                assert run.error is not None and "egress proxy" in run.error, run.error
                assert f"http://geo:***@{eu.address}:18410" in run.error
                assert PASSWORD not in run.error
                assert 0 < len(shop.access_log) < PRODUCTS
            s.stop_all()
            assert PASSWORD not in s.logs()
