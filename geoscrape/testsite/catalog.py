"""A deterministic product catalogue for the local test shop.

Everything is derived from the product number, so two catalogues built with the
same arguments are identical: tests compare what a crawl extracted against
`Catalog.expected_items()` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ADJECTIVES = (
    "Sturdy",
    "Compact",
    "Deluxe",
    "Rustic",
    "Classic",
    "Nimble",
    "Quiet",
    "Bright",
    "Gentle",
    "Bold",
)
NOUNS = (
    "Kettle",
    "Lantern",
    "Backpack",
    "Salt & Pepper Mill",  # an entity on the page: extraction must unescape it
    "Notebook",
    "Trowel",
    "Teapot",
    "Skillet",
    "Umbrella",
    "Hammock",
)
CATEGORY_SLUGS = ("kitchen", "garden", "outdoor", "office", "toys", "tools", "books", "sports")

CURRENCY = "EUR"


@dataclass(frozen=True)
class Product:
    number: int  # 1-based
    sku: str
    name: str
    price: float  # the base price; what a client sees goes through Catalog.price_for
    category: str


class Catalog:
    """`products` products spread round-robin over `categories` categories."""

    def __init__(self, products: int = 60, categories: int = 4, per_page: int = 8) -> None:
        if products < 1 or categories < 1 or per_page < 1:
            raise ValueError("products, categories and per_page must be positive")
        self.per_page = per_page
        self.categories: list[str] = [
            CATEGORY_SLUGS[i] if i < len(CATEGORY_SLUGS) else f"category-{i + 1}"
            for i in range(categories)
        ]
        self.products: list[Product] = [self._product(n) for n in range(1, products + 1)]
        self._by_sku = {p.sku: p for p in self.products}

    def _product(self, n: int) -> Product:
        combo = (n - 1) % (len(ADJECTIVES) * len(NOUNS))
        row, noun = divmod(combo, len(NOUNS))  # every noun early; each pair once
        name = f"{ADJECTIVES[(row + noun) % len(ADJECTIVES)]} {NOUNS[noun]}"
        if n > len(ADJECTIVES) * len(NOUNS):
            name += f" Mk{(n - 1) // (len(ADJECTIVES) * len(NOUNS)) + 1}"
        cents = (n * 7919) % 9000 + 100  # 1.00 .. 90.99, spread out, no randomness
        return Product(
            number=n,
            sku=f"SKU-{n:04d}",
            name=name,
            price=cents / 100,
            category=self.categories[(n - 1) % len(self.categories)],
        )

    # -- lookups -----------------------------------------------------------

    def product(self, sku: str) -> Product | None:
        return self._by_sku.get(sku)

    def in_category(self, slug: str) -> list[Product]:
        return [p for p in self.products if p.category == slug]

    def page_count(self, slug: str) -> int:
        """Pages of a category listing (at least one, even when empty)."""
        count = len(self.in_category(slug))
        return max(1, -(-count // self.per_page))

    def category_page(self, slug: str, page: int) -> list[Product]:
        start = (page - 1) * self.per_page
        return self.in_category(slug)[start : start + self.per_page]

    # -- the pricing hook --------------------------------------------------

    def price_for(self, product: Product, client_address: str) -> tuple[float, str]:
        """The (price, currency) a client at `client_address` is shown.

        The one place prices come from. It ignores the address for now; making
        the site geo-aware (a price per source subnet) means changing only this.
        """
        del client_address
        return product.price, CURRENCY

    def refuses(self, path: str, client_address: str) -> bool:
        """True: answer `path` to this client with 451 (see geo.GeoCatalog)."""
        del path, client_address
        return False

    # -- what a correct crawl must find ------------------------------------

    def expected_items(self) -> list[dict[str, Any]]:
        """Every product as extraction should see it: sku, name, price, currency, category."""
        return [
            {
                "sku": p.sku,
                "name": p.name,
                "price": p.price,
                "currency": CURRENCY,
                "category": p.category,
            }
            for p in self.products
        ]

    def html_paths(self) -> list[str]:
        """Every crawlable HTML page path (robots.txt and /private/ excluded)."""
        paths = ["/index.html", "/about.html", "/prices.html"]
        for slug in self.categories:
            paths += [
                f"/category/{slug}/page/{n}.html" for n in range(1, self.page_count(slug) + 1)
            ]
        paths += [f"/product/{p.sku}.html" for p in self.products]
        return paths
