"""Crawls end to end: run_job -> real `python -m scraper.child` -> the local shop.

Everything talks to 127.0.0.1 only: the shop from geoscrape.testsite and, for
redirects and slow pages, a tiny extra server defined here.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from pydantic import BaseModel

from geoscrape.testsite import Catalog, ShopServer, serve
from regions.messages import (
    Fetch,
    ItemBatch,
    Job,
    RunFinished,
    RunProgress,
    RunStarted,
    ScrapedItem,
)
from scheduler.config import Config
from scraper.batching import Batcher
from scraper.protocol import Done, ProtocolError, decode_event, encode_done
from scraper.runner import run_job

PRODUCT_FIELDS = {
    "sku": {"css": ".sku::text"},
    "name": {"css": "h1::text"},
    "price": {"css": ".price::text", "type": "price"},
    "currency": {"css": ".price::attr(data-currency)"},
}
CARD_FIELDS = {
    "sku": {"css": "::attr(data-sku)"},
    "name": {"css": ".name::text"},
    "price": {"css": ".price::text", "type": "price"},
    "currency": {"css": ".price::attr(data-currency)"},
}
FAST = {"delay": 0, "concurrency": 8}


# -- fixtures and helpers ----------------------------------------------------------


@pytest.fixture(scope="module")
def shop() -> Iterator[ShopServer]:
    with serve() as server:
        yield server


class _Extra(BaseHTTPRequestHandler):
    """/moved -> 302 to the shop's prices page; /slow, /slower -> a page after a pause."""

    target = ""
    pauses = {"/slow": 1.5, "/slower": 30.0}

    def do_GET(self) -> None:
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", self.target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path in self.pauses:
            time.sleep(self.pauses[self.path])
            body = b"<html><body><p>slow</p></body></html>"
        elif self.path == "/robots.txt":
            body = b""
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def extra(shop: ShopServer) -> Iterator[str]:
    handler = type("Extra", (_Extra,), {"target": shop.url + "/prices.html"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    """A port nothing listens on: bound, then released."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


def make_job(**site: Any) -> Job:
    """A Job exactly as dispatch builds it: YAML-shaped config -> resolved site."""
    site.setdefault("name", "shop")
    site.setdefault("regions", ["eu"])
    site.setdefault("politeness", FAST)
    site.setdefault("allow_hosts", ["127.0.0.1"])  # the SSRF guard refuses loopback otherwise
    config = Config.model_validate({"regions": {"eu": None}, "sites": [site]})
    resolved = config.resolved_site(site["name"])
    return Job(
        run_id=uuid.uuid4().hex,
        site=site["name"],
        region="eu",
        config=resolved.model_dump(mode="json"),
    )


class Run:
    def __init__(self, job: Job, **kwargs: Any) -> None:
        self.messages: list[BaseModel] = []
        started = time.monotonic()
        self.finished = run_job(job, self.messages.append, worker="test-worker", **kwargs)
        self.seconds = time.monotonic() - started

    @property
    def batches(self) -> list[ItemBatch]:
        return [m for m in self.messages if isinstance(m, ItemBatch)]

    @property
    def items(self) -> list[ScrapedItem]:
        return [item for batch in self.batches for item in batch.items]

    @property
    def fetches(self) -> list[Fetch]:
        return [fetch for batch in self.batches for fetch in batch.fetches]

    def products(self) -> set[tuple[Any, ...]]:
        return {
            (i.data["sku"], i.data["name"], i.data["price"], i.data["currency"]) for i in self.items
        }


def catalog_products(catalog: Catalog) -> set[tuple[Any, ...]]:
    return {(i["sku"], i["name"], i["price"], i["currency"]) for i in catalog.expected_items()}


def assert_well_formed(run: Run, job: Job) -> None:
    """RunStarted first, RunFinished last, batches numbered 0.., stats match the batches."""
    assert isinstance(run.messages[0], RunStarted)
    assert run.messages[0].worker == "test-worker"
    assert run.messages[-1] is run.finished
    assert all(not isinstance(m, RunStarted | RunFinished) for m in run.messages[1:-1])
    assert [b.seq for b in run.batches] == list(range(len(run.batches)))
    assert all(b.items or b.fetches for b in run.batches)
    assert {(m.run_id, m.site, m.region) for m in run.messages} == {  # type: ignore[attr-defined]
        (job.run_id, job.site, job.region)
    }
    stats = run.finished.stats
    assert stats.items == len(run.items) == len({i.key for i in run.items})
    assert stats.pages == sum(f.status is not None for f in run.fetches)
    assert stats.errors == sum(f.error is not None for f in run.fetches)
    assert stats.bytes == sum(f.bytes for f in run.fetches)
    assert sum(stats.status_codes.values()) == stats.pages


def shop_crawl_job(shop: ShopServer, **overrides: Any) -> Job:
    site: dict[str, Any] = {
        "start_urls": [f"{shop.url}/index.html"],
        "follow": {"allow": [rf"^{shop.url}/(product|category)/"]},
        "extract": {"pages": [rf"^{shop.url}/product/"], "key": "sku", "fields": PRODUCT_FIELDS},
    }
    site.update(overrides)
    return make_job(**site)


# -- the Scrapy engine ---------------------------------------------------------------


def test_scrapy_crawl_finds_exactly_the_catalog(shop: ShopServer) -> None:
    shop.clear_log()
    job = shop_crawl_job(shop)
    run = Run(job, batch_items=25, batch_seconds=3600)
    print(f"60-product crawl took {run.seconds:.2f}s (crawl {run.finished.stats.duration}s)")

    assert run.finished.status == "succeeded", run.finished.error
    assert run.finished.error is None
    assert_well_formed(run, job)
    assert run.products() == catalog_products(shop.catalog)
    assert len(run.items) == 60
    assert {i.key for i in run.items} == {p.sku for p in shop.catalog.products}
    assert all(i.url == f"{shop.url}/product/{i.key}.html" for i in run.items)

    crawled = {f.url for f in run.fetches}
    expected = {f"{shop.url}/index.html"}
    expected |= {
        f"{shop.url}/category/{c}/page/{n}.html" for c in shop.catalog.categories for n in (1, 2)
    }
    expected |= {f"{shop.url}/product/{p.sku}.html" for p in shop.catalog.products}
    assert crawled == expected and len(run.fetches) == 69
    assert all(f.status == 200 and f.error is None and f.final_url is None for f in run.fetches)
    assert run.finished.stats.status_codes == {"200": 69}
    assert run.finished.stats.errors == 0

    # 60 items + 69 fetches in batches of 25, never cut by time
    assert [len(b.items) + len(b.fetches) for b in run.batches] == [25, 25, 25, 25, 25, 4]

    # robots.txt was read once and is not a page; no request beyond the allowed pages
    paths = [path for _, path in shop.access_log]
    assert paths.count("/robots.txt") == 1
    assert sorted(p for p in paths if p != "/robots.txt") == sorted(
        u.removeprefix(shop.url) for u in expected
    )


@pytest.mark.parametrize(("robots", "fetched"), [("obey", False), ("ignore", True)])
def test_robots_txt_keeps_the_crawl_out_of_private(
    shop: ShopServer, robots: str, fetched: bool
) -> None:
    shop.clear_log()
    job = shop_crawl_job(
        shop,
        follow={"allow": [rf"^{shop.url}/"]},
        politeness={**FAST, "robots": robots},
    )
    run = Run(job)
    assert run.finished.status == "succeeded", run.finished.error
    private = f"{shop.url}/private/secret.html"
    assert (private in {f.url for f in run.fetches}) is fetched
    assert (("127.0.0.1", "/private/secret.html") in shop.access_log) is fetched
    assert run.finished.stats.pages == 71 + fetched  # every HTML page, plus /private/
    assert run.products() == catalog_products(shop.catalog)


def test_scrapy_max_pages_stops_the_crawl(shop: ShopServer) -> None:
    shop.clear_log()
    job = shop_crawl_job(shop, limits={"max_pages": 10}, politeness={**FAST, "concurrency": 4})
    run = Run(job)
    assert run.finished.status == "succeeded", run.finished.error
    assert run.finished.stats.pages == 10
    assert len(run.fetches) == 10
    assert all(f.status == 200 for f in run.fetches)
    # in-flight requests may still reach the server, but scheduling stopped early
    assert len([p for _, p in shop.access_log if p != "/robots.txt"]) < 10 + 4


def test_scrapy_max_depth(shop: ShopServer) -> None:
    # depth 1: the index and the category first pages it links to, nothing deeper
    job = shop_crawl_job(
        shop, follow={"allow": [rf"^{shop.url}/(product|category)/"], "max_depth": 1}
    )
    run = Run(job)
    assert run.finished.status == "succeeded", run.finished.error
    assert {f.url.removeprefix(shop.url) for f in run.fetches} == {"/index.html"} | {
        f"/category/{c}/page/1.html" for c in shop.catalog.categories
    }
    assert run.items == []


def test_scrapy_records_http_errors_and_redirects(shop: ShopServer, extra: str) -> None:
    job = make_job(
        start_urls=[f"{shop.url}/missing.html", f"{extra}/moved"],
        extract={"items": "div.product", "key": "sku", "fields": CARD_FIELDS},
    )
    run = Run(job)
    assert run.finished.status == "succeeded", run.finished.error
    by_url = {f.url: f for f in run.fetches}
    assert by_url[f"{shop.url}/missing.html"].status == 404
    moved = by_url[f"{extra}/moved"]
    assert (moved.status, moved.final_url) == (200, f"{shop.url}/prices.html")
    assert len(run.fetches) == 2
    assert run.finished.stats.status_codes == {"200": 1, "404": 1}
    assert run.products() == catalog_products(shop.catalog)  # nothing from the 404 page
    assert {i.url for i in run.items} == {f"{shop.url}/prices.html"}


def test_existing_spider_runs_unchanged(shop: ShopServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOSHOP_URL", shop.url)
    # the spider print()s every product: stdout must not reach the event stream
    job = make_job(
        spider="tests.spiders:ShopSpider",
        extract={"key": "sku", "fields": {"sku": {"css": "x"}}},
    )
    run = Run(job)
    assert run.finished.status == "succeeded", run.finished.error
    assert_well_formed(run, job)
    assert run.products() == catalog_products(shop.catalog)
    assert {i.key for i in run.items} == {p.sku for p in shop.catalog.products}
    assert [f.url for f in run.fetches] == [f"{shop.url}/prices.html"]


def test_existing_spider_without_key_gets_stable_hash_keys(
    shop: ShopServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEOSHOP_URL", shop.url)
    job = make_job(spider="tests.spiders:ShopSpider")
    first, second = Run(job), Run(job)
    assert first.finished.status == second.finished.status == "succeeded"
    keys = sorted(i.key for i in first.items)
    assert len(set(keys)) == 60 and all(len(k) == 32 for k in keys)
    assert keys == sorted(i.key for i in second.items)


def test_unknown_spider_fails_the_run() -> None:
    run = Run(make_job(spider="nowhere.at_all:Spider"))
    assert run.finished.status == "failed"
    assert run.finished.error is not None
    assert run.finished.error.startswith("cannot load spider 'nowhere.at_all:Spider'")
    assert run.fetches == []


def test_child_dying_without_done_fails_with_its_stderr(
    shop: ShopServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEOSHOP_URL", shop.url)
    run = Run(make_job(spider="tests.spiders:CrashingSpider"))
    assert run.finished.status == "failed"
    error = run.finished.error or ""
    assert error.startswith("crawl process died without finishing (exit code 3)")
    assert error.endswith("CrashingSpider: pulling the plug")
    assert run.messages[-1] is run.finished


# -- the requests engine -------------------------------------------------------------


def prices_job_for(*urls: str, **overrides: Any) -> Job:
    site: dict[str, Any] = {
        "engine": "requests",
        "start_urls": list(urls),
        "extract": {"items": "div.product", "key": "sku", "fields": CARD_FIELDS},
    }
    site.update(overrides)
    return make_job(**site)


def prices_job(shop: ShopServer, **overrides: Any) -> Job:
    site: dict[str, Any] = {
        "engine": "requests",
        "start_urls": [f"{shop.url}/prices.html"],
        "extract": {"items": "div.product", "key": "sku", "fields": CARD_FIELDS},
    }
    site.update(overrides)
    return make_job(**site)


def test_requests_engine_prices_page_finds_exactly_the_catalog(shop: ShopServer) -> None:
    shop.clear_log()
    job = prices_job(shop)
    run = Run(job)
    assert run.finished.status == "succeeded", run.finished.error
    assert_well_formed(run, job)
    assert run.products() == catalog_products(shop.catalog)
    assert len(run.items) == 60
    page = requests.get(f"{shop.url}/prices.html", timeout=5).content
    assert run.fetches == [
        Fetch(
            url=f"{shop.url}/prices.html",
            status=200,
            bytes=len(page),
            sha256=hashlib.sha256(page).hexdigest(),
        )
    ]
    assert run.fetches[0].bytes == len(requests.get(f"{shop.url}/prices.html", timeout=5).content)
    assert run.finished.stats.model_dump(
        exclude={
            "duration",
            "bytes",
            "peak_rss",
            "dropped",
            "rate_wait",
            "rate_pauses",
            "rate_strikes",
        }
    ) == {
        "pages": 1,
        "items": 60,
        "errors": 0,
        "status_codes": {"200": 1},
    }
    assert [p for _, p in shop.access_log][:2] == ["/robots.txt", "/prices.html"]


def test_requests_engine_obeys_robots(shop: ShopServer) -> None:
    shop.clear_log()
    run = Run(
        prices_job(shop, start_urls=[f"{shop.url}/private/secret.html", f"{shop.url}/prices.html"])
    )
    assert run.finished.status == "succeeded"
    assert [f.url for f in run.fetches] == [f"{shop.url}/prices.html"]
    assert all("/private/" not in p for _, p in shop.access_log)

    only_private = Run(prices_job(shop, start_urls=[f"{shop.url}/private/secret.html"]))
    assert only_private.finished.status == "failed"
    assert only_private.finished.error == ("no page was fetched (1 URL(s) forbidden by robots.txt)")


def test_requests_engine_follows_redirects_and_records_final_url(
    shop: ShopServer, extra: str
) -> None:
    run = Run(prices_job(shop, start_urls=[f"{extra}/moved", f"{shop.url}/nope.html"]))
    assert run.finished.status == "succeeded"
    assert run.fetches[0].model_dump(exclude={"bytes", "sha256"}) == {
        "url": f"{extra}/moved",
        "status": 200,
        "error": None,
        "final_url": f"{shop.url}/prices.html",
        "exit": None,  # no egress proxy: the worker's own network
        "sample": 0,
        "block": None,
        "body": None,
        "headers": None,
    }
    assert (run.fetches[1].status, run.fetches[1].final_url) == (404, None)
    assert run.products() == catalog_products(shop.catalog)
    assert {i.url for i in run.items} == {f"{shop.url}/prices.html"}


@pytest.mark.parametrize("engine", ["requests", "scrapy"])
def test_max_bytes_stops_a_big_page(shop: ShopServer, engine: str) -> None:
    run = Run(prices_job(shop, engine=engine, limits={"max_bytes": "4KB"}))
    assert run.finished.status == "failed"
    assert run.fetches == [
        Fetch(url=f"{shop.url}/prices.html", status=None, error="max_bytes exceeded")
    ]
    assert run.items == []
    assert run.finished.error == f"max_bytes exceeded ({shop.url}/prices.html)"


# -- failures ------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["scrapy", "requests"])
def test_connection_refused_fails_the_run(engine: str) -> None:
    url = f"http://127.0.0.1:{closed_port()}/index.html"
    job = make_job(
        engine=engine,
        start_urls=[url],
        extract={"fields": {"title": {"css": "title::text"}}},
    )
    run = Run(job)
    assert run.finished.status == "failed"
    assert run.finished.error == f"Connection refused ({url})"
    assert run.fetches == [Fetch(url=url, status=None, error="Connection refused")]
    assert run.finished.stats.pages == 0
    assert run.finished.stats.errors == 1
    assert_well_formed(run, job)


def test_one_refused_url_among_good_ones_still_succeeds(shop: ShopServer) -> None:
    bad = f"http://127.0.0.1:{closed_port()}/"
    run = Run(prices_job(shop, start_urls=[bad, f"{shop.url}/prices.html"]))
    assert run.finished.status == "succeeded"
    assert [(f.url, f.status) for f in run.fetches] == [
        (bad, None),
        (f"{shop.url}/prices.html", 200),
    ]
    assert run.finished.stats.errors == 1
    assert len(run.items) == 60


# -- batching and progress -----------------------------------------------------------


def test_batches_by_count(shop: ShopServer) -> None:
    job = prices_job(shop)
    run = Run(job, batch_items=7, batch_seconds=3600)
    # 60 items + 1 fetch = 61 entries -> 8 full batches of 7, then 5
    assert [b.seq for b in run.batches] == list(range(9))
    assert [len(b.items) + len(b.fetches) for b in run.batches] == [7] * 8 + [5]
    keys = [i.key for i in run.items]
    assert len(keys) == len(set(keys)) == 60  # every item in exactly one batch
    assert sum(len(b.fetches) for b in run.batches) == 1


def test_batches_by_time_and_progress_while_the_child_is_silent(
    shop: ShopServer, extra: str
) -> None:
    job = prices_job(shop, start_urls=[f"{shop.url}/prices.html", f"{extra}/slow"])
    run = Run(job, batch_items=1000, batch_seconds=0.3, progress_seconds=0.2)
    assert run.finished.status == "succeeded"
    # the prices page's 60 items + its fetch go out by time while /slow is pending
    assert [(b.seq, len(b.items), len(b.fetches)) for b in run.batches] == [(0, 60, 1), (1, 0, 1)]
    progress = [m for m in run.messages if isinstance(m, RunProgress)]
    assert len(progress) >= 4  # /slow alone takes 1.5s
    assert [p.stats.items for p in progress] == sorted(p.stats.items for p in progress)
    assert progress[-1].stats.items == 60
    index = run.messages.index
    assert index(run.batches[0]) < index(progress[-1]) < index(run.batches[1])


def test_batcher_units() -> None:
    now = [100.0]
    batcher = Batcher("r", "s", "eu", max_entries=3, max_seconds=2.0, clock=lambda: now[0])
    item = ScrapedItem(key="k", url="u", data={})
    fetch = Fetch(url="u", status=200)
    assert batcher.flush() is None and batcher.deadline() is None and batcher.poll() is None
    assert batcher.add_item(item) is None
    assert batcher.deadline() == 102.0
    now[0] = 101.0
    assert batcher.add_fetch(fetch) is None and batcher.poll() is None
    full = batcher.add_item(item)
    assert full is not None and (full.seq, len(full.items), len(full.fetches)) == (0, 2, 1)
    assert len(batcher) == 0 and batcher.deadline() is None
    now[0] = 200.0
    assert batcher.add_fetch(fetch) is None
    now[0] = 201.9
    assert batcher.poll() is None
    now[0] = 202.0
    due = batcher.poll()
    assert due is not None and (due.seq, due.items, due.fetches) == (1, [], [fetch])
    assert (due.run_id, due.site, due.region) == ("r", "s", "eu")
    assert batcher.add_item(item) is None
    last = batcher.flush()
    assert last is not None and last.seq == 2 and batcher.flush() is None
    with pytest.raises(ValueError):
        Batcher("r", "s", "eu", max_entries=0)


def test_protocol_round_trip_and_rejects() -> None:
    from regions.messages import RunStats

    stats = RunStats(pages=2, items=1, errors=0, bytes=10, duration=0.5, status_codes={"200": 2})
    assert decode_event(encode_done("succeeded", None, stats)) == Done("succeeded", None, stats)
    with pytest.raises(ProtocolError):
        decode_event(b"not json")
    with pytest.raises(ProtocolError):
        decode_event(json.dumps({"event": "done", "status": "maybe", "stats": {}}))
    with pytest.raises(ProtocolError):
        decode_event(json.dumps({"event": "other"}))


# -- process model -------------------------------------------------------------------


def test_five_consecutive_scrapy_runs_in_one_process(shop: ShopServer) -> None:
    job = prices_job(shop, engine="scrapy")
    for _ in range(5):
        run = Run(job)
        assert run.finished.status == "succeeded", run.finished.error
        assert run.products() == catalog_products(shop.catalog)


def test_the_parent_never_imports_scrapy_or_twisted(shop: ShopServer) -> None:
    job = prices_job(shop, engine="scrapy")
    code = textwrap.dedent(
        """
        import json, sys
        from regions.messages import Job
        from scraper.runner import run_job
        job = Job.model_validate_json(sys.stdin.read())
        messages = []
        finished = run_job(job, messages.append, worker="w")
        leaked = sorted(
            m for m in sys.modules
            if m.split(".")[0] in ("scrapy", "twisted")
        )
        print(json.dumps({"status": finished.status, "items": finished.stats.items,
                          "leaked": leaked}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=job.model_dump_json(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"status": "succeeded", "items": 60, "leaked": []}


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_killing_the_worker_kills_its_crawl(extra: str) -> None:
    job = prices_job_for(f"{extra}/slower")
    code = textwrap.dedent(
        """
        import sys
        from regions.messages import Job
        from scraper.runner import run_job
        job = Job.model_validate_json(sys.stdin.readline())
        run_job(job, lambda m: print(m.kind, flush=True), worker="w")
        """
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    crawl: list[int] = []
    try:
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write(job.model_dump_json() + "\n")
        worker.stdin.flush()
        assert worker.stdout.readline() == "run_started\n"
        deadline = time.monotonic() + 20
        while not crawl and time.monotonic() < deadline:
            crawl = _children_of(worker.pid)
            time.sleep(0.05)
        assert len(crawl) == 1
        with open(f"/proc/{crawl[0]}/cmdline", "rb") as cmdline:
            assert cmdline.read().split(b"\0")[1:3] == [b"-m", b"scraper.child"]
        assert os.getpgid(crawl[0]) == crawl[0]  # its own process group
        worker.kill()
        worker.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(crawl[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(crawl[0])
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        for pid in crawl:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_timeout_kills_a_hanging_crawl(extra: str) -> None:
    started = time.monotonic()
    run = Run(prices_job_for(f"{extra}/slower"), timeout=1.0)
    assert time.monotonic() - started < 10
    assert run.finished.status == "failed"
    assert run.finished.error == "crawl timed out after 1.0s"
    assert run.fetches == []
