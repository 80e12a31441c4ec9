"""`engine: browser`: pages rendered by a headless Chromium (runs in the crawl child only).

The crawl is the Scrapy engine's (scraper.scrapy_engine): the same generic
spider, link following, extraction, limits and fetch recording. Only the
download differs: scrapy-playwright's handler loads each page in one shared
Chromium (Debian's, found by scraper.chromium; never downloaded), waits for
`browser.wait_for` / `browser.wait`, and hands the rendered DOM to the spider.
robots.txt is still fetched over plain HTTP.

The SSRF guard (scraper.ssrf, the same one the other engines use) runs twice:

- Request interception (`abort_request`): every request a page is about to
  send (document, XHR, fetch, iframes, scripts) is checked by URL; a refused
  one is aborted and recorded as a Fetch with the guard's error.
  `browser.block` resource types are aborted unrecorded. WebSockets are
  routed through the same check (`_guard_websocket`).
- Connect time (scraper.browser_proxy): Chromium's only way out is a forward
  proxy in this process, which resolves each host itself and connects only to
  allowed addresses. It catches what interception cannot see: redirect hops
  (Chromium follows them without asking the interceptor) and DNS answers that
  change after the check.

Limits: `limits.timeout` bounds each page (navigation plus `wait_for`;
`browser.wait` comes on top), `max_bytes` the rendered document and every
response with a declared size (the page is dropped), `max_pages`/
`max_depth`/`max_duration` hold as for engine scrapy. One browser per crawl
child, closed when the crawl ends; the child is a subreaper and returns only
when every browser process is gone (Chromium also exits when the child is
killed: its DevTools pipe closes). The run's `peak_rss` is the whole process
tree's (this process, Playwright's driver, every Chromium process; PSS),
sampled every half second.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from typing import Any

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Page, WebSocketRoute
from playwright.async_api import Request as PlaywrightRequest
from playwright.async_api import Response as PlaywrightResponse
from playwright.async_api import TimeoutError as PlaywrightTimeout
from scrapy import signals
from scrapy.exceptions import DownloadCancelledError, DownloadTimeoutError
from scrapy.http import Request, Response
from scrapy_playwright.handler import ScrapyPlaywrightDownloadHandler
from scrapy_playwright.page import PageMethod

from regions.messages import Fetch
from regions.site import ResolvedSite
from scraper import browser_proxy, scrapy_engine
from scraper.chromium import CHROMIUM_ARGS, find_chromium
from scraper.errors import ScraperError
from scraper.protocol import Recorder
from scraper.ssrf import Guard, SSRFRefused

log = logging.getLogger(__name__)

_HANDLER = "scraper.browser_engine.BrowserDownloadHandler"
_ABORT = "scraper.browser_engine.abort_request"
ASYNCIO_REACTOR = "twisted.internet.asyncioreactor.AsyncioSelectorReactor"
MAX_PAGES_OPEN = 4  # pages rendering at once, whatever politeness.concurrency says
RSS_SAMPLE_SECONDS = 0.5
REAP_GRACE_SECONDS = 10.0  # for browser processes to exit by themselves after the crawl
_PR_SET_CHILD_SUBREAPER = 36
DROPPED = "geoscrape_dropped"  # request.meta: why the page was closed mid-load
# `block:` names -> Playwright's resource types.
BLOCK_TYPES = {"images": "image", "fonts": "font", "media": "media", "stylesheets": "stylesheet"}


class BrowserCrawl:
    """What the download handler and the request filter need from the run."""

    def __init__(self, site: ResolvedSite, recorder: Recorder) -> None:
        self.site = site
        self.recorder = recorder
        self.guard = Guard.for_site(site)
        self.blocked = frozenset(BLOCK_TYPES[name] for name in site.browser.block)
        self.refused: set[str] = set()  # URLs already recorded as refused
        self.proxy_socket = browser_proxy.listen()

    def refuse(self, url: str, reason: str) -> None:
        """Record a refused browser request once per URL (the store keys fetches by URL)."""
        log.warning("browser request refused: %s: %s", url[:200], reason)
        if url not in self.refused:
            self.refused.add(url)
            self.recorder.fetch(Fetch(url=url, status=None, error=reason[:300]))


# The running crawl (one per process, like scrapy_engine's globals: Scrapy
# builds the handler itself and loads the abort hook by dotted path).
_crawl: BrowserCrawl | None = None


def _current() -> BrowserCrawl:
    if _crawl is None:
        raise ScraperError("the browser engine's hooks run only inside browser_engine.run()")
    return _crawl


async def check_url(crawl: BrowserCrawl, url: str) -> str | None:
    """The guard's refusal of `url`, or None (name resolution off the event loop)."""
    try:
        await asyncio.get_running_loop().run_in_executor(None, crawl.guard.check_url, url)
    except SSRFRefused as exc:
        return str(exc)
    return None


