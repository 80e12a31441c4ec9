"""The sites.yaml entry that crawls the bundled shop: one place for the demo and tests."""

from __future__ import annotations

import re

SHOP_SITE = """\
  - name: {name}
    start_urls: ["{base}/index.html"]
    regions: [{regions}]
    follow:
      allow: ['^{base_re}/(index|category|product)']
    extract:
      pages: ['/product/']
      key: sku
      fields:
        sku: {{css: ".sku::text"}}
        name: {{css: "h1::text"}}
        price: {{css: ".price::text", type: price}}
        currency: {{css: ".price::attr(data-currency)"}}
"""


def shop_site_yaml(name: str, base: str, regions: str = "eu") -> str:
    """A `sites:` list entry (indented two spaces) that crawls the shop at `base`.

    Items come from product pages only, keyed by SKU: a crawl of a shop with N
    products must store exactly N items per region.
    """
    return SHOP_SITE.format(name=name, base=base, base_re=re.escape(base), regions=regions)
