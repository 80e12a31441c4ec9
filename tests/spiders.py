"""Ordinary Scrapy spiders for the test shop, as a user would write them.

They exercise `spider: "package.module:Class"` sites ("tests.spiders:ShopSpider").
The shop's base URL comes from the GEOSHOP_URL environment variable (default
http://127.0.0.1:8801). Imported only inside crawl children (it imports Scrapy),
which find `tests` through the repository root that tests/conftest.py puts on
PYTHONPATH. Never shipped: an installed geoscrape cannot name these spiders.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import scrapy
from scrapy.http import Response


def shop_url() -> str:
    return os.environ.get("GEOSHOP_URL", "http://127.0.0.1:8801").rstrip("/")


class ShopSpider(scrapy.Spider):
    """Every product card on /prices.html as a dict; prints to stdout as it goes."""

    name = "geoshop"

    async def start(self) -> AsyncIterator[Any]:
        yield scrapy.Request(f"{shop_url()}/prices.html", callback=self.parse)

    def parse(self, response: Response, **kwargs: Any) -> Iterator[dict[str, Any]]:
        for card in response.css("div.product"):
            sku = card.attrib.get("data-sku")
            print(f"found {sku}")  # careless output must not corrupt the event stream
            yield {
                "sku": sku,
                "name": card.css(".name::text").get(),
                "price": float(card.css(".price::text").get("nan")),
                "currency": card.css(".price::attr(data-currency)").get(),
            }


class CrashingSpider(scrapy.Spider):
    """Dies hard (no 'done' event) on its first response, after a word on stderr."""

    name = "geoshop-crash"

    async def start(self) -> AsyncIterator[Any]:
        yield scrapy.Request(f"{shop_url()}/index.html", callback=self.parse)

    def parse(self, response: Response, **kwargs: Any) -> Iterator[Any]:
        sys.stderr.write("CrashingSpider: pulling the plug\n")
        sys.stderr.flush()
        os._exit(3)
        yield None