async def abort_request(request: PlaywrightRequest) -> bool:
    """PLAYWRIGHT_ABORT_REQUEST: called for every request a page is about to send."""
    crawl = _current()
    if request.resource_type in crawl.blocked:
        return True
    refusal = await check_url(crawl, request.url)
    if refusal is not None:
        crawl.refuse(request.url, refusal)
        return True
    return False


async def _guard_websocket(ws: WebSocketRoute) -> None:
    """WebSockets bypass request interception: the same guard, then connect."""
    crawl = _current()
    url = ws.url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
    refusal = await check_url(crawl, url)
    if refusal is not None:
        crawl.refuse(ws.url, refusal)
        await ws.close(code=1008, reason="refused")
        return
    ws.connect_to_server()


def _watch_responses(page: Page, crawl: BrowserCrawl, meta: dict[str, Any]) -> None:
    """Drop the page (close it at once, its download fails) when a response
    declares a body over max_bytes: Chromium would read it all."""

    async def on_response(response: PlaywrightResponse) -> None:
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > crawl.site.limits.max_bytes:
            crawl.refuse(response.url, scrapy_engine.MAX_BYTES_EXCEEDED)
            meta.setdefault(DROPPED, f"page dropped: {response.url[:200]}: over max_bytes")
            if not page.is_closed():
                await page.close()

    page.on("response", on_response)


async def _init_page(page: Page, request: Request) -> None:
    """playwright_page_init_callback: hooks on a fresh page, before it navigates."""
    crawl = _current()
    request.meta["geoscrape_page"] = page
    _watch_responses(page, crawl, request.meta)
    await page.route_web_socket("**", _guard_websocket)


async def wait_for_render(page: Page, site: ResolvedSite, deadline: float) -> None:
    """A PageMethod: `wait_for` (best effort, until the page's deadline), then `wait`."""
    browser = site.browser
    if browser.wait_for is not None:
        left = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            await page.wait_for_selector(browser.wait_for, state="attached", timeout=left * 1000)
        except PlaywrightTimeout:
            log.warning("%s: %r did not appear in time", page.url, browser.wait_for)
    if browser.wait > 0:
        await page.wait_for_timeout(browser.wait * 1000)


class BrowserDownloadHandler(ScrapyPlaywrightDownloadHandler):
    """scrapy-playwright's handler for every request but robots.txt, with
    geoscrape's per-page limits (timeout, max_bytes) around it."""

    def __init__(self, crawler: Any) -> None:
        super().__init__(crawler)
        # A page closed by the guard must fail, not be loaded again.
        self.config.target_closed_max_retries = 0
        self._closed = False
        self._proxy: asyncio.Server | None = None
        crawler.signals.connect(self._start_proxy, signals.engine_started)

    async def _start_proxy(self) -> None:
        crawl = _current()
        self._proxy = await browser_proxy.serve(crawl.proxy_socket, crawl.guard, crawl.refuse)

    @classmethod
    def from_crawler(cls, crawler: Any) -> BrowserDownloadHandler:
        """One handler, so one browser, for both http and https."""
        handler = getattr(crawler, "_geoscrape_browser_handler", None)
        if handler is None:
            handler = cls(crawler)
            crawler._geoscrape_browser_handler = handler
        return handler

    async def close(self) -> None:
        if not self._closed:  # registered for two schemes: closed twice
            self._closed = True
            await super().close()
            if self._proxy is not None:
                self._proxy.close()

    async def download_request(self, request: Request) -> Response:
        if scrapy_engine._is_robots_request(request):
            return await super().download_request(request)
        site = _current().site
        timeout = site.limits.timeout
        deadline = asyncio.get_running_loop().time() + timeout
        request.meta.update(
            playwright=True,
            playwright_page_init_callback=_init_page,
            playwright_page_methods=[PageMethod(wait_for_render, site, deadline)],
        )
        try:
            async with asyncio.timeout(timeout + site.browser.wait):
                response: Response = await super().download_request(request)
        except TimeoutError:
            raise DownloadTimeoutError(f"page not loaded in {timeout:g}s") from None
        except PlaywrightError as exc:
            if DROPPED in request.meta:
                raise BrowserPageError(request.meta[DROPPED]) from None
            if isinstance(exc, PlaywrightTimeout):
                raise DownloadTimeoutError(f"page not loaded in {timeout:g}s") from None
            raise BrowserPageError(_short(exc)) from None
        finally:
            page = request.meta.pop("geoscrape_page", None)
            if isinstance(page, Page) and not page.is_closed():
                await page.close()
        if DROPPED in request.meta:
            raise BrowserPageError(request.meta[DROPPED])
        if len(response.body) > site.limits.max_bytes:
            raise DownloadCancelledError(f"max size ({site.limits.max_bytes}) exceeded")
        return response


