"""Scrapy projects run unchanged, and shipped to regions with `geoscrape deploy`.

The project is tests/data/shopproject (a CrawlSpider with Rules, an
ItemLoader with input/output processors, two ITEM_PIPELINES entries: one
drops the garden category, one adds `price_band` and `tag`, `custom_settings`
overriding a project setting). Everything runs through real `geoscrape
worker`, `ingest` and `api` processes against the bundled shop on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from geoscrape.testsite import Catalog, ShopServer, serve
from regions.bus import connect, declare_topology
from regions.messages import FINAL_STATUSES
from scraper.bundle import make_bundle, sha256_hex
from storage.migrate import ensure_schema
from tests.harness import Stack, stack, wait_until

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).parent / "data" / "shopproject"
DROPPED_CATEGORY = "garden"  # shopbot/settings.py: SHOPBOT_DROP_CATEGORY
TOKEN = "eu-code-token"

HEADER = """\
regions:
  eu: {}
defaults:
  limits: {max_pages: 1000, timeout: 20s}
  allow_hosts: ["127.0.0.1"]
sites:
"""


def project_site(name: str, project: str, base: str) -> str:
    return f"""\
  - name: {name}
    regions: [eu]
    project: "{project}"
    spider: catalog
    spider_args: {{base_url: "{base}"}}
    extract: {{key: sku}}
"""


@pytest.fixture
def shop() -> Iterator[ShopServer]:
    with serve(catalog=Catalog(products=16)) as server:
        yield server


@pytest.fixture
def small_shop() -> Iterator[ShopServer]:
    with serve(catalog=Catalog(products=8)) as server:
        yield server


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A private copy of the test project (tests edit and deploy it)."""
    copy = tmp_path / "shopproject"
    shutil.copytree(PROJECT, copy, ignore=shutil.ignore_patterns("__pycache__", ".scrapy"))
    return copy


def start_scrapy_crawl(project: Path, base: str, out: Path) -> subprocess.Popen[str]:
    """A plain `scrapy crawl` of the project, run in its directory as a user would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCRAPY_")}
    args = ["crawl", "catalog", "-a", f"base_url={base}", "-O", f"{out}:jsonlines"]
    return subprocess.Popen(
        [sys.executable, "-m", "scrapy", *args, "-s", "LOG_LEVEL=WARNING"],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def scrapy_crawl_output(proc: subprocess.Popen[str], out: Path) -> list[dict[str, Any]]:
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def runs_of(s: Stack, site: str) -> list[Any]:
    from storage.queries import list_runs

    with s.sessions()() as session:
        return list_runs(session, site=site, limit=100)


def stored(s: Stack, site: str) -> list[dict[str, Any]]:
    from storage.queries import list_items

    with s.sessions()() as session:
        return [row.data for row in list_items(session, site)]


def crawl(s: Stack, site: str) -> Any:
    """Dispatch one run, wait for it, return its row (the newest of the site)."""
    before = {run.id for run in runs_of(s, site)}
    done = s.cli("crawl", site, "--wait", "--timeout", "150", timeout=200)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    [run] = [run for run in runs_of(s, site) if run.id not in before]
    return run


def dispatch(s: Stack, site: str) -> Any:
    """`crawl` in-process (as the CLI does, minus a Python start): wait for the run's end."""
    from scheduler.dispatch import plan_jobs, publish_jobs
    from scheduler.loader import load_config
    from storage.code import code_pinner
    from storage.queries import get_runs

    [job] = plan_jobs(load_config(s.config), site, pin_code=code_pinner(s.db_url))
    publish_jobs([job], s.broker_url)

    def finished() -> Any:
        with s.sessions()() as session:
            runs = get_runs(session, [job.run_id])
        return runs[0] if runs and runs[0].status in FINAL_STATUSES else None

    return wait_until(finished, timeout=150, what=f"run {job.run_id} to finish")


def by_sku(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["sku"]: row for row in rows}


def test_project_through_worker_and_ingest_stores_what_scrapy_crawl_produces(
    tmp_path: Path, vhost_url: str, sqlite_url: str, shop: ShopServer, project: Path
) -> None:
    out = tmp_path / "plain.jsonl"
    plain_crawl = start_scrapy_crawl(project, shop.url, out)  # runs while the stack starts
    config = HEADER + project_site("shopbot", str(project), shop.url)
    with stack(tmp_path, vhost_url, sqlite_url, config) as s:
        checked = s.cli("check", str(s.config))
        assert checked.returncode == 0, checked.stderr
        assert "TELNETCONSOLE_ENABLED=True overridden" in checked.stderr
        assert "DOWNLOAD_TIMEOUT=600 overridden" in checked.stderr

        ensure_schema(sqlite_url)
        s.ingest()
        s.worker("eu")
        run = crawl(s, "shopbot")
        assert run.status == "succeeded", run.error

        plain = scrapy_crawl_output(plain_crawl, out)
        products = shop.catalog.expected_items()
        garden = [p for p in shop.catalog.products if p.category == DROPPED_CATEGORY]
        assert len(plain) == len(products) - len(garden) > 0
        assert all(item["price_band"] in ("v1:low", "v1:high") for item in plain)
        assert {item["tag"] for item in plain} == {"from-custom-settings"}
        # The same items, field for field, the pipeline's fields included.
        items = stored(s, "shopbot")
        assert len(items) == len(plain)
        assert by_sku(items) == by_sku(plain)
        # Dropped by the pipeline (DropItem): counted, not stored.
        assert run.stats["dropped"] == len(garden)
        assert run.stats["items"] == len(plain)
        # The overridden project settings are the run's note.
        assert run.error is not None and "TELNETCONSOLE_ENABLED=True overridden" in run.error
        print(f"\nproject crawl: {len(items)} items stored, `scrapy crawl`: {len(plain)} items")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def deploy(s: Stack, project: Path) -> str:
    done = s.cli("deploy", str(project), "--name", "shopbot")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.split("sha256 ")[1].split(")")[0]


