"""The shared rate budget (scraper/ratelimit.py): units, the Redis GCRA, and crawls.

The crawl tests run real crawl children (scraper.runner.run_job) against a
local generated site with an access log; the budget lives in the shared Redis
under the test's own prefix, or in a redis-server this test starts and stops.
"""

from __future__ import annotations

import itertools
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from regions.messages import Job, RunFinished
from regions.site import ResolvedSite
from regions.units import parse_rate
from scheduler.config import Config
from scraper.ratelimit import (
    HEADROOM,
    LATE,
    Budget,
    Slot,
    registrable_domain,
    retry_after_seconds,
    scope_of,
)
from scraper.runner import run_job
from tests.harness import wait_until
from tests.pagesite import PageSite, max_in_window, serve_pages

FIELDS = {"id": {"css": ".id::text"}, "title": {"css": "h1::text"}}


def site_config(url: str, **politeness: Any) -> dict[str, Any]:
    """A resolved site crawling `url`'s tree with the given politeness."""
    config = Config.model_validate(
        {
            "regions": {"eu": {}},
            "defaults": {"allow_hosts": ["127.0.0.1"]},
            "sites": [
                {
                    "name": "pages",
                    "regions": ["eu"],
                    "start_urls": [f"{url}/p/0.html"],
                    "follow": {"allow": ["/p/"]},
                    "extract": {"key": "id", "fields": FIELDS},
                    "politeness": {"delay": 0, "concurrency": 4, **politeness},
                    "limits": {"max_depth": 20, "timeout": "5s"},
                }
            ],
        }
    )
    return config.resolved_site("pages").model_dump(mode="json")


def crawl(config: dict[str, Any]) -> tuple[RunFinished, list[BaseModel]]:
    job = Job(run_id=str(uuid.uuid4()), site="pages", region="eu", config=config)
    published: list[BaseModel] = []
    finished = run_job(job, published.append, worker="test", timeout=120)
    return finished, published


