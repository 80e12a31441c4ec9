"""A local shop whose products exist only after its JavaScript ran (engine browser tests).

Every HTML page ships an empty `<ul id="products">` and a script that fetches
JSON and renders the product cards and the links to the next pages: the HTML
source holds no product and no link, so only a browser sees them.

    /                 JS renders links to /list/1 .. /list/N
    /list/<n>         JS renders PER_PAGE products from /api/list/<n>.json
    /leak?to=URL      JS fetch()es URL (an address outside allow_hosts) and renders
                      a product only if that fetch succeeded
    /socket?to=URL    JS opens a WebSocket to URL
    /bounce?to=URL    302 to URL
    /big              a page whose script fetches /api/big.json (over max_bytes)
    /hang             answers only after HANG_SECONDS (or when `hanging` is set)
    /robots.txt       empty

`Trap` is a second server that only counts the requests reaching it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

PER_PAGE = 5
BIG_BYTES = 2_000_000
HANG_SECONDS = 300

PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title></head>
<body><h1>{title}</h1><ul id="products"></ul><nav id="links"></nav>
<script>
{script}
</script></body></html>
"""

RENDER = """
function render(data) {
  const ul = document.getElementById("products");
  for (const p of data.products || []) {
    const li = document.createElement("li");
    li.className = "product";
    li.dataset.sku = p.sku;
    li.innerHTML = '<span class="name"></span> <span class="price"></span>';
    li.querySelector(".name").textContent = p.name;
    li.querySelector(".price").textContent = p.price;
    ul.appendChild(li);
  }
  const nav = document.getElementById("links");
  for (const href of data.links || []) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = href;
    nav.appendChild(a);
  }
  document.body.dataset.ready = "1";
}
"""


def product(n: int) -> dict[str, Any]:
    return {"sku": f"JS-{n:04d}", "name": f"Rendered product {n}", "price": f"{n}.50"}


def list_products(page: int) -> list[dict[str, Any]]:
    return [product((page - 1) * PER_PAGE + i) for i in range(1, PER_PAGE + 1)]


@dataclass
class BrowserSite:
    url: str
    lists: int
    hits: list[str] = field(default_factory=list)
    hanging: threading.Event = field(default_factory=threading.Event)  # set: /hang answers

    def expected(self, lists: int | None = None) -> set[tuple[str, str, float]]:
        return {
            (p["sku"], p["name"], float(p["price"]))
            for n in range(1, (lists or self.lists) + 1)
            for p in list_products(n)
        }


class _Handler(BaseHTTPRequestHandler):
    site: BrowserSite

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _page(self, title: str, script: str) -> None:
        body = PAGE.format(title=title, script=RENDER + script).encode()
        self._send(200, body, "text/html; charset=utf-8")

    def _json(self, data: Any) -> None:
        self._send(200, json.dumps(data).encode(), "application/json")

    def do_GET(self) -> None:
        self.site.hits.append(self.path)
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        path = parts.path
        if path == "/robots.txt":
            self._send(200, b"", "text/plain")
        elif path == "/":
            self._page("Index", 'fetch("/api/index.json").then(r => r.json()).then(render);')
        elif path == "/api/index.json":
            self._json({"links": [f"/list/{n}" for n in range(1, self.site.lists + 1)]})
        elif path.startswith("/list/"):
            n = path.rsplit("/", 1)[1]
            self._page(
                f"List {n}", f'fetch("/api/list/{n}.json").then(r => r.json()).then(render);'
            )
        elif path.startswith("/api/list/"):
            n = int(path.rsplit("/", 1)[1].removesuffix(".json"))
            self._json({"products": list_products(n)})
        elif path == "/leak":
            target = json.dumps(query["to"])
            self._page(
                "Leak",
                f"fetch({target}).then(r => r.json())"
                ".then(render, () => render({products: [], links: []}));",
            )
        elif path == "/socket":
            target = json.dumps(query["to"])
            self._page(
                "Socket",
                f"const ws = new WebSocket({target});"
                "ws.onmessage = e => render(JSON.parse(e.data));"
                "ws.onerror = ws.onclose = () => render({products: [], links: []});",
            )
        elif path == "/bounce":
            self._send(302, b"", "text/plain", Location=query["to"])
        elif path == "/big":
            self._page("Big", 'fetch("/api/big.json").then(r => r.json()).then(render);')
        elif path == "/hang":
            self.site.hanging.wait(HANG_SECONDS)
            self._send(200, b"late", "text/plain")
        elif path == "/api/big.json":
            self._send(200, b" " * BIG_BYTES, "application/json")
        else:
            self._send(404, b"not found", "text/plain")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a browser closing a page mid-response (max_pages, max_bytes) is expected


@contextmanager
def _serve(handler: type[BaseHTTPRequestHandler], host: str) -> Iterator[int]:
    server = _QuietServer((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def serve_browser_site(lists: int = 3) -> Iterator[BrowserSite]:
    site = BrowserSite(url="", lists=lists)
    handler = type("Handler", (_Handler,), {"site": site})
    with _serve(handler, "127.0.0.1") as port:
        site.url = f"http://127.0.0.1:{port}"
        try:
            yield site
        finally:
            site.hanging.set()


class _TrapHandler(BaseHTTPRequestHandler):
    hits: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.hits.append(self.path)
        body = json.dumps({"products": [product(9999)]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@dataclass
class Trap:
    """A server on another loopback address: any request reaching it is a leak."""

    url: str
    hits: list[str]


@contextmanager
def serve_trap(host: str = "127.0.0.2") -> Iterator[Trap]:
    hits: list[str] = []
    handler = type("Trap", (_TrapHandler,), {"hits": hits})
    with _serve(handler, host) as port:
        yield Trap(url=f"http://{host}:{port}", hits=hits)
