"""A deterministic local shop site for tests and the demo.

    with serve() as shop:            # a free port on 127.0.0.1
        shop.url                     # "http://127.0.0.1:<port>"
        shop.catalog.expected_items()
        shop.access_log              # [(client address, path), ...]

`python -m geoscrape.testsite --port 8801` serves one in the foreground.
`GeoCatalog` (geo.py) makes prices, currency and 451s depend on the client's subnet.
"""

from __future__ import annotations

from geoscrape.testsite.catalog import Catalog, Product
from geoscrape.testsite.geo import GeoCatalog, Locale
from geoscrape.testsite.server import ShopPages, ShopServer, serve

__all__ = ["Catalog", "GeoCatalog", "Locale", "Product", "ShopPages", "ShopServer", "serve"]
