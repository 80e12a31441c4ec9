"""The `requests` engine: GET each start URL once, no link following.

Runs inside the crawl child. Honours politeness (delay between requests, user
agent, robots.txt via urllib.robotparser), limits (timeout for the whole
download, max_bytes after decompression, max_pages, max_redirects,
max_duration) and the SSRF guard (scraper.ssrf), checked on every hop of a
redirect and again when urllib3 connects.
"""

from __future__ import annotations

import logging
import re
import socket
import time
import urllib.robotparser
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urljoin, urlsplit

import parsel
import requests
import urllib3.exceptions
import urllib3.util.connection as urllib3_connection
from w3lib.encoding import html_to_unicode

from regions.messages import Fetch
from scheduler.config import ResolvedSite
from scraper.errors import ScraperError
from scraper.extract import extract_items
from scraper.protocol import Recorder
from scraper.ratelimit import Budget, robots_rate
from scraper.ssrf import REFUSED, Guard, SSRFRefused

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
MAX_BYTES_EXCEEDED = "max_bytes exceeded"


class MaxBytesExceeded(ScraperError):
    """A response body larger than limits.max_bytes."""


class DownloadTimeout(ScraperError):
    """A download that took longer than limits.timeout in total (e.g. a drip)."""


def short_error(exc: BaseException) -> str:
    """A short, stable message for a failed request."""
    text = str(exc)
    if isinstance(exc, SSRFRefused):
        return text[:300]
    if refused := re.search(rf"{REFUSED}: [^\"')]+", text):  # wrapped by urllib3 at connect
        return refused.group(0)[:300]
    if isinstance(exc, MaxBytesExceeded):
        return MAX_BYTES_EXCEEDED
    if isinstance(exc, requests.Timeout | DownloadTimeout):
        return "Timeout"
    if isinstance(exc, requests.ConnectionError):
        if "refused" in text.lower():
            return "Connection refused"
        if "Name or service not known" in text or "getaddrinfo" in text or "resolve" in text:
            return "DNS lookup failed"
        if "reset" in text.lower():
            return "Connection reset"
        return "Connection error"
    if isinstance(exc, requests.TooManyRedirects):
        return "Too many redirects"
    if isinstance(exc, requests.exceptions.ContentDecodingError):
        return "Content decoding error"
    name = type(exc).__name__
    return f"{name}: {text}"[:200] if text else name


class _Robots:
    """robots.txt per origin, fetched once, through the same session."""

    def __init__(self, session: requests.Session, site: ResolvedSite, budget: Budget) -> None:
        self._session = session
        self._site = site
        self._budget = budget
        self._parsers: dict[str, urllib.robotparser.RobotFileParser] = {}
        self.forbidden = 0

    def allowed(self, url: str) -> bool:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        parser = self._parsers.get(origin)
        if parser is None:
            parser = self._parsers[origin] = self._load(origin)
        ok = parser.can_fetch(self._site.politeness.user_agent, url)
        if not ok:
            self.forbidden += 1
        return ok

    def _load(self, origin: str) -> urllib.robotparser.RobotFileParser:
        parser = urllib.robotparser.RobotFileParser(f"{origin}/robots.txt")
        self._budget.wait(f"{origin}/robots.txt")
        try:
            response = self._session.get(
                f"{origin}/robots.txt", timeout=self._site.limits.timeout, stream=True
            )
            body = _read_capped(response, self._site.limits.max_bytes, self._site.limits.timeout)
        except (requests.RequestException, ScraperError) as exc:
            log.warning("robots.txt of %s unavailable (%s): allowing all", origin, exc)
            parser.parse([])
            return parser
        if response.status_code in (401, 403):  # as urllib.robotparser.read() does
            parser.parse(["User-agent: *", "Disallow: /"])
        elif response.status_code >= 400:
            parser.parse([])
        else:
            parser.parse(body.decode("utf-8", "replace").splitlines())
            agent = self._site.politeness.user_agent
            delay = parser.crawl_delay(agent)
            rate = robots_rate(parser.request_rate(agent))
            self._budget.set_robots(origin, float(delay) if delay else None, rate)
        return parser


def _read_capped(response: requests.Response, max_bytes: int, timeout: float) -> bytes:
    """The decoded body of a streamed response.

    MaxBytesExceeded past max_bytes (checked on the decompressed bytes, so a
    gzip/brotli bomb stops at the limit); DownloadTimeout when the whole read
    takes longer than `timeout` (read1 returns whatever arrived, so a server
    dripping one byte a second cannot hold a read open forever).
    """
    deadline = time.monotonic() + timeout
    try:
        declared = int(response.headers.get("Content-Length", "-1"))
        if max_bytes and declared > max_bytes:
            raise MaxBytesExceeded(f"Content-Length {declared} > {max_bytes}")
        body = bytearray()
        while chunk := response.raw.read1(CHUNK, decode_content=True):  # b"": the end
            body += chunk
            if max_bytes and len(body) > max_bytes:
                raise MaxBytesExceeded(f"more than {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise DownloadTimeout(f"download took longer than {timeout}s")
        return bytes(body)
    except ValueError as exc:  # a garbled Content-Length
        raise requests.RequestException(f"bad Content-Length: {exc}") from exc
    except urllib3.exceptions.DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(str(exc)) from exc
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError) as exc:
        raise requests.ConnectionError(str(exc)) from exc
    finally:
        response.close()


