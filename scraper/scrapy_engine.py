"""The Scrapy engine: runs inside the crawl child only (it imports Twisted).

A generic spider built from a ResolvedSite, an existing spider
("package.module:Class") run unchanged, or a Scrapy project's spider run with
the project's own settings (scraper.project). Either way every response and every
download error becomes a Fetch (via `FetchRecorderMiddleware`) and every item
reaching `item_scraped` becomes a ScrapedItem.

The SSRF guard (scraper.ssrf) runs twice: `SSRFGuardMiddleware` refuses a
request (redirects included: Scrapy sends them through the middlewares
again) and records why; `GuardedResolver` drops refused addresses from every
name resolution, so nothing can connect to them whatever the DNS answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import scrapy
from itemadapter import ItemAdapter
from protego import Protego
from scrapy import signals
from scrapy.crawler import Crawler, CrawlerProcess
from scrapy.exceptions import (
    CannotResolveHostError,
    DownloadCancelledError,
    DownloadConnectionRefusedError,
    DownloadTimeoutError,
    IgnoreRequest,
    ResponseDataLossError,
)
from scrapy.http import Request, Response, TextResponse
from scrapy.linkextractors import LinkExtractor
from scrapy.resolver import CachingHostnameResolver
from scrapy.settings import Settings
from scrapy.utils.defer import deferred_from_coro, maybe_deferred_to_future
from twisted.internet import defer, error
from twisted.internet.interfaces import IHostResolution, IResolutionReceiver
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

from regions.messages import Fetch, ScrapedItem
from regions.site import ResolvedSite
from scraper.egress import ChildEgress, Exit, Exits, NoExitLeft
from scraper.errors import ScraperError
from scraper.evidence import inspect
from scraper.extract import extract_items
from scraper.frontier import Frontier
from scraper.project import (
    GEOSCRAPE_MIDDLEWARES,
    GUARDED_RESOLVER,
    SpiderLoadError,
    apply_guards,
    load_settings,
    spider_class,
)
from scraper.protocol import Recorder
from scraper.ratelimit import Budget, robots_rate, scope_of
from scraper.ssrf import Guard, SSRFRefused

__all__ = ["SpiderLoadError", "run"]

log = logging.getLogger(__name__)

MAX_BYTES_EXCEEDED = "max_bytes exceeded"
TOO_MANY_REDIRECTS = "Too many redirects"
EXIT_META = "geoscrape_exit"  # the scraper.egress.Exit a request goes out through


# The run's recorder, SSRF guard and rate budget, for the middlewares and the
# resolver (Scrapy deep-copies settings, so they cannot travel there). One
# crawl per process, so one global each is enough.
_recorder: Recorder | None = None
_site: ResolvedSite | None = None
# request.meta key: the block signature the response matched (scraper/blocks.py).
BLOCK_META = "geoscrape_block"
_guard: Guard | None = None
_exits: Exits | None = None
_budget: Budget | None = None
_shared_pages: Frontier | None = None  # the run's frontier, in a distributed run


class GuardRefused(IgnoreRequest):
    """A request the SSRF guard refused (never retried, always recorded)."""


class EgressRefused(IgnoreRequest):
    """A request with no egress exit left to go out through (never sent, always recorded)."""


def max_depth(site: ResolvedSite) -> int:
    if site.follow is not None and site.follow.max_depth is not None:
        return site.follow.max_depth
    return site.limits.max_depth


def settings_for(site: ResolvedSite) -> dict[str, Any]:
    politeness, limits = site.politeness, site.limits
    depth = max_depth(site)
    settings: dict[str, Any] = {
        "ROBOTSTXT_OBEY": politeness.robots == "obey",
        "DOWNLOAD_DELAY": politeness.delay,
        "CONCURRENT_REQUESTS": politeness.concurrency,
        "CONCURRENT_REQUESTS_PER_DOMAIN": politeness.concurrency,
        "DOWNLOAD_TIMEOUT": limits.timeout,
        "DOWNLOAD_MAXSIZE": limits.max_bytes,  # also caps decompressed bodies
        "REDIRECT_MAX_TIMES": limits.max_redirects,
        "CLOSESPIDER_TIMEOUT": limits.max_duration,
        "TWISTED_DNS_RESOLVER": GUARDED_RESOLVER,
        "DOWNLOAD_WARNSIZE": 0,
        "USER_AGENT": politeness.user_agent,
        # 0 means "no limit" to Scrapy; FetchRecorderMiddleware enforces depth 0.
        "DEPTH_LIMIT": depth,
        "TELNETCONSOLE_ENABLED": False,
        # Scrapy 2.19+: an HTTP server that executes code; never in a worker.
        "REMOTE_CONTROL_ENABLED": False,
        "HTTPERROR_ALLOW_ALL": True,
        "RETRY_TIMES": 1,
        "LOG_LEVEL": "INFO",
        "LOG_STDOUT": False,
        # The recorder and guard first; egress (600) sits between retries (550)
        # and Scrapy's HttpProxyMiddleware (750): it picks the exit before the
        # proxy header is set, and sees a proxy failure before a retry would
        # resend through the same dead exit (scraper.project.GEOSCRAPE_MIDDLEWARES).
        "DOWNLOADER_MIDDLEWARES": GEOSCRAPE_MIDDLEWARES,
        "GEOSCRAPE_MAX_PAGES": limits.max_pages,
        "GEOSCRAPE_SOURCE_ADDRESS": site.source_address,
        "GEOSCRAPE_MAX_DEPTH": depth,
    }
    if site.spider is None and site.project is None:
        # The generic spider's output needs no parallelism (it has no item
        # pipelines: the recorder writes each item at once), and Scrapy starts
        # CONCURRENT_ITEMS asyncio tasks per page to process it (default 100).
        settings["CONCURRENT_ITEMS"] = 1
    return settings


def short_error(exc: BaseException) -> str:
    """A short, stable message for a download that got no usable response."""
    if isinstance(exc, GuardRefused | SSRFRefused | EgressRefused):
        return str(exc)[:300]
    if isinstance(exc, IgnoreRequest) and "max redirections" in str(exc):
        return TOO_MANY_REDIRECTS
    if isinstance(exc, IgnoreRequest) and "DOWNLOAD_MAXSIZE" in str(exc):
        return MAX_BYTES_EXCEEDED  # a compression bomb, stopped while decompressing
    if isinstance(exc, DownloadConnectionRefusedError | error.ConnectionRefusedError):
        return "Connection refused"
    if isinstance(exc, DownloadTimeoutError | error.TimeoutError | error.TCPTimedOutError):
        return "Timeout"
    if isinstance(exc, CannotResolveHostError | error.DNSLookupError):
        return "DNS lookup failed"
    if isinstance(exc, DownloadCancelledError | defer.CancelledError) or "max size" in str(exc):
        return MAX_BYTES_EXCEEDED
    if isinstance(exc, ResponseDataLossError):
        return "Response data loss"
    if isinstance(exc, error.ConnectionLost | error.ConnectionDone):
        return "Connection lost"
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}"[:200] if text else name


def _is_robots_request(request: Request) -> bool:
    return bool(request.meta.get("dont_obey_robotstxt")) and (
        urlsplit(request.url).path == "/robots.txt"
    )


class FetchRecorderMiddleware:
    """Records a Fetch per final response / final download error; enforces limits.

    Sits at priority 50, outside retries and redirects (higher numbers), so it
    sees each request once with its final outcome. Once `max_pages` responses
    arrived it drops every further request and response and closes the spider.
    """

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        if _recorder is None:
            raise ScraperError("FetchRecorderMiddleware runs only inside scrapy_engine.run()")
        self.recorder: Recorder = _recorder
        assert _site is not None  # set together with _recorder
        self.site: ResolvedSite = _site
        self.max_pages: int = crawler.settings.getint("GEOSCRAPE_MAX_PAGES")
        self.max_depth: int = crawler.settings.getint("GEOSCRAPE_MAX_DEPTH")
        self.responses = 0
        self._closing = False
        # A distributed run counts max_pages over all its workers (scraper/frontier.py).
        self.shared = _shared_pages

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> FetchRecorderMiddleware:
        return cls(crawler)

    def _limit_reached(self) -> bool:
        pages = self.shared.pages() if self.shared is not None else self.responses
        return pages >= self.max_pages

    def _close(self) -> None:
        if not self._closing and self.crawler.engine is not None:
            self._closing = True
            log.info("max_pages (%d) reached: closing the spider", self.max_pages)
            self.recorder.limit(f"max_pages ({self.max_pages})")
            closing = deferred_from_coro(self.crawler.engine.close_spider_async(reason="max_pages"))
            closing.addErrback(lambda failure: log.error("closing failed: %s", failure.value))

    def process_request(self, request: Request) -> None:
        if _is_robots_request(request):
            return None
        if self._limit_reached():
            raise IgnoreRequest("max_pages reached")
        if request.meta.get("depth", 0) > self.max_depth:
            raise IgnoreRequest("max_depth exceeded")
        return None

    def process_response(self, request: Request, response: Response) -> Response:
        if _is_robots_request(request):
            return response
        if self._limit_reached():
            raise IgnoreRequest("max_pages reached")
        self.responses += 1
        if self.shared is not None and self.shared.count_page(self.max_pages) > self.max_pages:
            self._close()  # other workers' responses took the last pages
            raise IgnoreRequest("max_pages reached")
        origin = (request.meta.get("redirect_urls") or [request.url])[0]
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, values in response.headers.items()
            for v in values
        ]
        facts = inspect(self.site, origin, response.url, response.status, headers, response.body)
        request.meta[BLOCK_META] = facts.block  # the spider extracts nothing from a block page
        self.recorder.fetch(
            Fetch(
                url=origin,
                status=response.status,
                bytes=len(response.body),
                final_url=response.url if response.url != origin else None,
                exit=exit_address(request),
                **facts.fields(),
            )
        )
        if self._limit_reached():
            self._close()
        return response

    def process_exception(self, request: Request, exception: Exception) -> None:
        if _is_robots_request(request):
            return None
        if isinstance(exception, IgnoreRequest) and not isinstance(
            exception, GuardRefused | EgressRefused
        ):
            return None
        record_failure(self.recorder, request, exception)
        return None


def exit_address(request: Request) -> str | None:
    exit_: Exit | None = request.meta.get(EXIT_META)
    return exit_.address if exit_ is not None else None


def record_failure(recorder: Recorder, request: Request, exception: BaseException) -> None:
    origin = (request.meta.get("redirect_urls") or [request.url])[0]
    recorder.fetch(
        Fetch(url=origin, status=None, error=short_error(exception), exit=exit_address(request))
    )


class EgressMiddleware:
    """Sends every request (robots.txt included) through one of the crawl's exits.

    It overrides any `proxy` a spider set itself: a verified region's traffic
    leaves through its verified exits only. A connection failure through a
    proxy is the proxy's (the proxy, not us, connects to the target): under
    per-request rotation the request goes out again through the next exit;
    under per-run the crawl's exit is gone and every further request is refused.
    """

    def __init__(self, exits: Exits) -> None:
        self.exits = exits

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> EgressMiddleware:
        return cls(_exits or Exits(ChildEgress()))

    def process_request(self, request: Request) -> None:
        if EXIT_META in request.meta:
            return None  # a retry or redirect keeps its exit until that exit fails
        try:
            exit_ = self.exits.pick()
        except NoExitLeft as exc:
            raise EgressRefused(f"no egress exit left: {exc}") from None
        if exit_ is None:
            return None
        request.meta[EXIT_META] = exit_
        if exit_.proxy is not None:
            request.meta["proxy"] = exit_.proxy
        return None

    def process_exception(self, request: Request, exception: Exception) -> Request | None:
        exit_: Exit | None = request.meta.get(EXIT_META)
        if exit_ is None or exit_.proxy is None or isinstance(exception, IgnoreRequest):
            return None
        log.warning("exit %s failed on %s: %s", exit_.label, request.url, exception)
        if not self.exits.failed(exit_, short_error(exception)):
            return None
        retry = request.copy()
        for key in (EXIT_META, "proxy", "_auth_proxy"):
            retry.meta.pop(key, None)
        retry.headers.pop(b"Proxy-Authorization", None)
        retry.dont_filter = True
        return retry


class SSRFGuardMiddleware:
    """Refuses requests to non-http(s) schemes and private addresses (scraper.ssrf)."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> SSRFGuardMiddleware:
        if _guard is None:
            raise ScraperError("SSRFGuardMiddleware runs only inside scrapy_engine.run()")
        return cls(_guard)

    def process_request(self, request: Request) -> None:
        try:
            self.guard.check_url(request.url)
        except SSRFRefused as exc:
            log.warning("%s: %s", request.url, exc)
            raise GuardRefused(str(exc)) from None
        return None


