"""The dashboard in real headless Chromium, against real `geoscrape api` processes.

One deployment for the module: the geo shop on loopback, `geoscrape ingest`
and workers for eu (from 127.0.0.11) and us (from 127.0.0.12) on a fresh
vhost, a real crawl filling the store, and one dead job made the real way (a
job the wrong region's worker rejects). Each page is screenshotted under the
test's tmp dir; the tests read page content, not status codes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from geoscrape.testsite import serve
from geoscrape.testsite.config import shop_site_yaml
from geoscrape.testsite.geo import GeoCatalog, Locale
from regions.app import CRAWL_TASK, make_app
from regions.bus import connect, declare_topology, scrape_queue
from regions.messages import dump
from scheduler.dispatch import plan_jobs, publish_jobs
from scheduler.loader import load_config
from storage.migrate import upgrade
from storage.models import DeadJob, Run
from tests.conftest import fresh_vhost
from tests.harness import Stack, wait_until

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
WRITE_TOKEN = "let-me-requeue"
PRODUCTS = 6

HEADER = """\
regions:
  eu:
    egress:
      source_address: 127.0.0.11
  us:
    egress:
      source_address: 127.0.0.12
defaults:
  politeness: {{delay: 0, concurrency: 4, robots: obey}}
  limits: {{max_pages: 200, max_depth: 4, timeout: 10s}}
  allow_hosts: ["{host_port}"]
