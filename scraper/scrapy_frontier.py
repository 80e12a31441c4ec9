"""Scrapy's side of a distributed run: a scheduler over the Redis frontier.

`FrontierScheduler` replaces Scrapy's scheduler (and dupefilter) in a crawl
child of a `distributed: true` site: requests go to the run's frontier
(scraper/frontier.py) and come back from it leased, whichever worker found
them. `FrontierSiteSpider` releases a page once the links found on it are in the
frontier and its items are written; the parent acks the lease once those are
published. A worker that dies before leaves that page to be taken again.

Only the generic spider runs distributed (its requests are a URL, a depth
and the same callbacks, so any worker can rebuild them).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from typing import Any

from scrapy import Spider
from scrapy.core.engine import ExecutionEngine
from scrapy.crawler import Crawler
from scrapy.http import Request, Response
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from scraper.frontier import Entry, Frontier
from scraper.protocol import Recorder
from scraper.scrapy_engine import Extracted, SiteSpider

log = logging.getLogger(__name__)

ENTRY = "geoscrape_frontier_entry"  # request.meta: the leased entry it came from
# Idle crawls poll the frontier this often for links other workers queued
# (Scrapy's engine otherwise looks again only every 5 s).
POLL_SECONDS = 0.05

# Set by scrapy_engine.run() (one crawl per process).
current: Frontier | None = None
_recorder: Recorder | None = None
# How long a crawl child keeps renewing a page it released, until its parent
# has published the page's items and acked it (batches go out every second).
HANDOVER_GRACE = 10.0


def _frontier() -> Frontier:
    if current is None:
        raise RuntimeError("no frontier: the distributed scheduler runs only in a crawl child")
    return current


def _release(request: Request | None) -> None:
    raw = request.meta.get(ENTRY) if request is not None else None
    if raw and _recorder is not None:
        _frontier().hand_over(raw, HANDOVER_GRACE)
        _recorder.release(raw)


def make_entry(crawler: Crawler, request: Request) -> Entry:
    fingerprint = crawler.request_fingerprinter.fingerprint(request).hex()
    return Entry.make(request.url, fingerprint, dict(request.meta))


def queue_request(crawler: Crawler, frontier: Frontier, request: Request) -> bool:
    """Put `request` in the frontier (deduplicated by fingerprint unless dont_filter)."""
    # A retry or redirect of a leased request replaces it in one step.
    replaces = request.meta.get(ENTRY)
    return frontier.add(make_entry(crawler, request), force=request.dont_filter, replaces=replaces)


class FrontierSiteSpider(SiteSpider):
    """The generic spider, handing each leased page back once it is fully handled.

    A page's items go straight to the recorder and its links into the frontier
    (all at once), then the page is released: the release follows its items on
    the protocol stream, so the parent ends the lease only after they are published.
    """

    def parse(self, response: Response, **kwargs: Any) -> Iterator[Any]:
        depth = response.meta.get("depth", 0) + 1
        links: list[tuple[Entry, bool]] = []
        try:
            for output in super().parse(response, **kwargs):
                if isinstance(output, Request):
                    output.meta["depth"] = depth
                    links.append((make_entry(self.crawler, output), output.dont_filter))
                elif isinstance(output, Extracted) and _recorder is not None:
                    _recorder.item(output.item)
                else:
                    yield output
        finally:
            # All of the page's links in one round trip, then the release: if
            # they cannot be queued, the lease lapses and the page is done again.
            if links:
                _frontier().add_many(links)
            _release(response.request)

    def on_error(self, failure: Failure) -> None:
        try:
            super().on_error(failure)
        finally:
            _release(getattr(failure, "request", None))


class FrontierScheduler:
    """Scrapy's scheduler interface over the run's Redis frontier.

    It leases as many requests as the downloader has free slots in one round
    trip and hands them out one by one; what is left when the crawl closes
    goes back to the queue at once.
    """

    def __init__(self, crawler: Crawler, frontier: Frontier) -> None:
        self.crawler = crawler
        self.frontier = frontier
        self.spider: Spider | None = None
        self._renewer = LoopingCall(self._renew)
        self._taken: collections.deque[Entry] = collections.deque()
        self._slots = crawler.settings.getint("CONCURRENT_REQUESTS") or 1

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> FrontierScheduler:
        return cls(crawler, _frontier())

    def open(self, spider: Spider) -> None:
        self.spider = spider
        self._renewer.start(max(self.frontier.lease / 3, 0.5), now=False)
        return None

    def close(self, reason: str) -> None:
        if self._renewer.running:
            self._renewer.stop()
        try:
            self.frontier.give_back([entry.raw for entry in self._taken])
            self._taken.clear()
            self.frontier.flush_count()
        except Exception as exc:  # the leases lapse instead: only later
            log.warning("could not hand back unused leases: %s", exc)
        return None

    def _renew(self) -> None:
        try:
            self.frontier.renew()
        except Exception as exc:  # a missed renewal only risks a duplicate fetch
            log.warning("could not renew leases: %s", exc)

    def has_pending_requests(self) -> bool:
        return bool(self._taken) or self.frontier.pending()

    def _free_slots(self) -> int:
        engine = self.crawler.engine
        active = len(engine.downloader.active) if engine is not None else 0
        return max(self._slots - active, 1)

    def enqueue_request(self, request: Request) -> bool:
        return queue_request(self.crawler, self.frontier, request)

    def next_request(self) -> Request | None:
        if not self._taken:
            self._taken.extend(self.frontier.take_many(self._free_slots()))
        if not self._taken:
            return None
        entry = self._taken.popleft()
        spider = self.spider
        assert isinstance(spider, SiteSpider)
        return Request(
            entry.url,
            callback=spider.parse,
            errback=spider.on_error,
            meta={**entry.meta, ENTRY: entry.raw},
            dont_filter=True,
        )


def poll_often() -> None:
    """Make an idle engine look at the frontier every POLL_SECONDS (one crawl per process)."""
    ExecutionEngine._SLOT_HEARTBEAT_INTERVAL = POLL_SECONDS
