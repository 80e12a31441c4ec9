"""geoscrape.testsite: the deterministic local shop, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import urllib.robotparser
from collections import deque
from collections.abc import Iterator
from urllib.parse import urljoin, urlsplit

import parsel
import pytest
import requests

from geoscrape.testsite import Catalog, Product, ShopServer, serve


@pytest.fixture(scope="module")
def shop() -> Iterator[ShopServer]:
    with serve() as server:
        yield server


def get(shop: ShopServer, path: str) -> requests.Response:
    return requests.get(shop.url + path, timeout=10)


def crawl_paths(shop: ShopServer) -> set[str]:
    """Every HTML path reachable from /index.html, obeying robots.txt."""
    robots = urllib.robotparser.RobotFileParser()
    robots.parse(get(shop, "/robots.txt").text.splitlines())
    seen = {"/index.html"}
    queue = deque(seen)
    while queue:
        path = queue.popleft()
        response = get(shop, path)
        assert response.status_code == 200, path
        for href in parsel.Selector(text=response.text).css("a::attr(href)").getall():
            url = urljoin(shop.url + path, href)
            assert url.startswith(shop.url + "/"), url  # no link leaves the shop
            target = urlsplit(url).path
            if target not in seen and robots.can_fetch("*", url):
                seen.add(target)
                queue.append(target)
    return seen


def test_catalog_is_deterministic() -> None:
    first, second = Catalog(), Catalog()
    assert first.expected_items() == second.expected_items()
    items = first.expected_items()
    assert len(items) == 60
    assert len({i["sku"] for i in items}) == 60
    assert len({i["name"] for i in items}) == 60
    assert items[0] == {
        "sku": "SKU-0001",
        "name": "Sturdy Kettle",
        "price": 80.19,
        "currency": "EUR",
        "category": "kitchen",
    }
    assert all(1.0 <= i["price"] <= 90.99 and round(i["price"], 2) == i["price"] for i in items)
    assert {i["category"] for i in items} == {"kitchen", "garden", "outdoor", "office"}
    assert [sum(i["category"] == c for i in items) for c in first.categories] == [15] * 4


def test_catalog_shape_follows_arguments() -> None:
    catalog = Catalog(products=250, categories=10, per_page=7)
    assert len(catalog.products) == 250
    assert len({p.name for p in catalog.products}) == 250
    assert catalog.categories[8:] == ["category-9", "category-10"]
    assert catalog.page_count("kitchen") == 4  # 25 products / 7 per page
    assert [p.number for p in catalog.category_page("kitchen", 4)] == [211, 221, 231, 241]


def test_at_least_50_pages_reachable_from_index(shop: ShopServer) -> None:
    reachable = crawl_paths(shop)
    assert reachable == set(shop.catalog.html_paths())
    assert len(reachable) == 71  # index, about, prices, 8 category pages, 60 products
    assert "/private/secret.html" not in reachable


def test_root_is_the_index(shop: ShopServer) -> None:
    assert get(shop, "/").text == get(shop, "/index.html").text
    links = parsel.Selector(text=get(shop, "/").text).css("a::attr(href)").getall()
    assert "/about.html" in links
    assert {f"/category/{c}/page/1.html" for c in shop.catalog.categories} <= set(links)


def test_robots_txt(shop: ShopServer) -> None:
    response = get(shop, "/robots.txt")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert response.text == "User-agent: *\nDisallow: /private/\n"
    # the disallowed page exists and is linked: robots.txt is what keeps crawlers out
    assert get(shop, "/private/secret.html").status_code == 200
    assert "/private/secret.html" in get(shop, "/about.html").text


@pytest.mark.parametrize(
    "path",
    [
        "/nope",
        "/index.htm",
        "/category/kitchen/page/3.html",
        "/category/kitchen/page/0.html",
        "/category/unknown/page/1.html",
        "/product/SKU-0061.html",
        "/product/SKU-0001",
        "/private/other.html",
    ],
)
def test_404(shop: ShopServer, path: str) -> None:
    response = get(shop, path)
    assert response.status_code == 404
    assert "No such page" in response.text


def card_tuples(html: str) -> list[tuple[str, str, float, str]]:
    return [
        (
            card.attrib["data-sku"],
            card.css(".name::text").get(""),
            float(card.css(".price::text").get("")),
            card.css(".price::attr(data-currency)").get(""),
        )
        for card in parsel.Selector(text=html).css("div.product")
    ]


def expected_tuples(catalog: Catalog) -> list[tuple[str, str, float, str]]:
    return [(i["sku"], i["name"], i["price"], i["currency"]) for i in catalog.expected_items()]


def test_prices_page_lists_every_product(shop: ShopServer) -> None:
    cards = card_tuples(get(shop, "/prices.html").text)
    assert cards == expected_tuples(shop.catalog)
    assert ("SKU-0004", "Rustic Salt & Pepper Mill", 47.76, "EUR") in cards  # unescaped


def test_category_pages_partition_the_catalog(shop: ShopServer) -> None:
    cards = []
    for slug in shop.catalog.categories:
        page1 = get(shop, f"/category/{slug}/page/1.html").text
        page2 = get(shop, f"/category/{slug}/page/2.html").text
        assert len(card_tuples(page1)) == 8 and len(card_tuples(page2)) == 7
        assert f'href="/category/{slug}/page/2.html"' in page1  # pagination links
        assert f'href="/category/{slug}/page/1.html"' in page2
        cards += card_tuples(page1) + card_tuples(page2)
    assert sorted(cards) == sorted(expected_tuples(shop.catalog))


def test_product_page(shop: ShopServer) -> None:
    page = parsel.Selector(text=get(shop, "/product/SKU-0004.html").text)
    assert page.css("h1::text").get() == "Rustic Salt & Pepper Mill"
    assert page.css(".price::text").get() == "47.76"
    assert page.css(".price::attr(data-currency)").get() == "EUR"
    assert page.css(".sku::text").get() == "SKU-0004"
    assert page.css(".category::text").get() == "office"


def test_access_log_records_client_and_path() -> None:
    with serve(catalog=Catalog(products=3)) as shop:
        get(shop, "/")
        get(shop, "/missing?x=1")
        assert shop.access_log == [("127.0.0.1", "/"), ("127.0.0.1", "/missing?x=1")]
        shop.clear_log()
        assert shop.access_log == []


def test_prices_go_through_the_price_for_hook() -> None:
    seen: list[str] = []

    class DoublePrices(Catalog):
        def price_for(self, product: Product, client_address: str) -> tuple[float, str]:
            seen.append(client_address)
            return product.price * 2, "USD"

    with serve(catalog=DoublePrices(products=5, categories=1)) as shop:
        expected = [(s, n, round(p * 2, 2), "USD") for s, n, p, _ in expected_tuples(shop.catalog)]
        assert card_tuples(get(shop, "/prices.html").text) == expected
        assert card_tuples(get(shop, "/category/kitchen/page/1.html").text) == expected
        detail = parsel.Selector(text=get(shop, "/product/SKU-0002.html").text)
        assert detail.css(".price::text").get() == f"{shop.catalog.products[1].price * 2:.2f}"
        assert detail.css(".price::attr(data-currency)").get() == "USD"
    assert set(seen) == {"127.0.0.1"} and len(seen) == 11


def test_stop_frees_the_port() -> None:
    shop = serve()
    url = shop.url
    assert requests.get(url + "/", timeout=5).status_code == 200
    shop.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/", timeout=5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_module_cli_serves_until_interrupted() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "geoscrape.testsite", "--port", str(port), "--products", "12"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert banner == f"geoshop serving 12 products at http://127.0.0.1:{port}/\n"
        prices = requests.get(f"http://127.0.0.1:{port}/prices.html", timeout=5).text
        assert len(card_tuples(prices)) == 12
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None
        assert re.search(r"\bstopped\b", proc.stderr.read())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
