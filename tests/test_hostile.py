"""Hostile pages through the real pipeline: each is stopped by a limit, the rest is scraped.

One real `geoscrape worker` and `geoscrape ingest` crawl the hostile site
(tests/hostilesite.py) twice, with the Scrapy engine (following links)
and with the requests engine (the hostile URLs listed). The tests then read
the store: the specific error or limit recorded per page, every good item
present exactly once, the worker still alive, and the peak memory of the
worker and of each crawl process under a ceiling.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from storage.models import Item, Observation, Run, fetches
from tests.harness import Stack, stack
from tests.hostilesite import HOSTILE_PATHS, LINKS_PAGE_LINKS, HostileSite, serve_hostile

pytestmark = pytest.mark.slow

MAX_DEPTH = 4
MAX_LINKS = 200
# Ceilings on peak resident memory, with room for a noisy CI machine. The Scrapy
# crawl process idles at ~90 MiB; a bomb or a 64 MiB body read whole would blow these.
CRAWL_RSS_CEILING = 300 * 1024 * 1024
WORKER_RSS_CEILING = 250 * 1024 * 1024

LIMITS = (
    f"{{max_pages: 400, max_depth: {MAX_DEPTH}, timeout: 3s, max_bytes: 4MB, "
    f"max_redirects: 5, max_links: {MAX_LINKS}, max_duration: 90s}}"
)
CONFIG = """\
regions:
  eu: {{}}
defaults:
  politeness: {{delay: 0, concurrency: 8, robots: obey}}
  limits: {limits}
  allow_hosts: ["127.0.0.1:{port}"]
sites:
  - name: hostile-scrapy
    start_urls: ["{base}/index.html"]
    regions: [eu]
    follow: {{allow: ['^{base_re}/']}}
    extract: &extract
      key: sku
      fields:
        sku: {{css: ".sku::text"}}
        h1: {{css: "h1 ::text", join: " "}}
  - name: hostile-requests
    engine: requests
    start_urls: [{listed}]
    regions: [eu]
    extract: *extract
