"""The geo-aware shop: prices, currency and access decided by the client's source subnet.

    site = GeoCatalog(
        {"eu": Locale("10.77.1.0/24", "EUR", 1.0), "us": Locale("10.77.2.0/24", "USD", 1.1)},
        blocked={"us": ["/product/"]},     # 451 for these path prefixes, to us only
    )
    with serve(host="10.77.9.1", catalog=site) as shop: ...

A client outside every listed subnet (loopback, say) sees the base catalogue:
base prices in EUR, nothing refused. The server's access log shows which
address asked for what, so a test can prove where each request came from.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from geoscrape.testsite.catalog import Catalog, Product


@dataclass(frozen=True)
class Locale:
    """What clients from `network` are shown: prices times `rate`, in `currency`."""

    network: str
    currency: str
    rate: float


# Per-region prices and currencies of the example regions (rates are made up).
EXAMPLE_LOCALES = {"eu": ("EUR", 1.0), "us": ("USD", 1.1), "asia": ("JPY", 160.0)}


class GeoCatalog(Catalog):
    def __init__(
        self,
        locales: Mapping[str, Locale],
        *,
        blocked: Mapping[str, Iterable[str]] | None = None,
        products: int = 60,
        categories: int = 4,
        per_page: int = 8,
    ) -> None:
        super().__init__(products, categories, per_page)
        self.locales = dict(locales)
        self._networks = [
            (ipaddress.ip_network(loc.network), region) for region, loc in self.locales.items()
        ]
        self.blocked = {region: tuple(paths) for region, paths in (blocked or {}).items()}
        unknown = set(self.blocked) - set(self.locales)
        if unknown:
            raise ValueError(f"blocked names regions without a locale: {sorted(unknown)}")

    def region_of(self, client_address: str) -> str | None:
        try:
            ip = ipaddress.ip_address(client_address)
        except ValueError:
            return None
        return next((region for net, region in self._networks if ip in net), None)

    def local_price(self, product: Product, region: str) -> tuple[float, str]:
        locale = self.locales[region]
        return round(product.price * locale.rate, 2), locale.currency

    def price_for(self, product: Product, client_address: str) -> tuple[float, str]:
        region = self.region_of(client_address)
        if region is None:
            return super().price_for(product, client_address)
        return self.local_price(product, region)

    def refuses(self, path: str, client_address: str) -> bool:
        region = self.region_of(client_address)
        return region is not None and path.startswith(self.blocked.get(region, ()))

    def expected_items_in(self, region: str) -> list[dict[str, Any]]:
        """expected_items() as a client in `region` sees them."""
        items = []
        for product, item in zip(self.products, self.expected_items(), strict=True):
            item["price"], item["currency"] = self.local_price(product, region)
            items.append(item)
        return items