def crawl_in_threads(configs: list[dict[str, Any]]) -> list[RunFinished]:
    results: list[RunFinished | BaseException] = [RuntimeError("not run")] * len(configs)

    def one(i: int) -> None:
        try:
            results[i] = crawl(configs[i])[0]
        except BaseException as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(configs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [r for r in results if isinstance(r, RunFinished)]


# -- units -----------------------------------------------------------------------


def test_rates_parse() -> None:
    assert parse_rate("10/s") == 10.0
    assert parse_rate("600/min") == 10.0
    assert parse_rate("36/h") == 0.01
    assert parse_rate(2) == 2.0
    with pytest.raises(ValueError, match="not a rate"):
        parse_rate("10 per second")


def test_rate_config_errors_name_the_field() -> None:
    base = {"regions": {"eu": {}}, "sites": []}
    with pytest.raises(ValidationError, match="rate"):
        Config.model_validate({**base, "defaults": {"politeness": {"rate": "fast"}}})
    with pytest.raises(ValidationError, match="rate_scope"):
        Config.model_validate({**base, "defaults": {"politeness": {"rate_scope": "url"}}})
    with pytest.raises(ValidationError, match="greater than 0"):
        Config.model_validate({**base, "defaults": {"politeness": {"rate": 0}}})


def test_old_jobs_without_rate_still_validate() -> None:
    config = site_config("http://127.0.0.1:1")
    for key in ("rate", "rate_scope", "max_retry_after"):
        del config["politeness"][key]
    site = ResolvedSite.model_validate(config)
    assert site.politeness.rate is None and site.politeness.rate_scope == "domain"


def test_scopes(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert registrable_domain("shop.example.co.uk") == "example.co.uk"
    assert registrable_domain("127.0.0.1") == "127.0.0.1"
    assert scope_of("https://a.b.example.com:8443/x", "domain") == "example.com"
    assert scope_of("https://a.b.example.com/x", "host") == "a.b.example.com"
    assert scope_of("https://www.example.com/x", "domain+exit") == "example.com@direct"
    monkeypatch.setenv("https_proxy", "http://user:pw@proxy.example.net:3128")
    assert (
        scope_of("https://www.example.com/x", "domain+exit") == "example.com@proxy.example.net:3128"
    )


def test_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after_seconds("3") == 3.0
    later = (now + timedelta(seconds=90)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert retry_after_seconds(later, now=now) == 90.0
    assert retry_after_seconds("Mon, 01 Jan 2001 00:00:00 GMT", now=now) == 0.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


# -- the budget against real Redis -------------------------------------------------


def budget(redis_prefix: str, **politeness: Any) -> Budget:
    site = ResolvedSite.model_validate(site_config("http://127.0.0.1:1", **politeness))
    return Budget(site, prefix=redis_prefix)


@pytest.mark.timing
def test_budget_spaces_requests_across_clients(redis_prefix: str) -> None:
    clients = [budget(redis_prefix, rate="20/s") for _ in range(3)]
    granted: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 2.0

    def ask(b: Budget) -> None:
        while time.monotonic() < deadline:
            b.wait("http://www.example.com/")
            with lock:
                granted.append(time.monotonic())

    threads = [threading.Thread(target=ask, args=(b,)) for b in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max_in_window(granted) <= 21, granted
    # Slots are reserved, so none is lost between asks: the budget runs at its
    # rate less the 5% headroom (19/s), not at what round trips leave of it.
    rate = (len(granted) - 1) / (granted[-1] - granted[0])
    assert rate >= 18, rate
    assert all(b.note is None for b in clients)


@pytest.mark.timing
def test_a_worker_far_from_redis_gets_its_share(redis_prefix: str) -> None:
    """Its recheck reaches Redis a round trip after it wakes: it aims early, not late."""
    near_ones = [budget(redis_prefix, rate="20/s") for _ in range(2)]
    far = budget(redis_prefix, rate="20/s")
    script = far._remote_reserve()

    def slow(**kwargs: Any) -> object:  # 80 ms round trip to Redis (> LATE)
        time.sleep(0.04)
        reply = script(**kwargs)
        time.sleep(0.04)
        return reply

    far._reserve = slow
    granted: dict[int, int] = {}
    deadline = time.monotonic() + 3.0

    def ask(i: int, b: Budget) -> None:
        granted[i] = 0
        while time.monotonic() < deadline:
            b.wait("http://www.example.com/")
            granted[i] += 1

    threads = [threading.Thread(target=ask, args=x) for x in enumerate([*near_ones, far])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert granted[2] >= sum(granted.values()) / 5, granted  # a fair share is 1/3


def near(seconds: float, expected: float) -> bool:
    # Time passes between the asks; callers aim LATE / 2 past their slot.
    return expected - 0.1 < seconds <= expected + LATE / 2


def test_a_pause_after_a_reservation_moves_the_slot_past_it(redis_prefix: str) -> None:
    a, b = budget(redis_prefix, rate="1/s"), budget(redis_prefix, rate="1/s")
    url, step = "http://www.example.com/", 1 / HEADROOM
    assert a.reserve(url).wait == 0.0  # the first slot is now
    held = b.reserve(url)
    assert near(held.wait, step)  # the next is one interval on, and b holds it
    assert a.observe(url, 429, "3") == 3.0
    # b's slot falls inside the pause: its recheck reserves one after the pause
    # (and the one after that is an interval on).
    assert near(b.recheck(url, held).wait, 3.0)
    assert near(a.reserve(url).wait, 3.0 + step)


def test_a_late_caller_takes_a_new_slot(redis_prefix: str) -> None:
    a, b = budget(redis_prefix, rate="1/s"), budget(redis_prefix, rate="1/s")
    url, step = "http://www.example.com/", 1 / HEADROOM
    assert a.reserve(url).wait == 0.0
    held = b.reserve(url)
    assert near(held.wait, step)
    assert near(b.recheck(url, held).wait, step)  # early: sleep the rest, same slot
    seconds, micros = b._connect().time()
    now = seconds + micros / 1e6  # Redis's clock, which slots are on
    # On time (came within LATE of its slot): b sends, no new slot.
    assert b.recheck(url, Slot(0.0, now - LATE / 2, remote=True)).wait == 0.0
    assert near(a.reserve(url).wait, 2 * step)  # a holds the slot after b's
    # Late (a stalled crawl): b's slot is gone, it queues behind a's.
    assert near(b.recheck(url, Slot(0.0, now - 2 * LATE, remote=True)).wait, 3 * step)


# -- crawls ----------------------------------------------------------------------


@pytest.fixture
def pages() -> Iterator[PageSite]:
    with serve_pages(PageSite(pages=25)) as site:
        yield site


def test_repeated_429_backs_off_exponentially(redis_prefix: str) -> None:
    b = budget(redis_prefix, rate="100/s", max_retry_after="3s")
    url = "http://www.example.com/"
    assert b.observe(url, 429, None) == 1.0
    assert b.observe(url, 429, None) == 0.0  # a 429 during the pause is no new strike
    b._connect().delete(f"{redis_prefix}rate-pause:example.com")  # as if the pause ended
    assert b.observe(url, 429, "0") == 2.0
    b._connect().delete(f"{redis_prefix}rate-pause:example.com")
    assert b.observe(url, 429, None) == 3.0  # 4 s capped by max_retry_after
    assert b.observe("http://other.org/", 503, None) == 0.0  # a plain 503 pauses nothing
    assert b.strikes == 3 and b.pauses == 3


@pytest.mark.timing
def test_four_crawls_share_one_rate(pages: PageSite, redis_prefix: str) -> None:
    finished = crawl_in_threads([site_config(pages.url, rate="10/s") for _ in range(4)])
    assert [f.status for f in finished] == ["succeeded"] * 4, [f.error for f in finished]
    assert all(f.stats.items == 25 for f in finished)
    hits = [h.at for h in pages.snapshot()]
    assert len(hits) >= 100
    assert max_in_window(hits) <= 11
    assert sum(f.stats.rate_wait for f in finished) > 0


@pytest.mark.timing
def test_429_pauses_the_domain_for_every_crawl(redis_prefix: str) -> None:
    told: list[float] = []
    lock = threading.Lock()

    def answer(path: str, agent: str) -> tuple[int, dict[str, str]] | None:
        with lock:
            if path == "/p/6.html" and agent == "crawler-a" and not told:
                told.append(time.monotonic())
                return 429, {"Retry-After": "3"}
        return None

    with serve_pages(PageSite(pages=25, answer=answer)) as site:
        configs = [
            site_config(site.url, rate="20/s", user_agent=agent)
            for agent in ("crawler-a", "crawler-b")
        ]
        finished = crawl_in_threads(configs)
        hits = site.snapshot()
    assert [f.status for f in finished] == ["succeeded"] * 2
    assert told, "the site never answered 429"
    # Requests already on their way may land just after the 429; then none for 3 s.
    during = [h for h in hits if told[0] + 0.3 < h.at < told[0] + 2.9]
    assert during == [], during
    # Scrapy retried the 429 after the pause: the run's stats show the pause.
    assert sorted(f.stats.rate_pauses for f in finished) == [0, 1]
    assert max(f.stats.rate_strikes for f in finished) == 1
    assert all(f.stats.items == 25 for f in finished)  # the 429 page was fetched again


@pytest.mark.timing
def test_robots_crawl_delay_holds_across_crawls(redis_prefix: str) -> None:
    robots = "User-agent: *\nCrawl-delay: 1\nAllow: /\n"
    with serve_pages(PageSite(pages=4, robots=robots)) as site:
        finished = crawl_in_threads(
            [site_config(site.url, robots="obey"), site_config(site.url, robots="obey")]
        )
        times = sorted(h.at for h in site.page_hits())
    assert [f.status for f in finished] == ["succeeded"] * 2
    assert len(times) == 8
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Slots are 1 s apart; what the site sees also carries each request's way from
    # its slot to the socket (a few ms here, run alone: marked `timing`).
    assert min(gaps) >= 0.9, gaps
    assert (times[-1] - times[0]) / len(gaps) >= 0.97, gaps


# -- Redis stopped mid-crawl -----------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A redis-server of this test's own, on a free loopback port."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found: install the redis-server package")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(up, timeout=30, what="own redis-server")
        yield proc, f"redis://127.0.0.1:{port}/0"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.timing
def test_redis_stopped_mid_crawl_falls_back_to_local_politeness(
    own_redis: tuple[subprocess.Popen[bytes], str],
    monkeypatch: pytest.MonkeyPatch,
    redis_prefix: str,
) -> None:
    proc, url = own_redis
    monkeypatch.setenv("GEOSCRAPE_REDIS_URL", url)
    result: list[RunFinished] = []
    with serve_pages(PageSite(pages=40)) as site:
        config = site_config(site.url, rate="20/s")
        crawler = threading.Thread(target=lambda: result.append(crawl(config)[0]))
        crawler.start()
        wait_until(lambda: len(site.page_hits()) >= 10, timeout=60, what="10 pages fetched")
        proc.kill()  # our own redis-server, mid-crawl
        proc.wait()
        stopped_at = time.monotonic()
        crawler.join(timeout=120)
        hits = site.page_hits()
    assert result, "the crawl did not finish"
    finished = result[0]
    assert finished.status == "succeeded", finished.error
    assert finished.error is not None and "local politeness" in finished.error
    assert finished.stats.items == 40 and len({h.path for h in hits}) == 40
    after = [h.at for h in hits if h.at > stopped_at]
    assert after, "no page was fetched after Redis stopped"
    assert max_in_window(after) <= 21  # still throttled: never unthrottled