class BrowserPageError(ScraperError):
    """Chromium could not load a page (closed by the guard, network error...)."""


def _short(exc: PlaywrightError) -> str:
    """Playwright's message without its multi-line call log."""
    first = (exc.message or str(exc)).strip().splitlines()
    return (first[0] if first else type(exc).__name__)[:200]


def settings_for(site: ResolvedSite, chromium: str, proxy_port: int) -> dict[str, Any]:
    """engine scrapy's settings, with downloads done by Chromium through our proxy."""
    settings = scrapy_engine.settings_for(site)
    proxy = [f"--proxy-server=http://127.0.0.1:{proxy_port}", "--proxy-bypass-list=<-loopback>"]
    pages = min(site.politeness.concurrency, MAX_PAGES_OPEN)
    settings.update(
        {
            "TWISTED_REACTOR": ASYNCIO_REACTOR,
            "DOWNLOAD_HANDLERS": {"http": _HANDLER, "https": _HANDLER},
            "CONCURRENT_REQUESTS": pages,
            "CONCURRENT_REQUESTS_PER_DOMAIN": pages,
            "PLAYWRIGHT_BROWSER_TYPE": "chromium",
            "PLAYWRIGHT_LAUNCH_OPTIONS": {
                "executable_path": chromium,
                "headless": True,
                "chromium_sandbox": False,
                "args": [*CHROMIUM_ARGS, *proxy],
            },
            "PLAYWRIGHT_CONTEXTS": {
                "default": {
                    "user_agent": site.politeness.user_agent,
                    "service_workers": "block",  # their fetches would bypass interception
                    "accept_downloads": False,
                }
            },
            "PLAYWRIGHT_MAX_CONTEXTS": 1,
            "PLAYWRIGHT_MAX_PAGES_PER_CONTEXT": pages,
            "PLAYWRIGHT_DEFAULT_NAVIGATION_TIMEOUT": site.limits.timeout * 1000,
            "PLAYWRIGHT_ABORT_REQUEST": _ABORT,
            # Never reconnect a crashed browser mid-crawl: the crawl fails instead.
            "PLAYWRIGHT_RESTART_DISCONNECTED_BROWSER": False,
        }
    )
    return settings


def tree_rss(root: int) -> int:
    """Proportional resident memory (PSS, else RSS) of `root` and its descendants, bytes.

    PSS shares the pages Chromium's processes have in common among them, so
    the sum is what the tree really holds; plain RSS would count them per process.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        total += _process_memory(pid)
    return total


def _process_memory(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class RssSampler:
    """Keeps the peak of `tree_rss(our pid)` while the crawl runs."""

    def __init__(self, interval: float = RSS_SAMPLE_SECONDS) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss(os.getpid()))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def become_subreaper() -> None:
    """Orphans below us (Chromium starts detached from Playwright's driver) become our
    children, so the crawl child can wait for every one before it exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("PR_SET_CHILD_SUBREAPER failed: errno %d", ctypes.get_errno())


def _children() -> list[int]:
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == me:
                found.append(int(entry))
    return found


def reap_children(grace: float = REAP_GRACE_SECONDS) -> list[int]:
    """Wait up to `grace` seconds for every child (browser processes included) to
    exit, then SIGKILL the rest; returns the pids that had to be killed."""
    deadline = time.monotonic() + grace
    killed: list[int] = []
    while True:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        left = _children()
        if not left:
            return killed
        if time.monotonic() >= deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed.extend(left)
            log.warning("browser processes still running after the crawl: killed %s", left)
            deadline = float("inf")  # SIGKILL always ends them; wait for that
        time.sleep(0.05)


def run(site: ResolvedSite, recorder: Recorder) -> str | None:
    """Run a browser crawl to completion (blocks); same contract as scrapy_engine.run.

    Returns only once every browser process is gone.
    """
    global _crawl
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"  # never fetch a browser
    chromium = find_chromium()
    _crawl = BrowserCrawl(site, recorder)
    become_subreaper()
    with RssSampler() as sampler:
        try:
            port = _crawl.proxy_socket.getsockname()[1]
            return scrapy_engine.run(site, recorder, settings=settings_for(site, chromium, port))
        finally:
            reap_children()
            recorder.tree_peak_rss = sampler.peak