class SourceAddressMiddleware:
    """Sends every request (robots.txt too) from the region's egress.source_address.

    Scrapy's `bindaddress` meta key, set on each request: it works on every
    Scrapy version the project supports and covers redirects, which come back
    through here.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> SourceAddressMiddleware:
        # A project's own settings do not carry it: then the site's (set by the worker).
        address = crawler.settings.get("GEOSCRAPE_SOURCE_ADDRESS")
        return cls(address or (_site.source_address if _site is not None else None))

    def process_request(self, request: Request) -> None:
        if self.address is not None:
            request.meta["bindaddress"] = (self.address, 0)
        return None


class RateBudgetMiddleware:
    """Holds each download until the shared rate budget lets it go (scraper.ratelimit).

    Asks are serialised per scope, so this crawl holds one reserved slot at a
    time and the slots go round-robin between the crawls that share the budget.
    Reads robots.txt `Crawl-delay`/`Request-rate` from the robots response
    itself, and turns 429/503 + Retry-After into a pause for every worker.
    """

    def __init__(self, budget: Budget, user_agent: str) -> None:
        self.budget = budget
        self.user_agent = user_agent
        self._locks: dict[str, defer.DeferredLock] = {}

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> RateBudgetMiddleware:
        if _budget is None:
            raise ScraperError("RateBudgetMiddleware runs only inside scrapy_engine.run()")
        return cls(_budget, crawler.settings.get("USER_AGENT"))

    async def process_request(self, request: Request) -> None:
        if self.budget.interval_for(request.url) <= 0:
            return None
        scope = scope_of(request.url, self.budget.scope)
        lock = self._locks.setdefault(scope, defer.DeferredLock())
        await maybe_deferred_to_future(lock.acquire())
        started = time.monotonic()
        try:
            slot = self.budget.reserve(request.url)
            while slot.wait > 0:
                await maybe_deferred_to_future(sleep_deferred(slot.wait))
                slot = self.budget.recheck(request.url, slot)
        finally:
            self.budget.add_wait(time.monotonic() - started)
            lock.release()
        return None

    def process_response(self, request: Request, response: Response) -> Response:
        if _is_robots_request(request) and 200 <= response.status < 300:
            robots = Protego.parse(response.body.decode("utf-8", "replace"))
            delay = robots.crawl_delay(self.user_agent)
            rate = robots_rate(robots.request_rate(self.user_agent))
            self.budget.set_robots(request.url, float(delay) if delay else None, rate)
        retry_after = response.headers.get(b"Retry-After")
        self.budget.observe(
            request.url, response.status, retry_after.decode("latin-1") if retry_after else None
        )
        return response


def sleep_deferred(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import reactor

    return deferLater(reactor, seconds, lambda: None)


@implementer(IResolutionReceiver)
class _GuardedReceiver:
    """Passes on only the addresses the guard allows for (host, port)."""

    def __init__(self, inner: Any, guard: Guard, host: str, port: int) -> None:
        self.inner, self.guard, self.host, self.port = inner, guard, host, port

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        self.inner.resolutionBegan(resolution)

    def addressResolved(self, address: Any) -> None:
        allowed = self.guard.proxy_allowed(self.host, self.port) or self.guard.address_allowed(
            address.host, self.port, self.host
        )
        if allowed:
            self.inner.addressResolved(address)
        else:
            log.warning("%s resolved to refused address %s: dropped", self.host, address.host)

    def resolutionComplete(self) -> None:
        self.inner.resolutionComplete()


class GuardedResolver(CachingHostnameResolver):
    """Scrapy's caching resolver, with refused addresses removed from every answer."""

    def resolveHostName(
        self,
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> Any:
        guard = _guard or Guard()
        receiver: Any = _GuardedReceiver(resolutionReceiver, guard, hostName, portNumber)
        super().resolveHostName(receiver, hostName, portNumber, addressTypes, transportSemantics)
        return resolutionReceiver


@dataclass
class Extracted:
    """What the generic spider yields: a ready ScrapedItem (an itemadapter dataclass)."""

    item: ScrapedItem


class SiteSpider(scrapy.Spider):
    """The generic spider: start_urls, optional link following, the extract spec."""

    name = "geoscrape"

    def __init__(self, site: ResolvedSite, **kwargs: Any) -> None:
        super().__init__(name=site.name, **kwargs)
        self.site = site
        self.start_urls = list(site.start_urls)
        self.depth_limit = max_depth(site)
        self.links = (
            LinkExtractor(allow=site.follow.allow, deny=site.follow.deny)
            if site.follow is not None
            else None
        )
        self.max_links = site.limits.max_links
        self.links_dropped = 0

    async def start(self) -> AsyncIterator[Any]:
        for url in self.start_urls:
            # filtered: a link back is no refetch
            yield Request(url, callback=self.parse, errback=self.on_error)

    def on_error(self, failure: Failure) -> None:
        """Record what no middleware sees: limits hit while handling a response
        (too many redirects, a body over max_bytes once decompressed)."""
        exc = failure.value
        if (
            isinstance(exc, IgnoreRequest)
            and not isinstance(exc, GuardRefused)
            and short_error(exc) in (TOO_MANY_REDIRECTS, MAX_BYTES_EXCEEDED)
            and _recorder is not None
        ):
            record_failure(_recorder, failure.request, exc)  # type: ignore[attr-defined]

    def parse(self, response: Response, **kwargs: Any) -> Iterator[Any]:
        if not 200 <= response.status < 300 or not isinstance(response, TextResponse):
            return
        if response.meta.get(BLOCK_META):
            return  # a block page: neither its items nor its links are the site's
        if self.site.extract is not None:
            # Parsed as the site says (html by default), not as Scrapy's response
            # type suggests: an XML declaration must not turn XHTML into XML.
            page = scrapy.Selector(response=response, type=self.site.extract.parser)
            items, problems = extract_items(page, response.url, self.site.extract)
            for problem in problems:
                self.logger.warning("%s", problem)
            for item in items:
                yield Extracted(item)
        if self.links is not None and response.meta.get("depth", 0) < self.depth_limit:
            links = self.links.extract_links(response)
            if len(links) > self.max_links:
                self.links_dropped += len(links) - self.max_links
                self.logger.warning(
                    "max_links (%d): %d of %d links on %s not followed",
                    self.max_links,
                    len(links) - self.max_links,
                    len(links),
                    response.url,
                )
            for link in links[: self.max_links]:
                yield response.follow(link.url, callback=self.parse, errback=self.on_error)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def item_key(data: dict[str, Any], key_field: str | None) -> str | None:
    """The key of a custom spider's item: its key field, else a stable hash of it."""
    if key_field is not None:
        value = data.get(key_field)
        return None if value is None else str(value)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class CrawlCrashed(ScraperError):
    """The Scrapy crawl itself failed (not a page: the engine or the spider setup)."""


def _distribute(site: ResolvedSite, run_id: str, settings: dict[str, Any]) -> type[SiteSpider]:
    """Point the crawl at the run's Redis frontier; returns the spider class to run."""
    global _shared_pages
    from scraper import scrapy_frontier

    frontier = Frontier(run_id)
    scrapy_frontier.current = _shared_pages = frontier
    scrapy_frontier._recorder = _recorder
    scrapy_frontier.poll_often()
    settings["SCHEDULER"] = "scraper.scrapy_frontier.FrontierScheduler"
    # max_duration holds for the run: a worker that joins late gets what is left.
    left = site.limits.max_duration - frontier.elapsed()
    settings["CLOSESPIDER_TIMEOUT"] = max(left, 0.001)
    return scrapy_frontier.FrontierSiteSpider


def run(
    site: ResolvedSite,
    recorder: Recorder,
    project: str | None = None,
    *,
    settings: dict[str, Any] | None = None,
    exits: Exits | None = None,
    run_id: str | None = None,
) -> str | None:
    """Run the crawl to completion (blocks; once per process: the reactor can't restart).

    `project` (a deployed bundle's directory) stands in for `site.project`;
    `settings` replaces `settings_for(site)` (engine browser passes its own).
    Returns a note explaining an empty run, or None; raises CrawlCrashed.
    """
    global _recorder, _guard, _exits, _site, _budget, _shared_pages
    project = project or site.project
    exits = exits or Exits(ChildEgress())
    socks = [e.label for e in exits.exits if e.proxy and not e.proxy.startswith("http")]
    if socks:
        raise CrawlCrashed(
            f"engine 'scrapy' speaks HTTP proxies only; SOCKS exits ({', '.join(socks)}) "
            "need engine 'requests'"
        )
    spider_cls: type[scrapy.Spider] = SiteSpider
    spider_kwargs: dict[str, Any] = {"site": site}
    crawl_settings: Settings | dict[str, Any] = (
        settings if settings is not None else settings_for(site)
    )
    if project is not None:
        crawl_settings = load_settings(project)
    if site.spider is not None:
        project_settings = crawl_settings if isinstance(crawl_settings, Settings) else None
        spider_cls, spider_kwargs = spider_class(site.spider, project_settings), site.spider_args
    key_field = site.extract.key if site.extract is not None else None

    _recorder = recorder
    _site = site
    _guard = Guard.for_site(site).with_proxies(exits.endpoints())
    _exits = exits
    _budget = budget = Budget(site)
    if site.distributed:
        if run_id is None or not isinstance(crawl_settings, dict):
            raise ScraperError("a distributed crawl needs its run id and the generic spider")
        spider_cls = _distribute(site, run_id, crawl_settings)
    logging.root.handlers.clear()  # Scrapy installs its own stderr handler (LOG_LEVEL)
    process = CrawlerProcess(crawl_settings)
    crawler = process.create_crawler(spider_cls)
    if project is not None:
        # After the spider's custom_settings (applied by create_crawler), before the crawl.
        for warning in apply_guards(crawler.settings, site):
            log.warning("%s", warning)
            recorder.note(warning)
    crashes: list[str] = []

    def on_item(item: Any, response: Response | None = None, **_: Any) -> None:
        if response is not None and response.meta.get(BLOCK_META):
            return  # a user spider's item from a block page is not data
        if isinstance(item, Extracted):
            recorder.item(item.item)
            return
        data = _jsonable(ItemAdapter(item).asdict())
        key = item_key(data, key_field)
        url = response.url if response is not None else ""
        if key is None:
            log.warning("item without key %r on %s", key_field, url)
            return
        recorder.item(ScrapedItem(key=key, url=url, data=data))

    def on_spider_error(**_: Any) -> None:
        recorder.error()

    def on_dropped(**_: Any) -> None:
        recorder.dropped()

    crawler.signals.connect(on_item, signal=signals.item_scraped)
    crawler.signals.connect(on_dropped, signal=signals.item_dropped)
    crawler.signals.connect(on_spider_error, signal=signals.spider_error)

    def on_crash(failure: Failure) -> None:
        crashes.append(f"{type(failure.value).__name__}: {failure.value}")
        log.error("crawl crashed: %s", failure.getTraceback())

    process.crawl(crawler, **spider_kwargs).addErrback(on_crash)
    process.start(install_signal_handlers=False)

    if recorder.duplicates:
        log.info("%d item(s) with an already seen key dropped", recorder.duplicates)
    recorder.rate_budget(budget.waited, budget.pauses, budget.strikes)
    if budget.note is not None:
        recorder.note(budget.note)
    spider = crawler.spider
    if isinstance(spider, SiteSpider) and spider.links_dropped:
        recorder.limit(f"max_links ({spider.max_links}/page, {spider.links_dropped} not followed)")
    reason = crawler.stats.get_value("finish_reason") if crawler.stats else None
    if reason == "closespider_timeout":
        recorder.limit(f"max_duration ({site.limits.max_duration:g}s)")
    if crashes:
        raise CrawlCrashed(crashes[0])
    forbidden = crawler.stats.get_value("robotstxt/forbidden", 0) if crawler.stats else 0
    if forbidden and recorder.stats.pages == 0:
        return f"no page was fetched ({forbidden} request(s) forbidden by robots.txt)"
    return None