@contextmanager
def guarded_connections(guard: Guard) -> Iterator[None]:
    """Every connection urllib3 opens in this process goes through `guard`.

    The host has been resolved by then: each address is checked before the
    socket connects, so a DNS answer that changed since the URL check is
    still refused. The crawl child runs one crawl, so patching is safe.
    """
    original: Callable[..., socket.socket] = urllib3_connection.create_connection

    def create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        host, port = address
        if guard.host_allowed(host, port):
            return original(address, *args, **kwargs)
        last: OSError | None = None
        for _family, _, _, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            guard.check_address(str(sockaddr[0]), port, host)
            try:
                return original((str(sockaddr[0]), port), *args, **kwargs)
            except OSError as exc:
                last = exc
        raise last or OSError(f"no address for {host}")

    urllib3_connection.create_connection = create_connection
    try:
        yield
    finally:
        urllib3_connection.create_connection = original


def run(site: ResolvedSite, recorder: Recorder) -> str | None:
    """Fetch the start URLs; returns a note for the run (e.g. robots skips) or None."""
    if site.extract is None:
        raise ScraperError("engine 'requests' needs an 'extract' spec")
    session = requests.Session()
    session.headers["User-Agent"] = site.politeness.user_agent
    session.max_redirects = site.limits.max_redirects
    guard = Guard.for_site(site)
    budget = Budget(site)
    robots = _Robots(session, site, budget) if site.politeness.robots == "obey" else None
    requested = 0
    give_up_at = time.monotonic() + site.limits.max_duration
    with session, guarded_connections(guard):
        for url in site.start_urls:
            if recorder.stats.pages >= site.limits.max_pages:
                log.info("max_pages (%d) reached", site.limits.max_pages)
                recorder.limit(f"max_pages ({site.limits.max_pages})")
                break
            if time.monotonic() > give_up_at:
                log.warning("max_duration (%ss) reached", site.limits.max_duration)
                recorder.limit(f"max_duration ({site.limits.max_duration:g}s)")
                break
            try:
                guard.check_url(url)
            except SSRFRefused as exc:
                log.warning("%s: %s", url, exc)
                recorder.fetch(Fetch(url=url, status=None, error=short_error(exc)))
                continue
            if robots is not None and not robots.allowed(url):
                log.info("forbidden by robots.txt: %s", url)
                continue
            if requested and site.politeness.delay > 0:
                time.sleep(site.politeness.delay)
            requested += 1
            _fetch_one(session, site, url, recorder, budget)
    recorder.rate_budget(budget.waited, budget.pauses, budget.strikes)
    if budget.note is not None:
        recorder.note(budget.note)
    if robots is not None and robots.forbidden and recorder.stats.pages == 0:
        return f"no page was fetched ({robots.forbidden} URL(s) forbidden by robots.txt)"
    return None


def _get(
    session: requests.Session, site: ResolvedSite, url: str, guard: Guard
) -> requests.Response:
    """GET `url`, following redirects by hand so each hop passes the SSRF guard."""
    for _ in range(site.limits.max_redirects + 1):
        guard.check_url(url)
        response = session.get(url, timeout=site.limits.timeout, stream=True, allow_redirects=False)
        if not response.is_redirect:
            return response
        response.close()
        url = urljoin(url, response.headers["location"])
    raise requests.TooManyRedirects(f"more than {site.limits.max_redirects} redirects")


def _get_within_budget(
    session: requests.Session, site: ResolvedSite, url: str, budget: Budget
) -> requests.Response:
    """GET `url` when the shared budget allows; once more after a 429/503 pause."""
    guard = Guard.for_site(site)
    for attempt in (1, 2):
        budget.wait(url)
        response = _get(session, site, url, guard)
        paused = budget.observe(url, response.status_code, response.headers.get("Retry-After"))
        if attempt == 2 or not (paused or (budget.active and response.status_code == 429)):
            return response
        log.info("%s answered %d: again after the pause", url, response.status_code)
        response.close()
    raise AssertionError("unreachable")


def _fetch_one(
    session: requests.Session, site: ResolvedSite, url: str, recorder: Recorder, budget: Budget
) -> None:
    assert site.extract is not None
    try:
        response = _get_within_budget(session, site, url, budget)
        body = _read_capped(response, site.limits.max_bytes, site.limits.timeout)
    except (requests.RequestException, ScraperError) as exc:
        log.warning("fetch failed: %s: %s", url, exc)
        recorder.fetch(Fetch(url=url, status=None, error=short_error(exc)))
        return
    final_url = response.url if response.url != url else None
    recorder.fetch(
        Fetch(url=url, status=response.status_code, bytes=len(body), final_url=final_url)
    )
    if not 200 <= response.status_code < 300:
        return
    _, text = html_to_unicode(response.headers.get("Content-Type"), body)
    items, problems = extract_items(parsel.Selector(text=text), response.url, site.extract)
    for problem in problems:
        log.warning("%s", problem)
    for item in items:
        recorder.item(item)
