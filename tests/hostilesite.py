"""A hostile site for limit tests: pages built to exhaust a crawler, beside good ones.

Test tooling, never shipped (pyproject includes only the product packages):
`python -m tests.hostilesite`, from the repository root, serves it on port 8802.

    with serve_hostile() as site:     # a free port on 127.0.0.1
        site.url                      # "http://127.0.0.1:<port>"
        site.expected_items()         # what a crawl must still extract
        site.access_log               # [path, ...]

Routes (everything else is a small 404):

    /  /index.html          links to every page below
    /good/<n>.html          GOOD_PAGES ordinary pages, one item each (.sku, h1)
    /bomb/gzip, /bomb/br    a few hundred KiB that decompress to BOMB_BYTES of zeros
    /huge                   HUGE_BYTES of HTML, no Content-Length (only the limit stops it)
    /redirect/<n>           302 to /redirect/<n+1>, forever
    /drip                   promises 1000 bytes, sends one a second
    /encoding/bad           declared UTF-8, full of invalid UTF-8 bytes (and one item)
    /encoding/mixed         header says UTF-8, meta says Shift_JIS, body mixes both,
                            NULs and lone-surrogate references (and one item)
    /broken                 badly broken HTML, 5,000 unclosed nested tags (and one item)
    /links                  LINKS_PAGE_LINKS links to /links/<n> (each a 404)
    /calendar/<y>/<m>       a calendar trap: every month links the next and the previous
"""

from __future__ import annotations

import contextlib
import gzip
import threading
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from geoscrape.testsite.background import BackgroundServer

GOOD_PAGES = 20
BOMB_BYTES = 256 * 1024 * 1024
HUGE_BYTES = 64 * 1024 * 1024
LINKS_PAGE_LINKS = 100_000
DRIP_PROMISED = 1000
DRIP_SECONDS = 60  # the longest a drip connection is kept open

HOSTILE_PATHS = (
    "/bomb/gzip",
    "/bomb/br",
    "/huge",
    "/redirect/0",
    "/drip",
    "/encoding/bad",
    "/encoding/mixed",
    "/broken",
    "/links",
    "/calendar/2024/1",
)
ITEM_PATHS = ("/encoding/bad", "/encoding/mixed", "/broken")


def _good(n: int) -> bytes:
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>Good {n}</title></head><body><h1>Good page {n}</h1>"
        f"<p class='sku'>good-{n:02d}</p><a href='/index.html'>home</a></body></html>"
    ).encode()


def _index() -> bytes:
    links = [f"<a href='/good/{n}.html'>good {n}</a>" for n in range(GOOD_PAGES)]
    links += [f"<a href='{path}'>{path}</a>" for path in HOSTILE_PATHS]
    return f"<html><body><h1>Hostile</h1>{'<br>'.join(links)}</body></html>".encode()


