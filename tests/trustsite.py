"""Regional views of a site for the issue-14 tests, served as each region's HTTP proxy.

A worker whose ``http_proxy`` is one of these servers sees the site as that
region would (as tests/test_compare_crawl.py does): the request line carries
the absolute URL, and ``render(region, host, path, hits)`` answers it. ``hits``
counts the requests of (region, path) so far, which lets a page A/B test.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from tests.harness import Stack

# (status, headers, body)
Answer = tuple[int, list[tuple[str, str]], bytes]
Render = Callable[[str, str, str, int], Answer]


def html(body: str) -> bytes:
    return f"<!doctype html><html><body>{body}</body></html>".encode()


def card(sku: str, name: str, price: float, shipping: float | None = None) -> str:
    extra = f'<span class="shipping">{shipping:.2f}</span>' if shipping is not None else ""
    return (
        f'<div class="product" data-sku="{sku}"><span class="name">{name}</span>'
        f'<span class="price">{price:.2f}</span>{extra}</div>'
    )


@contextmanager
def region_views(regions: list[str], render: Render) -> Iterator[dict[str, int]]:
    """One proxy server per region; yields region -> port."""
    lock = threading.Lock()
    hits: dict[tuple[str, str], int] = {}

    def handler_for(region: str) -> type[BaseHTTPRequestHandler]:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                with lock:
                    n = hits.get((region, parts.path), 0)
                    hits[region, parts.path] = n + 1
                status, headers, body = render(region, parts.hostname or "", parts.path, n)
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                if not any(name.lower() == "content-type" for name, _ in headers):
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    with ExitStack() as stack:
        ports = {}
        for region in regions:
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(region))
            threading.Thread(target=server.serve_forever, daemon=True).start()
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
            ports[region] = server.server_address[1]
        yield ports


def regional_worker(s: Stack, region: str, proxy_port: int) -> None:
    """`geoscrape worker --region REGION` reaching every http URL through its proxy."""
    env = {**s.env, "http_proxy": f"http://127.0.0.1:{proxy_port}", "no_proxy": ""}
    env["HTTP_PROXY"] = env["http_proxy"]
    env.pop("NO_PROXY", None)
    log = s.workdir / f"worker-{region}.log"
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "geoscrape.cli", "worker", "--region", region],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    s.procs[f"worker-{region}"] = (proc, log)