"""
# The requests engine's start URLs: one good page and every hostile page but the
# link traps, which only a crawl that follows links can fall into.
TRAPS = ("/links", "/calendar/2024/1")
LISTED = ("/good/0.html", *(path for path in HOSTILE_PATHS if path not in TRAPS))

# What each hostile page must end as: (HTTP status, error) of its fetch record.
EXPECTED_FETCH = {
    "/bomb/gzip": (None, "max_bytes exceeded"),
    "/bomb/br": (None, "max_bytes exceeded"),
    "/huge": (None, "max_bytes exceeded"),
    "/redirect/0": (None, "Too many redirects"),
    "/drip": (None, "Timeout"),
    "/encoding/bad": (200, None),
    "/encoding/mixed": (200, None),
    "/broken": (200, None),
}


@dataclass
class Crawled:
    site: HostileSite
    stack: Stack
    runs: dict[str, Run]
    fetches: dict[str, list[dict[str, Any]]]  # site name -> fetch rows
    items: dict[str, list[Item]]
    observations: dict[str, list[Observation]]
    worker_alive: bool
    worker_peak_rss: int


def vm_hwm(pid: int) -> int:
    """Peak resident memory of a live process, bytes (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.fixture(scope="module")
def crawled(tmp_path_factory: pytest.TempPathFactory, broker_url: str) -> Iterator[Crawled]:
    workdir = tmp_path_factory.mktemp("hostile")
    with serve_hostile() as site:
        config = CONFIG.format(
            limits=LIMITS,
            port=site.port,
            base=site.url,
            base_re=re.escape(site.url),
            listed=", ".join(f'"{site.url}{path}"' for path in LISTED),
        )
        with stack(workdir, broker_url, f"sqlite:///{workdir}/store.db", config) as s:
            s.ingest()
            worker = s.worker("eu")
            for name in ("hostile-scrapy", "hostile-requests"):
                done = s.cli("crawl", name, "--wait", "--timeout", "150", timeout=200)
                assert done.returncode in (0, 1), done.stdout + done.stderr
            alive = worker.poll() is None
            peak = vm_hwm(worker.pid) if alive else 0
            with s.sessions()() as session:
                runs = {r.site: r for r in session.scalars(select(Run))}
                rows = {
                    name: [
                        dict(row._mapping)
                        for row in session.execute(
                            select(fetches).where(fetches.c.run_id == run.id)
                        )
                    ]
                    for name, run in runs.items()
                }
                items = {n: list(session.scalars(select(Item).where(Item.site == n))) for n in runs}
                observations = {
                    n: list(session.scalars(select(Observation).where(Observation.site == n)))
                    for n in runs
                }
            yield Crawled(site, s, runs, rows, items, observations, alive, peak)


def by_path(crawled: Crawled, name: str) -> dict[str, tuple[int | None, str | None]]:
    base = crawled.site.url
    return {
        row["url"].removeprefix(base): (row["status"], row["error"])
        for row in crawled.fetches[name]
    }


@pytest.mark.parametrize("name", ["hostile-scrapy", "hostile-requests"])
@pytest.mark.parametrize("path", sorted(EXPECTED_FETCH))
def test_each_hostile_page_ends_in_its_limit(crawled: Crawled, name: str, path: str) -> None:
    assert by_path(crawled, name)[path] == EXPECTED_FETCH[path]


@pytest.mark.parametrize("name", ["hostile-scrapy", "hostile-requests"])
def test_the_rest_of_the_site_is_scraped_exactly_once(crawled: Crawled, name: str) -> None:
    run = crawled.runs[name]
    assert run.status == "succeeded", run.error
    expected = HostileSite.expected_items()
    if name == "hostile-requests":  # only the listed pages
        expected = {"good-00", "enc-bad", "enc-mixed", "broken"}
    keys = [i.key for i in crawled.items[name]]
    assert sorted(keys) == sorted(expected)
    assert Counter(o.key for o in crawled.observations[name]) == dict.fromkeys(expected, 1)


def test_invalid_encodings_are_decoded_with_replacement_characters(crawled: Crawled) -> None:
    data = {i.key: i.data for i in crawled.items["hostile-scrapy"]}
    assert data["enc-bad"]["h1"] == "Caf\ufffd \ufffd( \ufffd\ufffd \ufffd(\ufffd\ufffd"
    assert data["enc-mixed"]["h1"].startswith("Grüße 日本語 Gr")
    assert "\x00" not in data["enc-mixed"]["h1"]


def test_a_page_of_100000_links_is_cut_at_max_links(crawled: Crawled) -> None:
    paths = by_path(crawled, "hostile-scrapy")
    assert paths["/links"] == (200, None)
    followed = [p for p in paths if re.fullmatch(r"/links/\d+", p)]
    assert len(followed) == MAX_LINKS
    assert all(paths[p] == (404, None) for p in followed)
    run = crawled.runs["hostile-scrapy"]
    dropped = LINKS_PAGE_LINKS - MAX_LINKS
    assert run.error == f"limit reached: max_links ({MAX_LINKS}/page, {dropped} not followed)"


def test_the_calendar_trap_stops_at_max_depth(crawled: Crawled) -> None:
    # index (depth 0) -> /calendar/2024/1 (1) -> +-1 month per level, up to MAX_DEPTH.
    months = {p for p in by_path(crawled, "hostile-scrapy") if p.startswith("/calendar/")}
    assert len(months) == 2 * (MAX_DEPTH - 1) + 1
    assert "/calendar/2023/10" in months and "/calendar/2024/4" in months
    assert not [p for p in crawled.site.access_log if p in ("/calendar/2023/9", "/calendar/2024/5")]


def test_the_worker_survives_with_bounded_memory(crawled: Crawled) -> None:
    assert crawled.worker_alive, crawled.stack.logs()
    assert 0 < crawled.worker_peak_rss < WORKER_RSS_CEILING, crawled.worker_peak_rss
    for name, run in crawled.runs.items():
        peak = run.stats["peak_rss"]
        print(f"{name}: crawl process peak RSS {peak / 2**20:.0f} MiB")
        assert 0 < peak < CRAWL_RSS_CEILING, (name, peak)
    print(f"worker peak RSS {crawled.worker_peak_rss / 2**20:.0f} MiB")


def test_the_hostile_crawls_stay_within_their_time(crawled: Crawled) -> None:
    # The drip alone would hold a connection for 1000 s; timeout (3 s) bounds it.
    for name, run in crawled.runs.items():
        assert run.stats["duration"] < 60, (name, run.stats)