@cache
def gzip_bomb() -> bytes:
    """BOMB_BYTES of zeros, gzipped (~250 KiB); built once, in 1 MiB steps."""
    import io

    buffer = io.BytesIO()
    zeros = bytes(1024 * 1024)
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9) as out:
        for _ in range(BOMB_BYTES // len(zeros)):
            out.write(zeros)
    return buffer.getvalue()


@cache
def brotli_bomb() -> bytes:
    """BOMB_BYTES of zeros, brotli-compressed (a few hundred bytes)."""
    import brotli

    compressor = brotli.Compressor(quality=5)
    zeros = bytes(1024 * 1024)
    parts = [compressor.process(zeros) for _ in range(BOMB_BYTES // len(zeros))]
    parts.append(compressor.finish())
    return b"".join(parts)


def _bad_encoding() -> bytes:
    return (
        b"<html><head><meta charset='utf-8'><title>Bad \xff\xfe bytes</title></head><body>"
        b"<h1>Caf\xe9 \xc3\x28 \xa0\xa1 \xf0\x28\x8c\xbc</h1>"
        b"<p class='sku'>enc-bad</p></body></html>"
    )


def _mixed_encoding() -> bytes:
    return (
        b"<html><head><meta charset='shift_jis'><title>Mixed</title></head><body>"
        + "<h1>Grüße 日本語 ".encode()
        + "Grüße".encode("latin-1")
        + "価格".encode("shift_jis")
        + b" \x00 &#xD800; &#0;</h1><p class='sku'>enc-mixed</p></body></html>"
    )


def _broken() -> bytes:
    nested = "<div><span><b>" * 5000
    return (
        "<html><head><title>Broken</title></head><body <<>> =x><p <p class=x>"
        f"<p class='sku'>broken</p><table><tr><td><p>{nested}"
        "<a href='/good/0.html'>ok</a><a href='javascript:alert(1)'>js</a>"
        "<a href='http://[::1'>bad url</a><a href=\"\x00\">nul</a>"
        "<!-- never closed <script>while(1){}"
    ).encode()


def _links() -> bytes:
    body = "".join(f"<a href='/links/{n}'>{n}</a>\n" for n in range(LINKS_PAGE_LINKS))
    return f"<html><body><h1>Links</h1>{body}</body></html>".encode()


def _calendar(year: int, month: int) -> bytes:
    prev_y, prev_m = (year - 1, 12) if month == 1 else (year, month - 1)
    next_y, next_m = (year + 1, 1) if month == 12 else (year, month + 1)
    return (
        f"<html><body><h1>{year}-{month:02d}</h1>"
        f"<a href='/calendar/{prev_y}/{prev_m}'>prev</a> "
        f"<a href='/calendar/{next_y}/{next_m}'>next</a></body></html>"
    ).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    site: HostileSite

    def handle_error(self, request: object, client_address: object) -> None:
        """Quiet: crawlers hanging up on a bomb or a drip is the expected outcome."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        self.server.site.record(path)
        # The crawler hanging up on us is the point.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._route(path)

    def _route(self, path: str) -> None:
        parts = path.strip("/").split("/")
        if path in ("/", "/index.html"):
            self._send(200, _index())
        elif parts[0] == "good" and len(parts) == 2 and parts[1].endswith(".html"):
            n = parts[1].removesuffix(".html")
            if n.isdigit() and int(n) < GOOD_PAGES:
                self._send(200, _good(int(n)))
            else:
                self._send(404, b"<html>no</html>")
        elif path == "/robots.txt":
            self._send(200, b"User-agent: *\nAllow: /\n", "text/plain")
        elif path == "/bomb/gzip":
            self._send(200, gzip_bomb(), encoding="gzip")
        elif path == "/bomb/br":
            self._send(200, brotli_bomb(), encoding="br")
        elif path == "/huge":
            self._huge()
        elif parts[0] == "redirect" and len(parts) == 2 and parts[1].isdigit():
            self.send_response(302)
            self.send_header("Location", f"/redirect/{int(parts[1]) + 1}")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/drip":
            self._drip()
        elif path == "/encoding/bad":
            self._send(200, _bad_encoding(), "text/html; charset=utf-8")
        elif path == "/encoding/mixed":
            self._send(200, _mixed_encoding(), "text/html; charset=utf-8")
        elif path == "/broken":
            self._send(200, _broken())
        elif path == "/links":
            self._send(200, _links())
        elif parts[0] == "calendar" and len(parts) == 3 and all(p.isdigit() for p in parts[1:]):
            self._send(200, _calendar(int(parts[1]), max(1, min(12, int(parts[2])))))
        else:
            self._send(404, b"<html>not found</html>")

    def _send(
        self, status: int, body: bytes, ctype: str = "text/html", encoding: str | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _huge(self) -> None:
        # No Content-Length: the body ends when we close, so only a running count stops it.
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = b"<p>" + b"x" * 65_530 + b"</p>\n"
        for _ in range(HUGE_BYTES // len(chunk)):
            self.wfile.write(chunk)
        self.close_connection = True

    def _drip(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(DRIP_PROMISED))
        self.end_headers()
        self.wfile.flush()
        for _ in range(min(DRIP_PROMISED, DRIP_SECONDS)):
            if self.server.site.stopping.wait(1.0):
                break
            self.wfile.write(b"x")
            self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the access log is kept in memory."""


class HostileSite(BackgroundServer):
    """A running hostile site; `serve_hostile()` starts one, `stop()` or `with` ends it."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        httpd = _Server((host, port), _Handler)
        httpd.site = self
        super().__init__(httpd, host, "hostile")
        self.stopping = threading.Event()
        self._log: list[str] = []
        self._lock = threading.Lock()

    def record(self, path: str) -> None:
        with self._lock:
            self._log.append(path)

    @property
    def access_log(self) -> list[str]:
        with self._lock:
            return list(self._log)

    @staticmethod
    def expected_items() -> set[str]:
        """The sku of every item a crawl of the whole site must still find."""
        return {f"good-{n:02d}" for n in range(GOOD_PAGES)} | {"enc-bad", "enc-mixed", "broken"}

    def start(self) -> HostileSite:
        gzip_bomb(), brotli_bomb()  # built before the first request, not inside its timeout
        return super().start()

    def stop(self) -> None:
        self.stopping.set()  # lets dripping handlers give up
        super().stop()


def serve_hostile(host: str = "127.0.0.1", port: int = 0) -> HostileSite:
    """Start a hostile site in a daemon thread; port 0 picks a free port."""
    return HostileSite(host, port).start()


if __name__ == "__main__":  # pragma: no cover - manual poking: python -m tests.hostilesite
    with serve_hostile(port=8802) as site:
        print(f"hostile site at {site.url}/", flush=True)
        threading.Event().wait()  # until Ctrl-C
