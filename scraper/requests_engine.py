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

import requests
import requests.adapters
import urllib3.exceptions
import urllib3.util.connection as urllib3_connection
from w3lib.encoding import html_to_unicode

from regions.messages import Fetch
from regions.site import ResolvedSite
from scraper.egress import ChildEgress, Exit, Exits, NoExitLeft
from scraper.errors import ScraperError
from scraper.evidence import inspect
from scraper.extract import extract_items, page_selector
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
    if isinstance(exc, requests.exceptions.ProxyError):
        return f"Proxy error: {_redacted(text)}"[:300]
    if isinstance(exc, requests.ConnectionError):
        if "proxy" in text.lower():
            return f"Proxy error: {_redacted(text)}"[:300]
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


_CREDENTIALS = re.compile(r"(?<=://)[^/@\s:'\"]*:[^/@\s'\"]*@")


def _redacted(text: str) -> str:
    """`text` with `user:password@` in URLs cut to `***@` (errors may quote the proxy)."""
    return _CREDENTIALS.sub("***@", text)


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


class SourceAddressAdapter(requests.adapters.HTTPAdapter):
    """Connects from the region's egress.source_address (urllib3's source_address)."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


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
        if guard.host_allowed(host, port) or guard.proxy_allowed(host, port):
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


def is_proxy_error(exc: BaseException) -> bool:
    """The proxy itself failed (down, refusing, tunnel refused), not the target."""
    if isinstance(exc, requests.exceptions.ProxyError):
        return True
    if not isinstance(exc, requests.ConnectionError):
        return False
    # Through SOCKS, a socket error ("[Errno 111] ...") is on the way to the proxy;
    # the proxy's own answers about the target are SOCKS codes ("0x05: ...").
    text = str(exc)
    return "proxy" in text.lower() or ("SOCKS" in text and "[Errno" in text)


def run(site: ResolvedSite, recorder: Recorder, exits: Exits | None = None) -> str | None:
    """Fetch the start URLs; returns a note for the run (e.g. robots skips) or None.

    With proxied `exits` every request, robots.txt included, goes through one
    of them; none ever leaves through the direct network.
    """
    if site.extract is None:
        raise ScraperError("engine 'requests' needs an 'extract' spec")
    exits = exits or Exits(ChildEgress())
    session = requests.Session()
    if site.source_address is not None:
        for prefix in ("http://", "https://"):
            session.mount(prefix, SourceAddressAdapter(site.source_address))
    session.headers["User-Agent"] = site.politeness.user_agent
    session.max_redirects = site.limits.max_redirects
    if exits.proxied:
        session.trust_env = False  # no NO_PROXY / HTTP_PROXY from the environment
    guard = Guard.for_site(site).with_proxies(exits.endpoints())
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
            if robots is not None and not _through(session, exits, robots.allowed, url):
                log.info("forbidden by robots.txt: %s", url)
                continue
            if requested and site.politeness.delay > 0:
                time.sleep(site.politeness.delay)
            requested += 1
            # Each sample of a page goes out through the exits like any request;
            # samples stay within compare.window of each other.
            exit_left = True
            for sample in range(site.compare.samples):
                if sample:
                    pause = min(site.politeness.delay, site.compare.window / site.compare.samples)
                    if pause > 0:
                        time.sleep(pause)
                exit_left = _fetch_through(session, site, url, recorder, exits, budget, sample)
                if not exit_left:
                    break
            if not exit_left:
                break  # no exit left: nothing more may go out
    recorder.rate_budget(budget.waited, budget.pauses, budget.strikes)
    if budget.note is not None:
        recorder.note(budget.note)
    if robots is not None and robots.forbidden and recorder.stats.pages == 0:
        return f"no page was fetched ({robots.forbidden} URL(s) forbidden by robots.txt)"
    return None


def _use(session: requests.Session, exit_: Exit | None) -> None:
    proxy = exit_.proxy if exit_ is not None else None
    session.proxies = {"http": proxy, "https": proxy} if proxy else {}


def _through(
    session: requests.Session, exits: Exits, call: Callable[[str], bool], url: str
) -> bool:
    """`call(url)` with the session on the next exit; True (allowed) if no exit is
    left: the fetch that follows fails closed itself."""
    try:
        _use(session, exits.pick())
    except NoExitLeft:
        return True
    return call(url)


def _fetch_through(
    session: requests.Session,
    site: ResolvedSite,
    url: str,
    recorder: Recorder,
    exits: Exits,
    budget: Budget,
    sample: int = 0,
) -> bool:
    """Fetch `url` through the next exit, failing over to the others (per-request
    rotation). False when no exit is left."""
    while True:
        try:
            exit_ = exits.pick()
        except NoExitLeft as exc:
            recorder.fetch(Fetch(url=url, status=None, error=f"no egress exit left: {exc}"[:300]))
            return False
        _use(session, exit_)
        failure = _fetch_one(session, site, url, recorder, exit_, exits.proxied, budget, sample)
        if failure is None:
            return True
        assert exit_ is not None  # a proxy failure needs a proxy
        reason = short_error(failure)
        if not exits.failed(exit_, reason):
            log.warning("%s: exit %s failed (%s), no exit left", url, exit_.label, reason)
            recorder.fetch(Fetch(url=url, status=None, error=reason))
            return False
        log.warning("%s: exit %s failed (%s): trying the next", url, exit_.label, reason)


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
    session: requests.Session,
    site: ResolvedSite,
    url: str,
    recorder: Recorder,
    exit_: Exit | None = None,
    proxied: bool = False,
    budget: Budget | None = None,
    sample: int = 0,
) -> BaseException | None:
    """Fetch and record `url`; a proxy failure is returned unrecorded (the caller fails over)."""
    assert site.extract is not None
    address = exit_.address if exit_ is not None else None
    try:
        response = (
            _get(session, site, url, Guard.for_site(site))
            if budget is None
            else _get_within_budget(session, site, url, budget)
        )
        body = _read_capped(response, site.limits.max_bytes, site.limits.timeout)
    except (requests.RequestException, ScraperError) as exc:
        if proxied and is_proxy_error(exc):
            return exc
        log.warning("fetch failed: %s: %s", url, exc)
        recorder.fetch(
            Fetch(url=url, status=None, error=short_error(exc), exit=address, sample=sample)
        )
        return None
    final_url = response.url if response.url != url else None
    facts = inspect(
        site, url, response.url, response.status_code, list(response.headers.items()), body
    )
    recorder.fetch(
        Fetch(
            url=url,
            status=response.status_code,
            bytes=len(body),
            final_url=final_url,
            exit=address,
            sample=sample,
            **facts.fields(),
        )
    )
    if facts.block is not None:
        log.info("block page (%s): %s", facts.block, url)
        return None  # whatever a block page holds is not the site's data
    if not 200 <= response.status_code < 300:
        return None
    _, text = html_to_unicode(response.headers.get("Content-Type"), body)
    items, problems = extract_items(
        page_selector(text, site.extract.parser), response.url, site.extract
    )
    for problem in problems:
        log.warning("%s", problem)
    for item in items:
        recorder.item(item.model_copy(update={"sample": sample}) if sample else item)
    return None
