"""The `requests` engine: GET each start URL once, no link following.

Runs inside the crawl child. Honours politeness (delay between requests, user
agent, robots.txt via urllib.robotparser) and limits (timeout, max_bytes,
max_pages).
"""

from __future__ import annotations

import logging
import time
import urllib.robotparser
from urllib.parse import urlsplit

import parsel
import requests
from w3lib.encoding import html_to_unicode

from regions.messages import Fetch
from scheduler.config import ResolvedSite
from scraper.errors import ScraperError
from scraper.extract import extract_items
from scraper.protocol import Recorder

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
MAX_BYTES_EXCEEDED = "max_bytes exceeded"


class MaxBytesExceeded(ScraperError):
    """A response body larger than limits.max_bytes."""


def short_error(exc: BaseException) -> str:
    """A short, stable message for a failed request."""
    text = str(exc)
    if isinstance(exc, MaxBytesExceeded):
        return MAX_BYTES_EXCEEDED
    if isinstance(exc, requests.Timeout):
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
    name = type(exc).__name__
    return f"{name}: {text}"[:200] if text else name


class _Robots:
    """robots.txt per origin, fetched once, through the same session."""

    def __init__(self, session: requests.Session, site: ResolvedSite) -> None:
        self._session = session
        self._site = site
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
        try:
            response = self._session.get(
                f"{origin}/robots.txt", timeout=self._site.limits.timeout, stream=True
            )
            body = _read_capped(response, self._site.limits.max_bytes)
        except (requests.RequestException, MaxBytesExceeded) as exc:
            log.warning("robots.txt of %s unavailable (%s): allowing all", origin, exc)
            parser.parse([])
            return parser
        if response.status_code in (401, 403):  # as urllib.robotparser.read() does
            parser.parse(["User-agent: *", "Disallow: /"])
        elif response.status_code >= 400:
            parser.parse([])
        else:
            parser.parse(body.decode("utf-8", "replace").splitlines())
        return parser


def _read_capped(response: requests.Response, max_bytes: int) -> bytes:
    """The body of a streamed response, or MaxBytesExceeded past max_bytes."""
    try:
        declared = int(response.headers.get("Content-Length", "-1"))
        if max_bytes and declared > max_bytes:
            raise MaxBytesExceeded(f"Content-Length {declared} > {max_bytes}")
        body = bytearray()
        for chunk in response.iter_content(CHUNK):
            body += chunk
            if max_bytes and len(body) > max_bytes:
                raise MaxBytesExceeded(f"more than {max_bytes} bytes")
        return bytes(body)
    except ValueError as exc:  # a garbled Content-Length
        raise requests.RequestException(f"bad Content-Length: {exc}") from exc
    finally:
        response.close()


def run(site: ResolvedSite, recorder: Recorder) -> str | None:
    """Fetch the start URLs; returns a note for the run (e.g. robots skips) or None."""
    if site.extract is None:
        raise ScraperError("engine 'requests' needs an 'extract' spec")
    session = requests.Session()
    session.headers["User-Agent"] = site.politeness.user_agent
    robots = _Robots(session, site) if site.politeness.robots == "obey" else None
    requested = 0
    with session:
        for url in site.start_urls:
            if recorder.stats.pages >= site.limits.max_pages:
                log.info("max_pages (%d) reached", site.limits.max_pages)
                break
            if robots is not None and not robots.allowed(url):
                log.info("forbidden by robots.txt: %s", url)
                continue
            if requested and site.politeness.delay > 0:
                time.sleep(site.politeness.delay)
            requested += 1
            _fetch_one(session, site, url, recorder)
    if robots is not None and robots.forbidden and recorder.stats.pages == 0:
        return f"no page was fetched ({robots.forbidden} URL(s) forbidden by robots.txt)"
    return None


def _fetch_one(session: requests.Session, site: ResolvedSite, url: str, recorder: Recorder) -> None:
    assert site.extract is not None
    try:
        response = session.get(url, timeout=site.limits.timeout, stream=True)
        body = _read_capped(response, site.limits.max_bytes)
    except (requests.RequestException, MaxBytesExceeded) as exc:
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
