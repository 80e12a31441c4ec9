"""A fan-out crawl compared across regions: real workers, real ingest, three regional shops.

Until network-namespace regions are used here, each region's worker reaches
the site through its own HTTP proxy (``http_proxy`` in the worker's
environment): a shop server on its own port that answers an absolute-URI
request like the site would answer that region. eu sees base prices in EUR,
us 10% more in USD, asia gets 451 for every page. The site's own address is
a closed port, so a page only arrives through a region's proxy.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pytest

from geoscrape.testsite import Catalog, Product, serve
from tests.harness import Stack, stack
from tests.query_store import cli_json, free_port

pytestmark = pytest.mark.slow
PRODUCTS = 6


class UsCatalog(Catalog):
    def price_for(self, product: Product, client_address: str) -> tuple[float, str]:
        return round(product.price * 1.1, 2), "USD"


class _Refuse(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html><body>Not available in your country</body></html>"
        self.send_response(451)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def regional_proxies() -> Iterator[dict[str, int]]:
    with ExitStack() as stack_:
        eu = stack_.enter_context(serve(catalog=Catalog(products=PRODUCTS)))
        us = stack_.enter_context(serve(catalog=UsCatalog(products=PRODUCTS)))
        refuse = ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
        Thread(target=refuse.serve_forever, daemon=True).start()
        stack_.callback(refuse.server_close)
        stack_.callback(refuse.shutdown)
        yield {"eu": eu.port, "us": us.port, "asia": refuse.server_address[1]}


CONFIG = """\
regions:
  eu: {{}}
  us: {{}}
  asia: {{}}
defaults:
  politeness: {{delay: 0, concurrency: 4, robots: ignore}}
  limits: {{max_pages: 10, timeout: 5s}}
sites:
  - name: geo
    engine: requests
    start_urls: ["http://127.0.0.1:{port}/prices.html"]
    regions: [eu, us, asia]
    allow_hosts: ["127.0.0.1"]
    extract:
      items: "div.product"
      key: sku
      fields:
        sku: {{css: "::attr(data-sku)"}}
        name: {{css: "a.name::text"}}
        price: {{css: ".price::text", type: price}}
        currency: {{css: ".price::attr(data-currency)"}}
"""


def regional_worker(s: Stack, region: str, proxy_port: int) -> None:
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


def test_fan_out_crawl_compares_prices_and_flags_the_blocked_region(
    tmp_path: Path, vhost_url: str, db_url: str, regional_proxies: dict[str, int]
) -> None:
    site_port = free_port()  # nothing listens here: pages only come through a region's proxy
    with stack(tmp_path, vhost_url, db_url, CONFIG.format(port=site_port)) as s:
        s.ingest()
        for region, port in regional_proxies.items():
            regional_worker(s, region, port)
        done = s.cli("crawl", "geo", "--wait", "--timeout", "120", timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr

        catalog = Catalog(products=PRODUCTS)
        fields = ["--field", "name", "--field", "price", "--field", "currency"]
        result = cli_json(db_url, "compare", "geo", *fields)
        assert result["regions"] == ["asia", "eu", "us"]
        assert result["fields"] == ["name", "price", "currency"]
        assert [
            (r["key"], r["values"]["price"], r["values"]["currency"], r["differs"], r["missing"])
            for r in result["rows"]
        ] == [
            (
                p.sku,
                {"asia": None, "eu": p.price, "us": round(p.price * 1.1, 2)},
                {"asia": None, "eu": "EUR", "us": "USD"},
                ["price", "currency"],
                ["asia"],
            )
            for p in catalog.products
        ]
        price = next(f for f in result["summary"] if f["field"] == "price")
        assert (price["differing"], price["missing"]) == (
            PRODUCTS,
            {"asia": PRODUCTS, "eu": 0, "us": 0},
        )

        access = cli_json(db_url, "access", "geo")
        [latest] = access["rounds"]
        assert [(c["region"], c["verdict"], c["statuses"]) for c in latest["cells"]] == [
            ("asia", "geo-blocked", {"451": 1}),
            ("eu", "ok", {"200": 1}),
            ("us", "ok", {"200": 1}),
        ]
