"""A generated site with an access log, for politeness and scale tests.

`/p/N.html` for N in 0..pages-1: an item (`.id`, `h1`) and links to pages
2N+1 and 2N+2 (a binary tree, so a crawl from `/p/0.html` reaches every page).
Every request is logged with the server's monotonic time, path and User-Agent;
`answer` may replace a response (e.g. a 429), and robots.txt is configurable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# (path, user agent) -> None (serve normally) or (status, headers)
Answer = Callable[[str, str], tuple[int, dict[str, str]] | None]


@dataclass(frozen=True)
class Hit:
    at: float  # time.monotonic() when the request line arrived
    path: str
    agent: str


@dataclass
class PageSite:
    pages: int
    robots: str = "User-agent: *\nAllow: /\n"
    answer: Answer | None = None
    delay: float = 0.0  # seconds before each page is served (a slow site)
    hits: list[Hit] = field(default_factory=list)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def log(self, hit: Hit) -> None:
        with self._lock:
            self.hits.append(hit)

    def snapshot(self) -> list[Hit]:
        with self._lock:
            return list(self.hits)

    def page_hits(self) -> list[Hit]:
        return [h for h in self.snapshot() if h.path.startswith("/p/")]

    def page_urls(self) -> list[str]:
        return [f"{self.url}/p/{n}.html" for n in range(self.pages)]

    def body(self, n: int) -> bytes:
        links = "".join(
            f'<a href="/p/{c}.html">page {c}</a> ' for c in (2 * n + 1, 2 * n + 2) if c < self.pages
        )
        return (
            f"<html><head><title>Page {n}</title></head><body>"
            f'<h1>Page {n}</h1><span class="id">{n}</span><p>{links}</p></body></html>'
        ).encode()


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most events in any half-open window [t, t + window)."""
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


class _Handler(BaseHTTPRequestHandler):
    site: PageSite
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        agent = self.headers.get("User-Agent", "")
        self.site.log(Hit(time.monotonic(), self.path, agent))
        if self.site.answer is not None and (special := self.site.answer(self.path, agent)):
            status, headers = special
            self._send(status, b"slow down", headers)
            return
        if self.path == "/robots.txt":
            self._send(200, self.site.robots.encode(), {"Content-Type": "text/plain"})
            return
        if self.path.startswith("/p/") and self.path.endswith(".html"):
            try:
                n = int(self.path[3:-5])
            except ValueError:
                n = -1
            if 0 <= n < self.site.pages:
                if self.site.delay:  # the site's response time, not a wait in a test
                    time.sleep(self.site.delay)
                self._send(200, self.site.body(n), {"Content-Type": "text/html; charset=utf-8"})
                return
        self._send(404, b"not found", {})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve_pages(site: PageSite, port: int = 0) -> Iterator[PageSite]:
    """Serve `site` on 127.0.0.1 (port 0: any free port) until the block ends."""
    handler = type("Handler", (_Handler,), {"site": site})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    site.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield site
    finally:
        server.shutdown()
        server.server_close()
