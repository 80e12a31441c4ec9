"""The local shop site: pages rendered from a Catalog, served over HTTP.

Routes (everything else is a 404):

    /  and /index.html                     links to every category, about, prices
    /category/<slug>/page/<n>.html         product cards with pagination
    /product/<sku>.html                    one product: h1, .price, .sku, .category
    /prices.html                           every product card on one page
    /about.html                            links to /private/secret.html
    /robots.txt                            Disallow: /private/
    /private/secret.html                   must never be crawled with robots: obey

A page the catalog refuses to a client (Catalog.refuses; see geo.GeoCatalog)
is answered 451 Unavailable For Legal Reasons instead.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from html import escape
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from geoscrape.testsite.background import BackgroundServer
from geoscrape.testsite.catalog import Catalog, Product

ROBOTS_TXT = "User-agent: *\nDisallow: /private/\n"

_CATEGORY_RE = re.compile(r"^/category/([a-z0-9-]+)/page/([1-9][0-9]*)\.html$")
_PRODUCT_RE = re.compile(r"^/product/([A-Za-z0-9-]+)\.html$")

# (status, content type, body)
Page = tuple[int, str, bytes]
HTML = "text/html; charset=utf-8"


class ShopPages:
    """Renders every page for one client address; pure (no sockets)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def render(self, path: str, client_address: str) -> Page:
        if self.catalog.refuses(path, client_address):
            return self.unavailable()
        if path in ("/", "/index.html"):
            return self._html("Geoshop", self._index())
        if path == "/about.html":
            return self._html("About Geoshop", self._about())
        if path == "/prices.html":
            cards = "\n".join(self._card(p, client_address) for p in self.catalog.products)
            return self._html("All prices", f'<div class="products">\n{cards}\n</div>')
        if path == "/robots.txt":
            return HTTPStatus.OK, "text/plain; charset=utf-8", ROBOTS_TXT.encode()
        if path == "/private/secret.html":
            return self._html("Staff only", "<p>Robots must not read this.</p>")
        if match := _CATEGORY_RE.match(path):
            return self._category(match.group(1), int(match.group(2)), client_address)
        if match := _PRODUCT_RE.match(path):
            product = self.catalog.product(match.group(1))
            if product is not None:
                return self._html(product.name, self._product(product, client_address))
        return self.not_found()

    def not_found(self) -> Page:
        _, ctype, body = self._html("Not found", "<p>No such page.</p>")
        return HTTPStatus.NOT_FOUND, ctype, body

    def unavailable(self) -> Page:
        # What real geo-blocks look like: a branded page with status 451.
        _, ctype, body = self._html(
            "Not available in your region",
            "<h1>Geoshop is not available in your region</h1>\n"
            "<p>For legal reasons we cannot serve visitors from your location. "
            "This page is not available in your region.</p>",
        )
        return HTTPStatus.UNAVAILABLE_FOR_LEGAL_REASONS, ctype, body

    # -- pages ---------------------------------------------------------------

    def _nav(self) -> str:
        links = ['<a href="/index.html">Home</a>']
        links += [
            f'<a href="/category/{slug}/page/1.html">{escape(slug.title())}</a>'
            for slug in self.catalog.categories
        ]
        links += ['<a href="/prices.html">All prices</a>', '<a href="/about.html">About</a>']
        return '<nav class="menu">' + " | ".join(links) + "</nav>"

    def _html(self, title: str, content: str) -> Page:
        page = (
            "<!DOCTYPE html>\n<html lang='en'>\n<head><meta charset='utf-8'>"
            f"<title>{escape(title)}</title></head>\n<body>\n{self._nav()}\n"
            f"<main>\n{content}\n</main>\n</body>\n</html>\n"
        )
        return HTTPStatus.OK, HTML, page.encode("utf-8")

    def _index(self) -> str:
        items = "\n".join(
            f'<li><a class="category" href="/category/{slug}/page/1.html">'
            f"{escape(slug.title())}</a> ({len(self.catalog.in_category(slug))} products)</li>"
            for slug in self.catalog.categories
        )
        return (
            "<h1>Welcome to Geoshop</h1>\n"
            f'<ul class="categories">\n{items}\n</ul>\n'
            '<p><a href="/about.html">About us</a></p>'
        )

    def _about(self) -> str:
        return (
            "<h1>About Geoshop</h1>\n"
            "<p>A deterministic shop for testing geoscrape.</p>\n"
            '<p><a href="/private/secret.html">Staff area</a></p>'
        )

    @staticmethod
    def _price_span(price: float, currency: str) -> str:
        return f'<span class="price" data-currency="{escape(currency)}">{price:.2f}</span>'

    def _card(self, product: Product, client_address: str) -> str:
        price, currency = self.catalog.price_for(product, client_address)
        return (
            f'<div class="product" data-sku="{escape(product.sku)}">'
            f'<a class="name" href="/product/{escape(product.sku)}.html">'
            f"{escape(product.name)}</a> {self._price_span(price, currency)}</div>"
        )

    def _category(self, slug: str, page: int, client_address: str) -> Page:
        if slug not in self.catalog.categories or page > self.catalog.page_count(slug):
            return self.not_found()
        pages = self.catalog.page_count(slug)
        cards = "\n".join(
            self._card(p, client_address) for p in self.catalog.category_page(slug, page)
        )
        links = []
        if page > 1:
            links.append(f'<a rel="prev" href="/category/{slug}/page/{page - 1}.html">prev</a>')
        links += [
            f'<a href="/category/{slug}/page/{n}.html">{n}</a>'
            for n in range(1, pages + 1)
            if n != page
        ]
        if page < pages:
            links.append(f'<a rel="next" href="/category/{slug}/page/{page + 1}.html">next</a>')
        content = (
            f"<h1>{escape(slug.title())}, page {page} of {pages}</h1>\n"
            f'<div class="products">\n{cards}\n</div>\n'
            f'<div class="pagination">{" ".join(links)}</div>'
        )
        return self._html(f"{slug.title()} ({page}/{pages})", content)

    def _product(self, product: Product, client_address: str) -> str:
        price, currency = self.catalog.price_for(product, client_address)
        return (
            f'<div class="product-detail" data-sku="{escape(product.sku)}">\n'
            f"<h1>{escape(product.name)}</h1>\n"
            f"<p>Price: {self._price_span(price, currency)}</p>\n"
            f'<p>SKU: <span class="sku">{escape(product.sku)}</span></p>\n'
            f'<p>Category: <a class="category" href="/category/{product.category}/page/1.html">'
            f"{escape(product.category)}</a></p>\n</div>"
        )


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        pages: ShopPages,
        record: Callable[[str, str], None],
    ) -> None:
        self.pages = pages
        self.record = record
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "Geoshop/1.0"

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, *, send_body: bool) -> None:
        client = self.client_address[0]
        self.server.record(client, self.path)
        status, ctype, body = self.server.pages.render(urlsplit(self.path).path, client)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the access log is kept in memory, not printed."""


class ShopServer(BackgroundServer):
    """A running shop. Use `serve()` to start one; `stop()` or `with` ends it."""

    def __init__(self, host: str, port: int, catalog: Catalog) -> None:
        self.catalog = catalog
        self._log: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        super().__init__(_HTTPServer((host, port), ShopPages(catalog), self._record), host, "shop")

    def _record(self, client: str, path: str) -> None:
        with self._lock:
            self._log.append((client, path))

    @property
    def access_log(self) -> list[tuple[str, str]]:
        """(client address, request path) for every request so far, in order."""
        with self._lock:
            return list(self._log)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()


def serve(host: str = "127.0.0.1", port: int = 0, catalog: Catalog | None = None) -> ShopServer:
    """Start a shop in a daemon thread; port 0 picks a free port (see `.url`)."""
    return ShopServer(host, port, catalog or Catalog()).start()