sites:
"""


@dataclass
class Deployment:
    stack: Stack
    api: str  # read-only dashboard
    api_rw: str  # with GEOSCRAPE_API_WRITE_TOKEN
    run_ids: dict[str, str]  # region -> run of the first crawl
    dead_run: str


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_api(stack: Stack, name: str, extra_env: dict[str, str]) -> tuple[str, Any]:
    """Start `geoscrape api` (it comes up while the crawl runs); see _wait_healthy."""
    port = _free_port()
    log = stack.workdir / f"{name}.log"
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "geoscrape.cli", "api", "--port", str(port)],
            env={**stack.env, **extra_env},
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    stack.procs[name] = (proc, log)
    return f"http://127.0.0.1:{port}", proc


def _wait_healthy(url: str, proc: Any) -> str:
    def healthy() -> bool:
        assert proc.poll() is None, f"the API at {url} exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    wait_until(healthy, timeout=90, what=f"{url} to answer /health")
    return url


def _runs(stack: Stack, ids: list[str]) -> list[Run]:
    with stack.sessions()() as session:
        return list(session.scalars(select(Run).where(Run.id.in_(ids))))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("dashboard")
    catalog = GeoCatalog(
        {"eu": Locale("127.0.0.11/32", "EUR", 1.0), "us": Locale("127.0.0.12/32", "USD", 1.1)},
        products=PRODUCTS,
    )
    with (
        fresh_vhost(f"geoscrape-test-dash-{uuid.uuid4().hex[:10]}") as broker,
        serve(catalog=catalog) as shop,
    ):
        config = workdir / "sites.yaml"
        config.write_text(
            HEADER.format(host_port=f"{shop.host}:{shop.port}")
            + shop_site_yaml("shop", shop.url, regions="eu, us")
        )
        stack = Stack(workdir, broker, f"sqlite:///{workdir}/store.db", config)
        upgrade(stack.db_url)
        try:
            api = _start_api(stack, "api", {})
            api_rw = _start_api(stack, "api-rw", {"GEOSCRAPE_API_WRITE_TOKEN": WRITE_TOKEN})
            stack.ingest()
            stack.worker("eu")
            stack.worker("us")
            jobs = plan_jobs(load_config(config), "shop", trigger="manual")
            publish_jobs(jobs, broker)
            ids = [j.run_id for j in jobs]
            wait_until(
                lambda: (
                    len(r := _runs(stack, ids)) == 2 and all(x.status == "succeeded" for x in r)
                ),
                timeout=240,
                interval=0.5,
                what="the first crawl to succeed in eu and us",
            )
            # A dead job the real way: an eu job in us's queue, which us's worker rejects.
            wrong = plan_jobs(load_config(config), "shop", ["eu"], trigger="manual")[0]
            app = make_app(broker, regions=["us"])
            with connect(broker) as conn:
                declare_topology(conn, ["eu", "us"])
            app.send_task(
                CRAWL_TASK,
                args=[dump(wrong)],
                task_id=wrong.run_id,
                queue=scrape_queue("us"),
                routing_key="us",
            )

            def dead() -> bool:
                with stack.sessions()() as session:
                    return session.get(DeadJob, wrong.run_id) is not None

            wait_until(dead, timeout=120, interval=0.5, what="the rejected job in dead_jobs")
            yield Deployment(
                stack=stack,
                api=_wait_healthy(*api),
                api_rw=_wait_healthy(*api_rw),
                run_ids={j.region: j.run_id for j in jobs},
                dead_run=wrong.run_id,
            )
        except BaseException:
            print(stack.logs())
            raise
        finally:
            stack.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: apt-get install chromium"
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def test_overview_lists_regions_and_updates_a_running_crawl_live(
    deployment: Deployment, page: Any, tmp_path: Path
) -> None:
    page.goto(deployment.api + "/")
    regions = page.locator("#regions tbody")
    for region, address in (("eu", "127.0.0.11"), ("us", "127.0.0.12")):
        cells = regions.locator(f"tr[data-region={region}] td")
        assert cells.nth(1).inner_text().strip() == "1"  # workers online
        assert cells.nth(2).locator(".egress").inner_text() == address
        assert "verified" in cells.nth(2).inner_text()
    assert page.locator("#sites").get_by_role("link", name="shop").count() == 1
    page.evaluate("window.__notReloaded = true")

    # A slow crawl of eu: the page must show it move without a reload.
    config = load_config(deployment.stack.config)
    job = plan_jobs(config, "shop", ["eu"], trigger="manual")[0]
    job.config.politeness.delay = 0.6
    publish_jobs([job], deployment.stack.broker_url)
    row = page.locator(f"#progress tr[data-run='{job.run_id}']")
    row.wait_for(timeout=60_000)
    seen: set[str] = set()

    def moved() -> bool:
        if row.count():
            seen.add(row.locator("td.pages").inner_text())
        return len(seen - {"0"}) >= 2

    wait_until(moved, timeout=120, interval=0.3, what=f"two page counts in the row, saw {seen}")
    assert page.evaluate("window.__notReloaded") is True
    page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)
    wait_until(
        lambda: _runs(deployment.stack, [job.run_id])[0].status == "succeeded",
        timeout=120,
        what="the slow crawl to finish",
    )
    row.wait_for(state="detached", timeout=60_000)

    # A phone: nothing wider than the screen but the tables' own scroll boxes.
    phone = page.context.browser.new_context(viewport={"width": 390, "height": 844})
    small = phone.new_page()
    small.goto(deployment.api + "/")
    assert small.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    small.screenshot(path=str(tmp_path / "overview-phone.png"), full_page=True)
    phone.close()


def test_site_page_highlights_differences_and_charts_each_region(
    deployment: Deployment, page: Any, tmp_path: Path
) -> None:
    page.goto(deployment.api + "/ui/sites/shop")
    compare = page.locator("#compare")
    headers = compare.locator("thead th").all_inner_texts()
    assert "price@eu" in headers and "price@us" in headers and "currency@us" in headers
    diffs = compare.locator("td.diff")
    assert diffs.count() >= 2 * PRODUCTS * 2  # price and currency differ for every product
    assert set(diffs.all_inner_texts()) >= {"EUR", "USD"}
    assert page.locator("#access tr[data-region=eu]").inner_text().count("ok") >= 1

    chart = page.locator("#chart[data-series]")
    chart.wait_for(timeout=30_000)
    assert chart.get_attribute("data-series") == "2"
    assert chart.get_attribute("data-regions") == "eu,us"
    legend = page.locator("#chart .u-legend").inner_text()
    assert "eu" in legend and "us" in legend
    assert page.locator("#chart canvas").count() == 1
    runs_chart = page.locator("#runs-chart[data-series]")
    runs_chart.wait_for(timeout=30_000)
    assert runs_chart.get_attribute("data-regions") == "eu,us"
    page.screenshot(path=str(tmp_path / "site.png"), full_page=True)

    # The field picker: price only.
    for box in page.get_by_role("checkbox").all():
        if box.get_attribute("value") != "price":
            box.uncheck()
    page.get_by_role("button", name="Show").click()
    page.wait_for_url("**field=price**")
    headers = page.locator("#compare thead th").all_inner_texts()
    assert [h for h in headers if "@" in h] == ["price@eu", "price@us"]


def test_run_page_shows_stats_codes_and_config(
    deployment: Deployment, page: Any, tmp_path: Path
) -> None:
    page.goto(f"{deployment.api}/ui/runs/{deployment.run_ids['eu']}")
    assert "succeeded" in page.locator("#run").inner_text()
    assert "200x" in page.locator("#codes").inner_text()
    config = json.loads(page.locator("#config").inner_text())
    assert config["config"]["name"] == "shop"
    assert f"{PRODUCTS}" in page.locator("#stats").inner_text()
    page.screenshot(path=str(tmp_path / "run.png"), full_page=True)


def test_metrics_parse_and_match_the_store(deployment: Deployment) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(deployment.api + "/metrics", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(name: str, suffix: str = "") -> dict[tuple[str, ...], float]:
        return {
            tuple(v for _, v in sorted(s.labels.items())): s.value
            for s in families[name].samples
            if s.name == name + suffix
        }

    with deployment.stack.sessions()() as session:
        rows = list(session.scalars(select(Run)))
    expected_runs: dict[tuple[str, ...], float] = {}
    pages: dict[tuple[str, ...], float] = {}
    items: dict[tuple[str, ...], float] = {}
    for run in rows:
        key = (run.region, run.site, run.status)  # labels sorted by name
        expected_runs[key] = expected_runs.get(key, 0) + 1
        pages[(run.region,)] = pages.get((run.region,), 0) + run.stats.get("pages", 0)
        items[(run.region,)] = items.get((run.region,), 0) + run.stats.get("items", 0)
    assert samples("geoscrape_runs", "_total") == expected_runs
    assert samples("geoscrape_pages", "_total") == pages
    assert samples("geoscrape_items", "_total") == items
    assert items[("eu",)] >= PRODUCTS and items[("us",)] >= PRODUCTS
    assert samples("geoscrape_queue_consumers") == {("eu",): 1, ("us",): 1}
    assert set(samples("geoscrape_queue_depth")) == {("eu",), ("us",)}
    ages = samples("geoscrape_worker_heartbeat_age_seconds")
    assert sorted(region for region, _ in ages) == ["eu", "us"]
    assert all(0 <= age < 120 for age in ages.values()), ages
    assert families["geoscrape_ingest_lag_seconds"].samples[0].value >= 0


def test_requeue_needs_the_write_token(deployment: Deployment, page: Any, tmp_path: Path) -> None:
    run = deployment.dead_run
    page.goto(deployment.api + "/ui/dead")
    assert run[:8] in page.locator("#dead").inner_text()
    assert page.get_by_role("button", name=f"Requeue run {run}").count() == 0
    assert "Read-only" in page.inner_text("main")
    page.screenshot(path=str(tmp_path / "dead-readonly.png"), full_page=True)
    request = urllib.request.Request(
        f"{deployment.api}/ui/dead/{run}/requeue", data=b"write_token=x", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    assert "disabled" in json.loads(refused.value.read())["error"]

    page.goto(deployment.api_rw + "/ui/dead")
    button = page.get_by_role("button", name=f"Requeue run {run}")
    page.get_by_label("Write token").fill("wrong")
    button.click()
    page.get_by_role("alert").filter(has_text="wrong write token").wait_for(timeout=30_000)
    assert _runs(deployment.stack, [run])[0].status == "dead"
    page.get_by_label("Write token").fill(WRITE_TOKEN)
    button.click()
    page.get_by_role("status").filter(has_text="requeued run").wait_for(timeout=30_000)
    assert page.get_by_role("alert").inner_text() == ""
    page.screenshot(path=str(tmp_path / "dead.png"), full_page=True)
    # Requeued to eu, whose worker now crawls it.
    wait_until(
        lambda: _runs(deployment.stack, [run])[0].status == "succeeded",
        timeout=120,
        interval=0.5,
        what="the requeued run to succeed",
    )
