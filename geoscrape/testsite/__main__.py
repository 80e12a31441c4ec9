"""python -m geoscrape.testsite --host 127.0.0.1 --port 8801 --products 60"""

from __future__ import annotations

import argparse
import sys

from geoscrape.testsite.catalog import Catalog
from geoscrape.testsite.server import ShopServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m geoscrape.testsite", description="Serve the local test shop."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8801)
    parser.add_argument("--products", type=int, default=60)
    parser.add_argument("--categories", type=int, default=4)
    parser.add_argument("--per-page", type=int, default=8)
    args = parser.parse_args(argv)
    catalog = Catalog(args.products, args.categories, args.per_page)
    shop = ShopServer(args.host, args.port, catalog)
    print(f"geoshop serving {len(catalog.products)} products at {shop.url}/", flush=True)
    try:
        shop.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        shop.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