def deploy_in_process(s: Stack, project: Path) -> str:
    """What `geoscrape deploy` does, without a Python start (the CLI is tested once above)."""
    from storage.code import save_bundle

    data = make_bundle(project)
    with s.sessions()() as session:
        ref = save_bundle(session, "shopbot", sha256_hex(data), data)
        session.commit()
    return ref.sha256


def set_pipeline_version(project: Path, version: int) -> None:
    pipelines = project / "shopbot" / "pipelines.py"
    text = pipelines.read_text()
    old = next(line for line in text.splitlines() if line.startswith("PIPELINE_VERSION"))
    pipelines.write_text(text.replace(old, f"PIPELINE_VERSION = {version}"))


def test_deploy_reaches_a_running_worker_and_a_tampered_bundle_never_runs(
    tmp_path: Path,
    vhost_url: str,
    sqlite_url: str,
    small_shop: ShopServer,
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shop = small_shop
    port = free_port()
    cache = tmp_path / "code-cache"
    monkeypatch.setenv("GEOSCRAPE_CODE_TOKEN_EU", TOKEN)  # the API's side
    monkeypatch.setenv("GEOSCRAPE_CODE_URL", f"http://127.0.0.1:{port}")  # the worker's side
    monkeypatch.setenv("GEOSCRAPE_CODE_TOKEN", TOKEN)
    monkeypatch.setenv("GEOSCRAPE_CODE_CACHE", str(cache))
    # The worker never sees the project's source: only the deployed bundle.
    config = HEADER + project_site("shopbot", "deployed:shopbot", shop.url)
    with stack(tmp_path, vhost_url, sqlite_url, config) as s:
        with connect(vhost_url) as conn:  # as central components do, so the worker gets ready
            declare_topology(conn, {"eu"})
        ensure_schema(sqlite_url)
        s.ingest()
        worker = s.worker("eu")
        s.start("api", "api", "--port", str(port))
        api = f"http://127.0.0.1:{port}"
        wait_until(lambda: _healthy(api), timeout=60, what="the API")
        wait_until(lambda: " ready." in s.log("worker-eu"), timeout=90, what="the worker")

        first = deploy(s, project)
        run1 = dispatch(s, "shopbot")
        assert run1.status == "succeeded", run1.error
        assert run1.code_version == f"shopbot@{first[:12]}"
        assert {i["price_band"][:3] for i in stored(s, "shopbot")} == {"v1:"}
        assert (cache / first / "scrapy.cfg").is_file()

        # A changed pipeline, deployed: the next run uses it, same worker process.
        set_pipeline_version(project, 2)
        second = deploy_in_process(s, project)
        assert second != first
        run2 = dispatch(s, "shopbot")
        assert run2.status == "succeeded", run2.error
        assert run2.code_version == f"shopbot@{second[:12]}"
        assert {i["price_band"][:3] for i in stored(s, "shopbot")} == {"v2:"}
        assert worker.poll() is None and run2.worker == run1.worker  # never restarted

        # The code endpoint wants the region's token.
        assert requests.get(f"{api}/code/{second}", timeout=10).status_code == 401
        wrong = {"X-Geoscrape-Region": "eu", "Authorization": "Bearer nope"}
        assert requests.get(f"{api}/code/{second}", headers=wrong, timeout=10).status_code == 401

        # A bundle altered in the store after deploy: refused, the run fails, nothing runs.
        set_pipeline_version(project, 3)
        third = deploy_in_process(s, project)
        set_pipeline_version(project, 6)
        _tamper(s, third, make_bundle(project))
        shop.clear_log()
        run3 = dispatch(s, "shopbot")
        assert run3.status == "failed"
        assert run3.error is not None and "refused" in run3.error and third in run3.error
        assert run3.stats["pages"] == 0 and run3.stats["items"] == 0
        assert not (cache / third).exists()
        assert {i["price_band"][:3] for i in stored(s, "shopbot")} == {"v2:"}
        assert shop.access_log == []  # not one request: the spider never started

        # JSON: the table's narrow columns may wrap a long code version.
        listing = s.cli("runs", "--site", "shopbot", "--format", "json")
        assert listing.returncode == 0, listing.stderr
        versions = {r["code_version"] for r in json.loads(listing.stdout)}
        assert {f"shopbot@{first[:12]}", f"shopbot@{second[:12]}"} <= versions, versions


def _healthy(api: str) -> bool:
    try:
        return requests.get(f"{api}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _tamper(s: Stack, sha256: str, evil: bytes) -> None:
    """Swap the stored bytes of a bundle for others (as someone with write access could)."""
    from sqlalchemy import update

    from storage.models import CodeBundle

    with s.sessions()() as session:
        session.execute(update(CodeBundle).where(CodeBundle.sha256 == sha256).values(content=evil))
        session.commit()
